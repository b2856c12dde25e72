//! Outbox rows in the stream: where the configured columns sit, and the event a row carries.

use crate::config::{Column, Config};
use crate::error::Definite;
use crate::route::OutboxEvent;
use crate::source::pgoutput::{self, Relation, Value};
use crate::source::{values, SourceError};

pub(super) const TYPE_BYTEA: u32 = 17;

/// Where each configured column sits in the outbox relation.
#[derive(Debug, Default, Clone)]
pub(super) struct OutboxColumns {
    pub(super) id: Option<usize>,
    pub(super) aggregate_type: Option<usize>,
    pub(super) aggregate_id: Option<usize>,
    pub(super) event_type: Option<usize>,
    pub(super) payload: Option<usize>,
    pub(super) payload_is_bytea: bool,
    pub(super) headers: Option<usize>,
    pub(super) created_at: Option<usize>,
}

impl OutboxColumns {
    /// Finds every configured column in the outbox's Relation message. One that is missing
    /// (renamed, dropped, left out by a column list) is a definite error: reading on would
    /// publish events without it (a NULL payload is a tombstone).
    pub(super) fn locate(
        relation: &Relation,
        cfg: &Config,
        commit_lsn: &str,
    ) -> Result<Self, SourceError> {
        for (key, name) in crate::postgres::coverage::required_columns(cfg) {
            if relation.column_index(name).is_none() {
                return Err(Definite::ColumnLeftStream {
                    table: crate::postgres::setup::table_sql(cfg),
                    column: name.to_owned(),
                    key,
                    commit_lsn: commit_lsn.to_owned(),
                }
                .into());
            }
        }
        let find = |column: Column| {
            let name = cfg.source.columns.name(column)?;
            relation.column_index(name)
        };
        let payload = find(Column::Payload);
        Ok(Self {
            id: find(Column::Id),
            aggregate_type: find(Column::AggregateType),
            aggregate_id: find(Column::AggregateId),
            event_type: find(Column::EventType),
            payload,
            payload_is_bytea: payload
                .and_then(|i| relation.columns.get(i))
                .is_some_and(|c| c.type_oid == TYPE_BYTEA),
            headers: find(Column::Headers),
            created_at: find(Column::CreatedAt),
        })
    }
}

/// The transaction being read.
pub(super) struct OpenTransaction {
    pub(super) unit: u64,
    pub(super) commit_lsn: String,
    /// `commit_lsn` as a number.
    pub(super) commit: u64,
    pub(super) commit_ms: i64,
    /// Exactly once: the transaction is in Kafka already (at or before the recorded
    /// progress); its events are read and not published.
    pub(super) skip: bool,
    /// Outbox events read so far in this transaction (published or skipped).
    pub(super) events: u64,
    /// Exactly once: the first this many events of the transaction are in Kafka already.
    pub(super) skip_events: u64,
}

impl OpenTransaction {
    /// Counts the next event of the transaction; true when it is to be published, false when
    /// it is in Kafka already.
    pub(super) fn next_event(&mut self) -> bool {
        let index = self.events;
        self.events += 1;
        !self.skip && index >= self.skip_events
    }
}

/// The event carried by an outbox row. Walks the tuple once.
pub(super) fn row_event<'a>(
    columns: &OutboxColumns,
    tuple: &pgoutput::Tuple<'a>,
    commit_lsn: &'a str,
    commit_ms: i64,
) -> OutboxEvent<'a> {
    let fields = [
        columns.id,
        columns.aggregate_type,
        columns.aggregate_id,
        columns.event_type,
        columns.payload,
        columns.headers,
        columns.created_at,
    ];
    let mut values: [Option<Value<'a>>; 7] = [None; 7];
    let last = fields.iter().flatten().max().copied();
    for (index, value) in tuple.iter().enumerate() {
        if last.is_none_or(|last| index > last) {
            break;
        }
        for (field, slot) in fields.iter().zip(values.iter_mut()) {
            if *field == Some(index) {
                *slot = Some(value);
            }
        }
    }
    let [id, aggregate_type, aggregate_id, event_type, payload, headers, created_at] = values;
    let text = |value: Option<Value<'a>>| -> Option<&'a str> {
        match value? {
            Value::Text(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    };
    let payload = match payload {
        Some(Value::Text(bytes)) if columns.payload_is_bytea => {
            values::parse_bytea(bytes).map(std::borrow::Cow::Owned)
        }
        Some(Value::Text(bytes) | Value::Binary(bytes)) => Some(std::borrow::Cow::Borrowed(bytes)),
        _ => None,
    };
    OutboxEvent {
        id: text(id),
        aggregate_type: text(aggregate_type),
        aggregate_id: text(aggregate_id),
        event_type: text(event_type),
        payload,
        headers: text(headers).map(std::borrow::Cow::Borrowed),
        timestamp_ms: Some(
            text(created_at)
                .and_then(values::parse_timestamp_ms)
                .unwrap_or(commit_ms),
        ),
        pg_lsn: Some(commit_lsn),
    }
}
