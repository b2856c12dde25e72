//! One record read from Kafka, seen as an outbox event (SPEC §3) — or recognised as a
//! dead-letter record (SPEC §7), which is never an event to apply.
//!
//! The relay writes the fixed headers `id` (the outbox row's UUID: the dedup key),
//! `event_type`, `aggregate_type` and, in logical mode, `pg_lsn`; the key is the aggregate id and
//! the value the payload (none: a tombstone). Everything else in the headers is the row's own.
//! Parsing borrows from the record and never panics: a record that is not an outbox event gets
//! an [`EventError`] saying why.

use std::fmt;

/// The outbox event id (header `id`): a UUID, the key of the inbox.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId([u8; 16]);

impl EventId {
    /// Parses a UUID in its hyphenated form (`6f1c2a0e-…`, as Postgres writes it) or as 32 hex
    /// digits; either case.
    pub fn parse(text: &str) -> Option<EventId> {
        let bytes = text.as_bytes();
        let hex: [u8; 32] = match bytes.len() {
            32 => bytes.try_into().ok()?,
            36 => {
                if [8, 13, 18, 23].iter().any(|&i| bytes[i] != b'-') {
                    return None;
                }
                let mut hex = [0u8; 32];
                let digits = bytes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| ![8, 13, 18, 23].contains(i));
                for (slot, (_, &b)) in hex.iter_mut().zip(digits) {
                    *slot = b;
                }
                hex
            }
            _ => return None,
        };
        let mut id = [0u8; 16];
        for (byte, pair) in id.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Some(EventId(id))
    }

    pub fn from_bytes(bytes: [u8; 16]) -> EventId {
        EventId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The canonical lowercase hyphenated form, as Postgres prints a `uuid`.
impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

/// One outbox event, borrowed from the record it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    id: EventId,
    event_type: &'a str,
    aggregate_type: &'a str,
    pg_lsn: Option<&'a str>,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

/// Why a record is not an event to apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// A dead-letter record (it carries `dlq_*` headers): the relay could not publish the row as
    /// an event. Park it for a human; never apply it.
    #[error("{0}")]
    DeadLetter(DeadLetter),
    #[error("the record has no `{0}` header: it was not written by outbox-relay")]
    MissingHeader(&'static str),
    #[error("header `{0}` is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("header `id` is not a UUID: {0:?}")]
    InvalidId(String),
}

/// What a dead-letter record says about the row it stands for (SPEC §7): the relay keeps the
/// original key, value (where it fits) and headers and adds `dlq_reason`, `dlq_error` and
/// `dlq_topic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// `dlq_reason`: `invalid_topic`, `message_too_large`, `invalid_headers`, `invalid_message`.
    pub reason: String,
    /// `dlq_error`: the human-readable cause.
    pub error: Option<String>,
    /// `dlq_topic`: where the event was headed.
    pub topic: Option<String>,
    /// The original `id` header, when the row had one.
    pub id: Option<String>,
}

impl fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a dead-letter record (dlq_reason={}", self.reason)?;
        if let Some(topic) = &self.topic {
            write!(f, ", headed for {topic}")?;
        }
        if let Some(id) = &self.id {
            write!(f, ", id {id}")?;
        }
        f.write_str("), not an event")?;
        if let Some(error) = &self.error {
            write!(f, ": {error}")?;
        }
        Ok(())
    }
}

/// Header names the relay owns (SPEC §3); `dlq_*` too.
const ID: &str = "id";
const EVENT_TYPE: &str = "event_type";
const AGGREGATE_TYPE: &str = "aggregate_type";
const PG_LSN: &str = "pg_lsn";
const DEAD_LETTER_PREFIX: &str = "dlq_";

impl<'a> Event<'a> {
    /// Reads an event from a record's parts: its key, its value (`None`: a tombstone) and its
    /// headers in record order. Where a header name repeats, the last one counts (as with the
    /// Java client's `lastHeader`); the relay itself never repeats its own.
    pub fn from_parts(
        key: Option<&'a [u8]>,
        payload: Option<&'a [u8]>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Event<'a>, EventError> {
        let mut id = None;
        let mut event_type = None;
        let mut aggregate_type = None;
        let mut pg_lsn = None;
        let mut dead_letter = false;
        let mut others = Vec::new();
        for (name, value) in headers {
            match name {
                ID => id = Some(value),
                EVENT_TYPE => event_type = Some(value),
                AGGREGATE_TYPE => aggregate_type = Some(value),
                PG_LSN => pg_lsn = Some(value),
                _ => {
                    dead_letter |= name.starts_with(DEAD_LETTER_PREFIX);
                    others.push((name, value));
                }
            }
        }
        if dead_letter {
            let find = |wanted: &str| {
                others
                    .iter()
                    .rev()
                    .find(|(name, _)| *name == wanted)
                    .and_then(|(_, v)| *v)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            return Err(EventError::DeadLetter(DeadLetter {
                reason: find("dlq_reason").unwrap_or_else(|| "unknown".to_owned()),
                error: find("dlq_error"),
                topic: find("dlq_topic"),
                id: id
                    .flatten()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
            }));
        }
        let id_text = text(id, ID)?;
        let id =
            EventId::parse(id_text).ok_or_else(|| EventError::InvalidId(id_text.to_owned()))?;
        Ok(Event {
            id,
            event_type: text(event_type, EVENT_TYPE)?,
            aggregate_type: text(aggregate_type, AGGREGATE_TYPE)?,
            pg_lsn: match pg_lsn {
                Some(_) => Some(text(pg_lsn, PG_LSN)?),
                None => None,
            },
            key,
            payload,
            headers: others,
        })
    }

    /// The dedup key (header `id`).
    pub fn id(&self) -> EventId {
        self.id
    }

    pub fn event_type(&self) -> &'a str {
        self.event_type
    }

    pub fn aggregate_type(&self) -> &'a str {
        self.aggregate_type
    }

    /// The record key: the aggregate id's UTF-8 bytes.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.key
    }

    /// The aggregate id (the key), when it is UTF-8.
    pub fn aggregate_id(&self) -> Option<&'a str> {
        self.key.and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The payload bytes as the outbox row stored them (jsonb text); `None` for a tombstone.
    pub fn payload(&self) -> Option<&'a [u8]> {
        self.payload
    }

    /// The row's payload was NULL: the record is a tombstone (in a compacted topic it deletes
    /// the aggregate's earlier records). It is still an event with an id.
    pub fn is_tombstone(&self) -> bool {
        self.payload.is_none()
    }

    /// Logical mode: the commit LSN of the transaction that wrote the event, like `0/16B3748`.
    pub fn pg_lsn(&self) -> Option<&'a str> {
        self.pg_lsn
    }

    /// The row's own header `name` (the last of that name), without the relay's fixed ones.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| *v)
    }

    /// The row's own headers, in record order (string values as they were, other JSON values as
    /// JSON text).
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + '_ {
        self.headers.iter().copied()
    }
}

/// A fixed header's value as text: present, not null, UTF-8.
fn text<'a>(value: Option<Option<&'a [u8]>>, name: &'static str) -> Result<&'a str, EventError> {
    let bytes = value.flatten().ok_or(EventError::MissingHeader(name))?;
    std::str::from_utf8(bytes).map_err(|_| EventError::NotUtf8(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_TEXT: &str = "6f1c2a0e-5b7d-4c3a-8e9f-0123456789ab";

    fn headers(
        extra: &[(&'static str, &'static str)],
    ) -> Vec<(&'static str, Option<&'static [u8]>)> {
        let mut h: Vec<(&str, Option<&[u8]>)> = vec![
            ("id", Some(ID_TEXT.as_bytes())),
            ("event_type", Some(b"OrderPlaced")),
            ("aggregate_type", Some(b"order")),
            ("pg_lsn", Some(b"0/16B3748")),
        ];
        h.extend(extra.iter().map(|(k, v)| (*k, Some(v.as_bytes()))));
        h
    }

    #[test]
    fn reads_the_fixed_headers_key_payload_and_the_rows_own_headers() {
        let hs = headers(&[("traceparent", "00-abc-01"), ("n", "3")]);
        let e = Event::from_parts(Some(b"order-42"), Some(br#"{"total": 10}"#), hs).unwrap();
        assert_eq!(e.id().to_string(), ID_TEXT);
        assert_eq!(e.event_type(), "OrderPlaced");
        assert_eq!(e.aggregate_type(), "order");
        assert_eq!(e.pg_lsn(), Some("0/16B3748"));
        assert_eq!(e.aggregate_id(), Some("order-42"));
        assert_eq!(e.payload(), Some(&br#"{"total": 10}"#[..]));
        assert!(!e.is_tombstone());
        assert_eq!(e.header("traceparent"), Some(&b"00-abc-01"[..]));
        assert_eq!(e.header("id"), None, "fixed headers are not the row's own");
        let names: Vec<&str> = e.headers().map(|(n, _)| n).collect();
        assert_eq!(names, ["traceparent", "n"]);
    }

    #[test]
    fn polling_mode_has_no_pg_lsn() {
        let mut hs = headers(&[]);
        hs.retain(|(n, _)| *n != "pg_lsn");
        let e = Event::from_parts(Some(b"k"), Some(b"{}"), hs).unwrap();
        assert_eq!(e.pg_lsn(), None);
    }

    #[test]
    fn a_null_value_is_a_tombstone_and_still_an_event() {
        let e = Event::from_parts(Some(b"order-42"), None, headers(&[])).unwrap();
        assert!(e.is_tombstone());
        assert_eq!(e.payload(), None);
        assert_eq!(e.id().to_string(), ID_TEXT);
    }

    #[test]
    fn the_last_of_repeated_headers_counts() {
        let other = "00000000-0000-4000-8000-000000000002";
        let mut hs = headers(&[("trace", "a"), ("trace", "b")]);
        hs.push(("id", Some(other.as_bytes())));
        let e = Event::from_parts(None, Some(b"{}"), hs).unwrap();
        assert_eq!(e.id().to_string(), other);
        assert_eq!(e.header("trace"), Some(&b"b"[..]));
    }

    #[test]
    fn a_dead_letter_record_is_recognised_and_never_an_event() {
        let hs = headers(&[
            ("dlq_reason", "invalid_topic"),
            ("dlq_error", "illegal topic name: contains '/'"),
            ("dlq_topic", "outbox.event.a/b"),
        ]);
        let err = Event::from_parts(Some(b"k"), Some(b"{}"), hs).unwrap_err();
        let EventError::DeadLetter(dl) = &err else {
            panic!("expected a dead letter, got {err:?}");
        };
        assert_eq!(dl.reason, "invalid_topic");
        assert_eq!(dl.topic.as_deref(), Some("outbox.event.a/b"));
        assert_eq!(
            dl.error.as_deref(),
            Some("illegal topic name: contains '/'")
        );
        assert_eq!(dl.id.as_deref(), Some(ID_TEXT));
        let text = err.to_string();
        assert!(
            text.contains("dlq_reason=invalid_topic") && text.contains("not an event"),
            "{text}"
        );
    }

    #[test]
    fn a_dead_letter_without_an_id_or_fixed_headers_is_still_a_dead_letter() {
        // An emitted message that was not a valid envelope has none of the fixed headers.
        let hs: Vec<(&str, Option<&[u8]>)> = vec![
            ("dlq_reason", Some(b"invalid_message")),
            ("dlq_error", Some(b"not a valid outbox envelope")),
        ];
        match Event::from_parts(None, Some(b"garbage"), hs) {
            Err(EventError::DeadLetter(dl)) => {
                assert_eq!(dl.reason, "invalid_message");
                assert_eq!(dl.id, None);
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_or_invalid_id_is_a_clear_error() {
        let mut hs = headers(&[]);
        hs.retain(|(n, _)| *n != "id");
        let err = Event::from_parts(None, None, hs.clone()).unwrap_err();
        assert_eq!(err, EventError::MissingHeader("id"));
        assert!(err.to_string().contains("no `id` header"), "{err}");

        let mut null_id = hs.clone();
        null_id.push(("id", None));
        assert_eq!(
            Event::from_parts(None, None, null_id).unwrap_err(),
            EventError::MissingHeader("id")
        );

        let mut not_uuid = hs.clone();
        not_uuid.push(("id", Some(b"e-1")));
        let err = Event::from_parts(None, None, not_uuid).unwrap_err();
        assert_eq!(err, EventError::InvalidId("e-1".into()));
        assert!(err.to_string().contains("not a UUID"), "{err}");

        let mut not_utf8 = hs;
        not_utf8.push(("id", Some(&[0xff, 0xfe])));
        assert_eq!(
            Event::from_parts(None, None, not_utf8).unwrap_err(),
            EventError::NotUtf8("id")
        );
    }

    #[test]
    fn event_type_and_aggregate_type_are_required() {
        for missing in ["event_type", "aggregate_type"] {
            let mut hs = headers(&[]);
            hs.retain(|(n, _)| *n != missing);
            match Event::from_parts(None, None, hs) {
                Err(EventError::MissingHeader(name)) => assert_eq!(name, missing),
                other => panic!("expected missing {missing}, got {other:?}"),
            }
        }
    }

    #[test]
    fn uuids_parse_in_postgres_forms_and_print_canonically() {
        let id = EventId::parse(ID_TEXT).unwrap();
        assert_eq!(id.to_string(), ID_TEXT);
        assert_eq!(EventId::parse(&ID_TEXT.to_uppercase()), Some(id));
        assert_eq!(EventId::parse(&ID_TEXT.replace('-', "")), Some(id));
        assert_eq!(id.as_bytes()[0], 0x6f);
        assert_eq!(id.as_bytes()[15], 0xab);
        for bad in [
            "",
            "6f1c2a0e",
            "6f1c2a0e-5b7d-4c3a-8e9f-0123456789a",
            "6f1c2a0e-5b7d-4c3a-8e9f-0123456789abc",
            "6f1c2a0e_5b7d-4c3a-8e9f-0123456789ab",
            "6f1c2a0e-5b7d-4c3a-8e9f-0123456789ag",
            "6f1c2a0e-5b7d-4c3a-8e9f-0123456789éa",
            "6f1c2a0e5-b7d-4c3a-8e9f-0123456789ab",
        ] {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
    }
}
