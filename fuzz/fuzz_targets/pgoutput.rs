//! Feeds arbitrary bytes to the pgoutput decoder: it must return `Ok` or `Err`, never panic,
//! and every tuple it accepts must iterate to exactly its validated length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outbox_relay::source::pgoutput::{decode, Message, Tuple};

fn check(tuple: &Tuple<'_>) {
    // Lazy decoding must agree with the validation done by `decode`.
    assert_eq!(tuple.iter().count(), tuple.len());
    assert_eq!(tuple.get(tuple.len()), None);
}

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Message::Insert { new, .. }) => check(&new),
        Ok(Message::Update { old, new, .. }) => {
            if let Some(old) = old {
                check(&old);
            }
            check(&new);
        }
        Ok(Message::Delete { old, .. }) => check(&old),
        Ok(_) | Err(_) => {}
    }
});
