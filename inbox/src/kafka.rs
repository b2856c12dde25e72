//! Feature `rdkafka`: an [`Event`] read straight from an rdkafka message, borrowing from it.

use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::event::{Event, EventError};

impl<'a> Event<'a> {
    /// Reads the event from a consumed message ([`BorrowedMessage`], `OwnedMessage`, …): its
    /// key, its payload (`None`: a tombstone) and its headers. A dead-letter record or a record
    /// without a valid `id` header is an [`EventError`].
    pub fn from_message<M: Message>(message: &'a M) -> Result<Event<'a>, EventError> {
        let headers = message
            .headers()
            .into_iter()
            .flat_map(|h| h.iter().map(|h| (h.key, h.value)));
        Event::from_parts(message.key(), message.payload(), headers)
    }
}

impl<'a> TryFrom<&'a BorrowedMessage<'_>> for Event<'a> {
    type Error = EventError;

    fn try_from(message: &'a BorrowedMessage<'_>) -> Result<Event<'a>, EventError> {
        Event::from_message(message)
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;

    fn message(value: Option<&[u8]>, headers: &[(&str, &str)]) -> OwnedMessage {
        let headers = headers.iter().fold(OwnedHeaders::new(), |hs, (k, v)| {
            hs.insert(Header {
                key: k,
                value: Some(*v),
            })
        });
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            Some(b"order-42".to_vec()),
            "outbox.event.order".into(),
            Timestamp::CreateTime(1_700_000_000_123),
            0,
            7,
            Some(headers),
        )
    }

    const FIXED: [(&str, &str); 3] = [
        ("id", "6f1c2a0e-5b7d-4c3a-8e9f-0123456789ab"),
        ("event_type", "OrderPlaced"),
        ("aggregate_type", "order"),
    ];

    #[test]
    fn reads_an_event_from_a_message() {
        let mut hs = FIXED.to_vec();
        hs.push(("traceparent", "00-abc-01"));
        let msg = message(Some(b"{}"), &hs);
        let e = Event::from_message(&msg).unwrap();
        assert_eq!(e.id().to_string(), FIXED[0].1);
        assert_eq!(e.event_type(), "OrderPlaced");
        assert_eq!(e.aggregate_id(), Some("order-42"));
        assert_eq!(e.payload(), Some(&b"{}"[..]));
        assert_eq!(e.header("traceparent"), Some(&b"00-abc-01"[..]));
    }

    #[test]
    fn a_message_without_value_is_a_tombstone_and_without_headers_is_no_event() {
        let tombstone = message(None, &FIXED);
        assert!(Event::from_message(&tombstone).unwrap().is_tombstone());

        let bare = OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            None,
        );
        assert_eq!(
            Event::from_message(&bare).unwrap_err(),
            EventError::MissingHeader("id")
        );
    }

    #[test]
    fn a_dead_letter_message_is_recognised() {
        let mut hs = FIXED.to_vec();
        hs.push(("dlq_reason", "invalid_headers"));
        let msg = message(Some(b"{}"), &hs);
        assert!(matches!(
            Event::from_message(&msg),
            Err(EventError::DeadLetter(dl)) if dl.reason == "invalid_headers"
        ));
    }
}
