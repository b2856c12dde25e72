//! The outbox table's columns: the one list of them. The loader takes its
//! `[source.columns]` keys and their defaults from [`OUTBOX_COLUMNS`], validation its rules,
//! and the coverage check and both sources which columns they need.

use serde::Deserialize;

use super::de::deserialize_optional_column;
use super::SourceMode;

/// One column the relay reads from the outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// The event id, published as header `id` (the dedup key).
    Id,
    /// Routes to a topic.
    AggregateType,
    /// The Kafka key.
    AggregateId,
    /// Published as header `event_type`.
    EventType,
    /// The Kafka value.
    Payload,
    /// A JSON object of extra Kafka headers.
    Headers,
    /// The record timestamp.
    CreatedAt,
    /// Order within a transaction (polling).
    Seq,
    /// The writing transaction's id (polling).
    Txid,
}

/// When a column must be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    /// Always: it cannot be switched off.
    Always,
    /// In polling mode only; `""` switches it off in logical mode, where it is not read.
    Polling,
    /// Never: `""` means the table has no such column.
    Never,
}

/// What the relay knows about one outbox column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnSpec {
    /// Which column.
    pub column: Column,
    /// Its key in `[source.columns]` (and `OUTBOX_RELAY_SOURCE_COLUMNS_<KEY>`).
    pub key: &'static str,
    /// Its default name: the one `sql/outbox.sql` uses.
    pub default: &'static str,
    /// When it must be configured.
    pub required: Required,
    /// Whether the replication stream must carry it when configured (logical mode reads
    /// it from each row; the polling columns are not read there).
    pub streamed: bool,
}

impl Column {
    /// The column's entry in [`OUTBOX_COLUMNS`].
    pub fn spec(self) -> &'static ColumnSpec {
        &OUTBOX_COLUMNS[self as usize]
    }
}

impl ColumnSpec {
    /// Whether the column is read in `mode` when configured.
    pub fn read_in(&self, mode: SourceMode) -> bool {
        match mode {
            SourceMode::Logical => self.streamed,
            SourceMode::Polling => true,
        }
    }
}

const fn spec(column: Column, key: &'static str, required: Required, streamed: bool) -> ColumnSpec {
    ColumnSpec {
        column,
        key,
        default: key,
        required,
        streamed,
    }
}

/// Every outbox column, in [`Column`] order (which is `sql/outbox.sql`'s). The default names
/// are the keys.
pub const OUTBOX_COLUMNS: [ColumnSpec; 9] = [
    spec(Column::Id, "id", Required::Always, true),
    spec(
        Column::AggregateType,
        "aggregate_type",
        Required::Always,
        true,
    ),
    spec(Column::AggregateId, "aggregate_id", Required::Always, true),
    spec(Column::EventType, "event_type", Required::Always, true),
    spec(Column::Payload, "payload", Required::Always, true),
    spec(Column::Headers, "headers", Required::Never, true),
    spec(Column::CreatedAt, "created_at", Required::Never, true),
    spec(Column::Seq, "seq", Required::Polling, false),
    spec(Column::Txid, "txid", Required::Polling, false),
];

/// `[source.columns]`: the outbox table's column names, so an existing table (Debezium's
/// `aggregatetype`, `aggregateid`, `type`) works unchanged.
///
/// The optional columns can be switched off by setting them to the empty string in the file
/// (`headers = ""`, `created_at = ""`) or environment: that means "my table has no such column"
/// and gives `None`. Without `headers` records carry only the standard headers; without
/// `created_at` the record timestamp is the commit time; `seq` and `txid` are needed by polling
/// mode only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Columns {
    /// The event id, published as header `id` (the dedup key).
    pub id: String,
    /// Routes to a topic.
    pub aggregate_type: String,
    /// The Kafka key.
    pub aggregate_id: String,
    /// Published as header `event_type`.
    pub event_type: String,
    /// The Kafka value.
    pub payload: String,
    /// A JSON object of extra Kafka headers; `None` if the table has none.
    #[serde(deserialize_with = "deserialize_optional_column")]
    pub headers: Option<String>,
    /// The record timestamp; `None` means use the commit time.
    #[serde(deserialize_with = "deserialize_optional_column")]
    pub created_at: Option<String>,
    /// Order within a transaction (polling mode).
    #[serde(deserialize_with = "deserialize_optional_column")]
    pub seq: Option<String>,
    /// The writing transaction's `xid8` (polling mode).
    #[serde(deserialize_with = "deserialize_optional_column")]
    pub txid: Option<String>,
}

impl Columns {
    /// The configured name of `column`; `None` if it is switched off.
    pub fn name(&self, column: Column) -> Option<&str> {
        match column {
            Column::Id => Some(&self.id),
            Column::AggregateType => Some(&self.aggregate_type),
            Column::AggregateId => Some(&self.aggregate_id),
            Column::EventType => Some(&self.event_type),
            Column::Payload => Some(&self.payload),
            Column::Headers => self.headers.as_deref(),
            Column::CreatedAt => self.created_at.as_deref(),
            Column::Seq => self.seq.as_deref(),
            Column::Txid => self.txid.as_deref(),
        }
    }

    /// The configured columns read in `mode`: (spec, name), in [`OUTBOX_COLUMNS`] order.
    pub fn configured(
        &self,
        mode: SourceMode,
    ) -> impl Iterator<Item = (&'static ColumnSpec, &str)> {
        OUTBOX_COLUMNS
            .iter()
            .filter(move |spec| spec.read_in(mode))
            .filter_map(|spec| self.name(spec.column).map(|name| (spec, name)))
    }
}

impl Default for Columns {
    fn default() -> Self {
        let name = |column: Column| column.spec().default.to_owned();
        Columns {
            id: name(Column::Id),
            aggregate_type: name(Column::AggregateType),
            aggregate_id: name(Column::AggregateId),
            event_type: name(Column::EventType),
            payload: name(Column::Payload),
            headers: Some(name(Column::Headers)),
            created_at: Some(name(Column::CreatedAt)),
            seq: Some(name(Column::Seq)),
            txid: Some(name(Column::Txid)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_column_order_and_optional_means_optional() {
        for (i, spec) in OUTBOX_COLUMNS.iter().enumerate() {
            assert_eq!(spec.column as usize, i, "{spec:?}");
            // A column that can be switched off is an `Option` in `Columns`, and the others
            // are not.
            let mut columns = Columns::default();
            assert_eq!(columns.name(spec.column), Some(spec.default));
            columns.headers = None;
            columns.created_at = None;
            columns.seq = None;
            columns.txid = None;
            assert_eq!(
                columns.name(spec.column).is_none(),
                spec.required != Required::Always,
                "{spec:?}"
            );
        }
    }
}
