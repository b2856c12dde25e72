//! The operator commands, one file each: `init` (create what the relay needs), `check` (find
//! what is wrong, one line each, with the fix) and `status` (where the slot, or the polling
//! cursor, stands). Only `main.rs` calls them.

mod check;
mod init;
mod status;

pub use check::check;
pub use init::init;
pub use status::status;
