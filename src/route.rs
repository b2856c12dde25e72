//! Where an outbox row becomes a Kafka record (SPEC §3), or a dead-letter record (SPEC §7).
//!
//! Both sources (the replication stream and the poller) hand over an [`OutboxEvent`]: the
//! row's fields as text, borrowed from the source's buffer. The [`Router`] renders the topic
//! from the template, takes the aggregate id as the key and the payload bytes as the value
//! unparsed, and turns the row's `headers` JSON object into Kafka headers next to the fixed
//! ones (`id`, `event_type`, `aggregate_type`, `pg_lsn`). A row that cannot become a valid
//! record is routed to the dead-letter topic with the reason, never dropped and never allowed
//! to stop the stream.
//!
//! The fixed header names (and `dlq_*`, which dead-letter records carry) are the relay's: a
//! row header of the same name is dropped and counted, so a consumer reading `id` (Java's
//! `lastHeader("id")` as much as a first-match reader) always gets the row's id.

use std::borrow::Cow;
use std::fmt;

use prometheus::IntCounter;
use serde::Deserialize;
use serde_json::value::RawValue;

mod topic;

pub use topic::{topic_name_error, TopicTemplate, MAX_TOPIC_LEN};

/// Bytes librdkafka counts on top of key, value and headers when it compares a message with
/// `message.max.bytes` (record batch and record framing). Generous, so a payload just under
/// the limit goes to the dead-letter topic instead of failing inside the producer.
const RECORD_OVERHEAD: usize = 512;

/// One committed outbox event, as the source read it.
#[derive(Debug, Clone, Default)]
pub struct OutboxEvent<'a> {
    /// The dedup key (a UUID's text).
    pub id: Option<&'a str>,
    pub aggregate_type: Option<&'a str>,
    pub aggregate_id: Option<&'a str>,
    pub event_type: Option<&'a str>,
    /// The payload bytes as stored; `None` publishes a tombstone.
    pub payload: Option<Cow<'a, [u8]>>,
    /// The row's `headers` column: JSON text, expected to be an object.
    pub headers: Option<Cow<'a, str>>,
    /// The record timestamp in milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// Logical mode: the transaction's commit LSN, like `0/16B3748`.
    pub pg_lsn: Option<&'a str>,
}

/// Why a row went to the dead-letter topic; the `dlq_reason` header and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    InvalidTopic,
    MessageTooLarge,
    InvalidHeaders,
    InvalidMessage,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 4] = [
        Self::InvalidTopic,
        Self::MessageTooLarge,
        Self::InvalidHeaders,
        Self::InvalidMessage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidTopic => "invalid_topic",
            Self::MessageTooLarge => "message_too_large",
            Self::InvalidHeaders => "invalid_headers",
            Self::InvalidMessage => "invalid_message",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record ready for the producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub topic: Cow<'a, str>,
    pub key: Option<&'a [u8]>,
    pub value: Option<Cow<'a, [u8]>>,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(Cow<'a, str>, Cow<'a, [u8]>)>,
}

impl Record<'_> {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// What became of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed<'a> {
    Publish(Record<'a>),
    DeadLetter {
        /// The record for the dead-letter topic, with `dlq_*` headers added.
        record: Record<'a>,
        reason: DeadLetterReason,
    },
}

/// Renders topics and builds records. One per pipeline; cheap to clone.
#[derive(Debug, Clone)]
pub struct Router {
    template: TopicTemplate,
    uses_event_type: bool,
    dead_letter_topic: String,
    max_message_bytes: usize,
    /// Counts row headers dropped for using a reserved name.
    reserved_dropped: Option<IntCounter>,
}

/// Whether a header name is the relay's own: a row header of that name is dropped.
pub fn is_reserved_header(name: &str) -> bool {
    matches!(name, "id" | "event_type" | "aggregate_type" | "pg_lsn") || name.starts_with("dlq_")
}

impl Router {
    /// `max_message_bytes` is the producer's `message.max.bytes`.
    pub fn new(
        template: &TopicTemplate,
        dead_letter_topic: &str,
        max_message_bytes: usize,
    ) -> Self {
        let uses_event_type = template.uses_event_type();
        Self {
            template: template.clone(),
            uses_event_type,
            dead_letter_topic: dead_letter_topic.to_owned(),
            max_message_bytes,
            reserved_dropped: None,
        }
    }

    /// Counts row headers dropped for a reserved name in `counter`.
    pub fn with_reserved_counter(mut self, counter: IntCounter) -> Self {
        self.reserved_dropped = Some(counter);
        self
    }

    pub fn dead_letter_topic(&self) -> &str {
        &self.dead_letter_topic
    }

    /// Maps one event to its record, or to a dead-letter record saying why it can't be one.
    pub fn route<'a>(&self, event: OutboxEvent<'a>) -> Routed<'a> {
        let headers = match fixed_headers(&event) {
            Ok(mut fixed) => match user_headers_of(&event) {
                Ok((user, dropped)) => {
                    if dropped > 0 {
                        if let Some(counter) = &self.reserved_dropped {
                            counter.inc_by(dropped);
                        }
                    }
                    fixed.extend(user);
                    fixed
                }
                Err(error) => {
                    return self.dead_letter(
                        event,
                        fixed,
                        DeadLetterReason::InvalidHeaders,
                        error,
                        None,
                    );
                }
            },
            Err(fixed) => {
                // A missing id: only an emitted message can lack one.
                return self.dead_letter(
                    event,
                    fixed,
                    DeadLetterReason::InvalidMessage,
                    "event has no id".into(),
                    None,
                );
            }
        };
        let topic = match self.topic(&event) {
            Ok(topic) => topic,
            Err((error, topic)) => {
                return self.dead_letter(
                    event,
                    headers,
                    DeadLetterReason::InvalidTopic,
                    error,
                    topic,
                )
            }
        };
        let size = record_size(&event, &headers);
        if size > self.max_message_bytes {
            let error = format!(
                "record of {size} bytes exceeds message.max.bytes {}",
                self.max_message_bytes
            );
            return self.dead_letter(
                event,
                headers,
                DeadLetterReason::MessageTooLarge,
                error,
                Some(topic),
            );
        }
        Routed::Publish(Record {
            topic: Cow::Owned(topic),
            key: event.aggregate_id.map(str::as_bytes),
            value: event.payload,
            timestamp_ms: event.timestamp_ms,
            headers,
        })
    }

    /// Builds the dead-letter record for an event the caller already knows is bad, such as
    /// an emitted message that is not a valid envelope, or a record Kafka refused.
    pub fn dead_letter_raw<'a>(
        &self,
        key: Option<&'a [u8]>,
        value: Option<Cow<'a, [u8]>>,
        headers: Vec<(Cow<'a, str>, Cow<'a, [u8]>)>,
        reason: DeadLetterReason,
        error: String,
        intended_topic: &str,
    ) -> Routed<'a> {
        let mut headers = headers;
        let mut value = value;
        let size = key.map_or(0, <[u8]>::len)
            + value.as_ref().map_or(0, |v| v.len())
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + error.len()
            + intended_topic.len()
            + RECORD_OVERHEAD;
        if reason == DeadLetterReason::MessageTooLarge || size > self.max_message_bytes {
            value = None;
        }
        headers.push((
            Cow::Borrowed("dlq_reason"),
            reason.as_str().as_bytes().into(),
        ));
        headers.push((Cow::Borrowed("dlq_error"), Cow::Owned(error.into_bytes())));
        headers.push((
            Cow::Borrowed("dlq_topic"),
            Cow::Owned(intended_topic.as_bytes().to_vec()),
        ));
        Routed::DeadLetter {
            record: Record {
                topic: Cow::Owned(self.dead_letter_topic.clone()),
                key,
                value,
                timestamp_ms: None,
                headers,
            },
            reason,
        }
    }

    fn dead_letter<'a>(
        &self,
        event: OutboxEvent<'a>,
        headers: Vec<(Cow<'a, str>, Cow<'a, [u8]>)>,
        reason: DeadLetterReason,
        error: String,
        topic: Option<String>,
    ) -> Routed<'a> {
        let intended = topic.unwrap_or_else(|| {
            self.template.render(
                event.aggregate_type.unwrap_or("{aggregate_type}"),
                event.event_type.unwrap_or("{event_type}"),
            )
        });
        let routed = self.dead_letter_raw(
            event.aggregate_id.map(str::as_bytes),
            event.payload,
            headers,
            reason,
            error,
            &intended,
        );
        match routed {
            Routed::DeadLetter { mut record, reason } => {
                record.timestamp_ms = event.timestamp_ms;
                Routed::DeadLetter { record, reason }
            }
            other => other,
        }
    }

    /// Renders the topic, or says why the event can't have one (with the rendered name when
    /// there is one).
    fn topic(&self, event: &OutboxEvent<'_>) -> Result<String, (String, Option<String>)> {
        let aggregate_type = non_empty(event.aggregate_type, "aggregate_type")?;
        non_empty(event.aggregate_id, "aggregate_id")?;
        let event_type = match event.event_type {
            Some(t) if !t.is_empty() || !self.uses_event_type => t,
            _ => return Err(("event_type is null or empty".into(), None)),
        };
        let topic = self.template.render(aggregate_type, event_type);
        match topic_name_error(&topic) {
            None => Ok(topic),
            Some(reason) => Err((format!("illegal topic name: {reason}"), Some(topic))),
        }
    }
}

fn non_empty<'a>(value: Option<&'a str>, field: &str) -> Result<&'a str, (String, Option<String>)> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err((format!("{field} is empty"), None)),
        None => Err((format!("{field} is null"), None)),
    }
}

type Headers<'a> = Vec<(Cow<'a, str>, Cow<'a, [u8]>)>;

/// The fixed headers; `Err` (still with the headers it could make) when the id is missing.
fn fixed_headers<'a>(event: &OutboxEvent<'a>) -> Result<Headers<'a>, Headers<'a>> {
    let mut headers: Headers<'a> = Vec::with_capacity(6);
    if let Some(id) = event.id {
        headers.push((Cow::Borrowed("id"), Cow::Borrowed(id.as_bytes())));
    }
    if let Some(t) = event.event_type {
        headers.push((Cow::Borrowed("event_type"), Cow::Borrowed(t.as_bytes())));
    }
    if let Some(t) = event.aggregate_type {
        headers.push((Cow::Borrowed("aggregate_type"), Cow::Borrowed(t.as_bytes())));
    }
    if let Some(lsn) = event.pg_lsn {
        headers.push((Cow::Borrowed("pg_lsn"), Cow::Borrowed(lsn.as_bytes())));
    }
    match event.id {
        Some(id) if !id.is_empty() => Ok(headers),
        _ => Err(headers),
    }
}

/// The event's user headers, borrowed from its `headers` text where it is borrowed, without
/// those with a reserved name; and how many were dropped for that.
fn user_headers_of<'a>(event: &OutboxEvent<'a>) -> Result<(Headers<'a>, u64), String> {
    let mut headers = match &event.headers {
        None => return Ok((Vec::new(), 0)),
        Some(Cow::Borrowed(json)) => user_headers(json)?,
        Some(Cow::Owned(json)) => user_headers(json)?
            .into_iter()
            .map(|(k, v)| (Cow::Owned(k.into_owned()), Cow::Owned(v.into_owned())))
            .collect(),
    };
    let before = headers.len();
    headers.retain(|(name, _)| !is_reserved_header(name));
    let dropped = (before - headers.len()) as u64;
    Ok((headers, dropped))
}

/// The row's `headers` object as Kafka headers: strings as they are, other JSON values as
/// their JSON text. Sorted by name; a name given twice keeps its last value. Names and values
/// without escapes borrow from `json`.
fn user_headers(json: &str) -> Result<Headers<'_>, String> {
    let trimmed = json.trim();
    if trimmed == "{}" {
        return Ok(Vec::new());
    }
    match plain_string_members(trimmed) {
        Some(members) => Ok(last_of_each_name(members)),
        None => parsed_headers(trimmed),
    }
}

/// Sorted by name; of a name given twice, the last.
fn last_of_each_name<V>(mut members: Vec<(Cow<'_, str>, V)>) -> Vec<(Cow<'_, str>, V)> {
    // Stable sort of the reversed list: of equal names, the last given comes first and stays.
    members.reverse();
    members.sort_by(|a, b| a.0.cmp(&b.0));
    members.dedup_by(|later, kept| later.0 == kept.0);
    members
}

/// The members of a flat JSON object whose names and values are all strings without escapes
/// (what `jsonb` prints for the usual headers, such as a trace id), borrowed, in the order
/// given; `None` for anything else, which the JSON parser then reads (and judges).
fn plain_string_members(json: &str) -> Option<Headers<'_>> {
    let bytes = json.as_bytes();
    let skip_space = |at: &mut usize| {
        while bytes
            .get(*at)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            *at += 1;
        }
    };
    let expect = |at: &mut usize, byte: u8| -> Option<()> {
        (bytes.get(*at) == Some(&byte)).then(|| *at += 1)
    };
    let mut at = 0;
    expect(&mut at, b'{')?;
    let mut members = Vec::with_capacity(4);
    loop {
        skip_space(&mut at);
        let name = plain_string(json, &mut at)?;
        skip_space(&mut at);
        expect(&mut at, b':')?;
        skip_space(&mut at);
        let value = plain_string(json, &mut at)?;
        members.push((Cow::Borrowed(name), Cow::Borrowed(value.as_bytes())));
        skip_space(&mut at);
        match bytes.get(at) {
            Some(b',') => at += 1,
            Some(b'}') => break,
            _ => return None,
        }
    }
    // Only the closing brace may be left: the text was trimmed.
    (at + 1 == bytes.len()).then_some(members)
}

/// The JSON string starting at `at` if it has no escapes (and so no control characters),
/// its text without the quotes; `at` moves past it.
fn plain_string<'a>(json: &'a str, at: &mut usize) -> Option<&'a str> {
    let bytes = json.as_bytes();
    if bytes.get(*at) != Some(&b'"') {
        return None;
    }
    let start = *at + 1;
    let len = bytes[start..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    if bytes[start + len] != b'"' {
        return None;
    }
    *at = start + len + 1;
    // The quotes are ASCII, so both ends are character boundaries.
    Some(&json[start..start + len])
}

/// [`user_headers`] by the JSON parser: any object, escapes and values of every kind.
fn parsed_headers(trimmed: &str) -> Result<Headers<'_>, String> {
    let HeaderObject(entries) = serde_json::from_str(trimmed).map_err(|e| {
        if trimmed.starts_with('{') {
            format!("headers is not a valid JSON object: {e}")
        } else {
            "headers is not a JSON object".to_owned()
        }
    })?;
    let entries = last_of_each_name(entries);
    let mut out = Vec::with_capacity(entries.len());
    for (key, raw) in entries {
        let text = raw.get();
        let value = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            // Nothing to unescape: the string is its text.
            Some(inner) if !inner.bytes().any(|b| b == b'\\' || b < 0x20) => {
                Cow::Borrowed(inner.as_bytes())
            }
            Some(_) => Cow::Owned(
                String::deserialize(raw)
                    .map_err(|e| format!("header {key:?}: {e}"))?
                    .into_bytes(),
            ),
            None => Cow::Borrowed(text.as_bytes()),
        };
        out.push((key, value));
    }
    Ok(out)
}

/// A JSON object's members in the order given, names borrowed where they have no escapes.
struct HeaderObject<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for HeaderObject<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = HeaderObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some((Name(key), value)) = map.next_entry::<Name<'de>, &'de RawValue>()? {
                    entries.push((key, value));
                }
                Ok(HeaderObject(entries))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// A member name: borrowed from the input unless it had escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

fn record_size(event: &OutboxEvent<'_>, headers: &Headers<'_>) -> usize {
    event.aggregate_id.map_or(0, str::len)
        + event.payload.as_ref().map_or(0, |p| p.len())
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + RECORD_OVERHEAD
}

/// An event emitted with `outbox.emit(...)`: the JSON envelope carried by a logical
/// decoding message.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub aggregate_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub aggregate_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub event_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub payload: Option<&'a RawValue>,
    #[serde(borrow)]
    pub headers: Option<&'a RawValue>,
    /// Milliseconds are taken from the message's commit time instead when absent.
    #[serde(borrow)]
    pub created_at: Option<Cow<'a, str>>,
}

impl<'a> Envelope<'a> {
    /// Parses an envelope; the error is the human text for `dlq_error`.
    pub fn parse(content: &'a [u8]) -> Result<Self, String> {
        serde_json::from_slice(content).map_err(|e| format!("not a valid outbox envelope: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> TopicTemplate {
        TopicTemplate::parse(text).unwrap()
    }

    fn router() -> Router {
        Router::new(
            &template("outbox.event.{aggregate_type}"),
            "outbox.dead-letter",
            1_000_000,
        )
    }

    fn event() -> OutboxEvent<'static> {
        OutboxEvent {
            id: Some("6f1c2a0e-0000-4000-8000-000000000001"),
            aggregate_type: Some("order"),
            aggregate_id: Some("order-42"),
            event_type: Some("OrderPlaced"),
            payload: Some(Cow::Borrowed(br#"{"total": 10}"#)),
            headers: Some(Cow::Borrowed(
                r#"{"traceparent": "00-abc-01", "n": 3, "o": {"a": [1]}}"#,
            )),
            timestamp_ms: Some(1_700_000_000_123),
            pg_lsn: Some("0/16B3748"),
        }
    }

    fn publish(routed: Routed<'_>) -> Record<'_> {
        match routed {
            Routed::Publish(r) => r,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn dead(routed: Routed<'_>) -> (Record<'_>, DeadLetterReason) {
        match routed {
            Routed::DeadLetter { record, reason } => (record, reason),
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn maps_a_row_to_its_record() {
        let r = publish(router().route(event()));
        assert_eq!(r.topic, "outbox.event.order");
        assert_eq!(r.key, Some(&b"order-42"[..]));
        assert_eq!(r.value.as_deref(), Some(&br#"{"total": 10}"#[..]));
        assert_eq!(r.timestamp_ms, Some(1_700_000_000_123));
        assert_eq!(
            r.header("id"),
            Some(&b"6f1c2a0e-0000-4000-8000-000000000001"[..])
        );
        assert_eq!(r.header("event_type"), Some(&b"OrderPlaced"[..]));
        assert_eq!(r.header("aggregate_type"), Some(&b"order"[..]));
        assert_eq!(r.header("pg_lsn"), Some(&b"0/16B3748"[..]));
        assert_eq!(r.header("traceparent"), Some(&b"00-abc-01"[..]));
        assert_eq!(r.header("n"), Some(&b"3"[..]));
        assert_eq!(r.header("o"), Some(&br#"{"a": [1]}"#[..]));
    }

    #[test]
    fn user_headers_are_sorted_unescaped_and_the_last_of_a_name_wins() {
        let json = r#"{"b": "x\"y\u00e9", "a": "plain", "b": "last", "c\u0041": null, "d": 1.5}"#;
        let headers = user_headers(json).unwrap();
        let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(
            pairs,
            [
                ("a", &b"plain"[..]),
                ("b", b"last"),
                ("cA", b"null"),
                ("d", b"1.5"),
            ]
        );
        // Plain names and values point into the input; escaped ones are unescaped copies.
        assert!(matches!(headers[0], (Cow::Borrowed(_), Cow::Borrowed(_))));
        assert!(matches!(headers[2].0, Cow::Owned(_)));
        let escaped = user_headers(r#"{"k": "x\"y\u00e9"}"#).unwrap();
        assert_eq!(&*escaped[0].1, "x\"yé".as_bytes());
        assert!(user_headers("{}").unwrap().is_empty());
        assert!(user_headers(" {\"k\": \"v\"} ").is_ok());
    }

    #[test]
    fn plain_string_objects_take_the_short_way_and_everything_else_the_parser() {
        let plain = r#"{"trace_id": "abc", "tenant":"t-1" ,  "b": "", "trace_id": "é"}"#;
        let members = plain_string_members(plain).expect("plain");
        assert_eq!(members.len(), 4);
        assert_eq!(user_headers(plain), parsed_headers(plain));
        for other in [
            r#"{"k": "x\"y"}"#,
            r#"{"k": 1}"#,
            r#"{"k": null}"#,
            r#"{"k": "v",}"#,
            r#"{"k": "v"} {}"#,
            r#"{"k" "v"}"#,
            "{\"k\": \"a\tb\"}",
            r#"{ }"#,
            r#"["k", "v"]"#,
            r#"{"k": "v""#,
        ] {
            assert_eq!(plain_string_members(other), None, "{other}");
            assert_eq!(user_headers(other), parsed_headers(other.trim()), "{other}");
        }
    }

    proptest::proptest! {
        /// Whenever the short way reads an object, the parser reads the same headers from it.
        #[test]
        fn the_short_way_agrees_with_the_parser(
            members in proptest::collection::vec(("[a-c\"\\\\ é]{0,3}", "[a-c\"\\\\ é:,{}]{0,4}"), 0..5),
            spaces in proptest::collection::vec("[ \t\n\r]{0,2}", 8),
            noise in "[ ,:{}\"a1]{0,3}",
        ) {
            let mut json = format!("{{{}", spaces[0]);
            for (i, (name, value)) in members.iter().enumerate() {
                if i > 0 {
                    json.push(',');
                }
                json.push_str(&format!(
                    "{}\"{name}\"{}:{}\"{value}\"{}",
                    spaces[1], spaces[2], spaces[3], spaces[4]
                ));
            }
            json.push('}');
            for text in [json.clone(), format!("{json}{noise}"), format!("{noise}{json}")] {
                let trimmed = text.trim();
                if let Some(members) = plain_string_members(trimmed) {
                    proptest::prop_assert_eq!(
                        Ok(last_of_each_name(members)),
                        parsed_headers(trimmed),
                        "{}", trimmed
                    );
                }
            }
        }
    }

    #[test]
    fn reserved_row_headers_never_shadow_the_relays_own() {
        let counter = IntCounter::new("dropped", "dropped").unwrap();
        let r = router().with_reserved_counter(counter.clone());
        let mut e = event();
        e.headers = Some(Cow::Borrowed(
            r#"{"id": "x", "pg_lsn": "y", "dlq_reason": "z", "event_type": "w", "aggregate_type": "v", "trace": "t", "ID": "kept", "idx": "kept"}"#,
        ));
        let rec = publish(r.route(e));
        let named = |name: &str| -> Vec<&[u8]> {
            rec.headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_ref())
                .collect()
        };
        assert_eq!(named("id"), [&b"6f1c2a0e-0000-4000-8000-000000000001"[..]]);
        assert_eq!(named("pg_lsn"), [&b"0/16B3748"[..]]);
        assert_eq!(named("event_type"), [&b"OrderPlaced"[..]]);
        assert_eq!(named("aggregate_type"), [&b"order"[..]]);
        assert!(named("dlq_reason").is_empty());
        assert_eq!(named("trace"), [&b"t"[..]]);
        assert_eq!(named("ID"), [&b"kept"[..]], "names are case-sensitive");
        assert_eq!(named("idx"), [&b"kept"[..]]);
        assert_eq!(counter.get(), 5);

        // Polling mode has no pg_lsn, and the name stays the relay's all the same.
        let mut e = event();
        e.pg_lsn = None;
        e.headers = Some(Cow::Owned(r#"{"pg_lsn": "y"}"#.to_owned()));
        assert_eq!(publish(r.route(e)).header("pg_lsn"), None);
        assert_eq!(counter.get(), 6);
    }

    #[test]
    fn owned_headers_text_gives_the_same_headers() {
        let mut e = event();
        let borrowed = publish(router().route(e.clone())).headers;
        e.headers = e.headers.map(|h| Cow::Owned(h.into_owned()));
        assert_eq!(publish(router().route(e)).headers, borrowed);
    }

    #[test]
    fn null_payload_is_a_tombstone() {
        let mut e = event();
        e.payload = None;
        assert_eq!(publish(router().route(e)).value, None);
    }

    #[test]
    fn renders_both_placeholders() {
        let r = Router::new(
            &template("{aggregate_type}-x.{event_type}"),
            "dlq",
            1_000_000,
        );
        assert_eq!(publish(r.route(event())).topic, "order-x.OrderPlaced");
        let r = Router::new(&template("fixed"), "dlq", 1_000_000);
        assert_eq!(publish(r.route(event())).topic, "fixed");
    }

    #[test]
    fn illegal_topic_goes_to_dead_letter() {
        let mut e = event();
        e.aggregate_type = Some("bad type/with slash");
        let (r, reason) = dead(router().route(e));
        assert_eq!(reason, DeadLetterReason::InvalidTopic);
        assert_eq!(r.topic, "outbox.dead-letter");
        assert_eq!(r.key, Some(&b"order-42"[..]));
        assert_eq!(r.value.as_deref(), Some(&br#"{"total": 10}"#[..]));
        assert_eq!(r.header("dlq_reason"), Some(&b"invalid_topic"[..]));
        assert_eq!(
            r.header("dlq_topic"),
            Some(&b"outbox.event.bad type/with slash"[..])
        );
        assert!(r.header("dlq_error").is_some());
        assert_eq!(r.header("traceparent"), Some(&b"00-abc-01"[..]));
    }

    #[test]
    fn null_or_empty_routing_fields_go_to_dead_letter() {
        for mutate in [
            (|e: &mut OutboxEvent| e.aggregate_type = None) as fn(&mut OutboxEvent),
            |e| e.aggregate_type = Some(""),
            |e| e.aggregate_id = None,
            |e| e.aggregate_id = Some(""),
        ] {
            let mut e = event();
            mutate(&mut e);
            let (r, reason) = dead(router().route(e));
            assert_eq!(reason, DeadLetterReason::InvalidTopic);
            assert_eq!(r.header("dlq_reason"), Some(&b"invalid_topic"[..]));
        }
        let long = "a".repeat(300);
        let mut e = event();
        e.aggregate_type = Some(&long);
        assert_eq!(dead(router().route(e)).1, DeadLetterReason::InvalidTopic);
    }

    #[test]
    fn headers_that_are_not_an_object_go_to_dead_letter() {
        for bad in ["[1,2]", "\"x\"", "3", "{not json", "null"] {
            let mut e = event();
            e.headers = Some(Cow::Borrowed(bad));
            let (r, reason) = dead(router().route(e));
            assert_eq!(reason, DeadLetterReason::InvalidHeaders, "{bad}");
            assert_eq!(
                r.header("id"),
                Some(&b"6f1c2a0e-0000-4000-8000-000000000001"[..])
            );
        }
    }

    #[test]
    fn too_large_payload_goes_to_dead_letter_without_value() {
        let r = Router::new(&template("t.{aggregate_type}"), "dlq", 2_000);
        let big = vec![b'x'; 5_000];
        let mut e = event();
        e.payload = Some(Cow::Owned(big));
        let (rec, reason) = dead(r.route(e));
        assert_eq!(reason, DeadLetterReason::MessageTooLarge);
        assert_eq!(rec.value, None);
        assert_eq!(rec.header("dlq_topic"), Some(&b"t.order"[..]));
    }

    #[test]
    fn parses_an_envelope() {
        let text = br#"{"id":"u1","aggregate_type":"order","aggregate_id":"7","event_type":"E","payload":{"a": 1},"headers":{"h":"v"},"created_at":"2026-01-01T00:00:00+00:00"}"#;
        let env = Envelope::parse(text).unwrap();
        assert_eq!(env.id.as_deref(), Some("u1"));
        assert_eq!(env.payload.unwrap().get(), r#"{"a": 1}"#);
        assert_eq!(env.headers.unwrap().get(), r#"{"h":"v"}"#);
        assert!(Envelope::parse(b"not json").is_err());
        assert!(Envelope::parse(b"[1]").is_err());
    }
}
