//! Faults only the operator can fix, each with its data, its message and its fix written here
//! once; and [`error_chain`], the one-line rendering of any error with its causes.
//!
//! A [`Definite`] error stops the relay: retrying cannot help, so it stays up, not ready, and
//! says what is wrong and how to fix it (log, `/status`, `outbox-relay check`). What the relay
//! does with each kind of error is [`crate::policy`]'s to decide. This module imports nothing
//! from the rest of the crate, so every stage can build these errors.

/// A fault the operator must fix. `Display` renders "problem; to fix: fix".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Definite {
    // postgres.url and its TLS settings
    /// `postgres.url` cannot be parsed or used.
    PostgresUrl {
        problem: String,
    },
    /// The TLS settings of `postgres.url` are unusable.
    PostgresTls {
        problem: String,
    },
    /// `postgres.url` names several servers; logical mode streams from one.
    SeveralServers {
        servers: usize,
    },

    // Server settings and privileges
    WalLevel {
        level: String,
    },
    /// Postgres refused a statement with SQLSTATE 42501 (insufficient privilege).
    PermissionDenied {
        context: &'static str,
        message: String,
    },
    /// The replication connection's login was refused.
    ReplicationLogin {
        error: String,
    },
    /// The replication connection lacks a privilege.
    ReplicationPrivilege {
        error: String,
    },
    /// `check`: the role has neither REPLICATION nor SUPERUSER.
    NoReplicationRole,
    /// `check`: the role cannot read the outbox table.
    CannotSelect {
        table: String,
    },
    /// `check`: the role cannot read and write `outbox.relay_state`.
    StateTableRights,
    /// `check`: retention is on but the role cannot delete.
    CannotDelete {
        table: String,
    },

    // The outbox table
    TableMissing {
        table: String,
    },
    ColumnMissing {
        table: String,
        column: String,
        key: &'static str,
    },
    ColumnGenerated {
        table: String,
        column: String,
        key: &'static str,
    },
    /// A Relation message of the stream lacks a configured column.
    ColumnLeftStream {
        table: String,
        column: String,
        key: &'static str,
        commit_lsn: String,
    },
    /// Polling: the `txid` column has a type that is not the writer's transaction id.
    TxidType {
        table: String,
        found: String,
    },

    // The publication's coverage of the outbox table
    /// `publication` is the name, `quoted` its SQL identifier.
    PublicationMissing {
        publication: String,
        quoted: String,
        table: String,
        /// The relay would create it, but `source.create` is false.
        create_disabled: bool,
    },
    /// The replication stream says the publication is missing.
    PublicationMissingInStream {
        error: String,
    },
    NoInserts {
        publication: String,
        quoted: String,
        /// The `publish` option with `insert` added.
        publish: String,
    },
    NotViaRoot {
        publication: String,
        quoted: String,
        table: String,
    },
    NotPublished {
        publication: String,
        quoted: String,
        table: String,
        /// The table is partitioned and the publication lacks `publish_via_partition_root`.
        needs_via_root: bool,
    },
    RowFilter {
        publication: String,
        quoted: String,
        table: String,
        filter: String,
    },
    ColumnList {
        publication: String,
        quoted: String,
        table: String,
        column: String,
        key: &'static str,
    },
    TableRecreated {
        quoted: String,
        table: String,
        was: u32,
        now: String,
    },
    Readded {
        publication: String,
        table: String,
    },
    /// A streaming session's verification found `cause`; the slot stays at or before `held`.
    CoverageLost {
        cause: Box<Definite>,
        held: String,
    },

    // The replication slot
    SlotMissing {
        slot: String,
    },
    /// The slot the relay consumed up to `position` no longer exists.
    SlotVanished {
        slot: String,
        position: String,
    },
    SlotVanishedWhileStreaming {
        slot: String,
    },
    /// `wal_status = lost`; `confirmed` is the slot's last confirmed position when known.
    SlotLost {
        slot: String,
        confirmed: Option<String>,
    },
    SlotPlugin {
        slot: String,
        plugin: Option<String>,
    },
    SlotOtherDatabase {
        slot: String,
    },
    UnreadableLsn {
        text: String,
    },

    // The polling cursor
    StateTableMissing,
    CursorKind {
        name: String,
        kind: String,
    },
    CursorUnreadable {
        name: String,
        position: String,
    },
    CursorVanished {
        name: String,
    },

    // Events and Kafka
    /// `source.on_invalid = "halt"` and an event is invalid.
    InvalidEvent {
        id: String,
        reason: String,
        error: String,
    },
    /// The dead-letter topic refused a record even without its value.
    DeadLetterRefused {
        topic: String,
        error: String,
    },
    /// Exactly once: the source was confirmed past the progress recorded in Kafka.
    SourceAheadOfProgress {
        identity: String,
        position: String,
        recorded: String,
        topic: String,
    },
    /// Exactly once: the progress record in Kafka cannot be read as a position.
    ProgressUnreadable {
        identity: String,
        topic: String,
        value: String,
    },
}

/// Inserts committed while the table was not covered are gone from the stream.
const LOST_MEANWHILE: &str =
    "inserts committed while it was not covered are not in the replication stream: republish them";

impl Definite {
    /// What is wrong, for the operator.
    pub fn problem(&self) -> String {
        match self {
            Self::PostgresUrl { problem } | Self::PostgresTls { problem } => problem.clone(),
            Self::SeveralServers { servers } => format!(
                "postgres.url names {servers} servers; logical mode streams from one server and cannot follow the choice among several"
            ),
            Self::WalLevel { level } => {
                format!("wal_level is {level:?}, logical replication needs \"logical\"")
            }
            Self::PermissionDenied { context, message } => {
                format!("permission denied while {context}: {message}")
            }
            Self::ReplicationLogin { error } => {
                format!("postgres refused the replication login ({error})")
            }
            Self::ReplicationPrivilege { error } => {
                format!("the relay's role lacks a privilege ({error})")
            }
            Self::NoReplicationRole => {
                "the relay's role has neither REPLICATION nor SUPERUSER".into()
            }
            Self::CannotSelect { table } => format!("the relay's role cannot SELECT from {table}"),
            Self::StateTableRights => {
                "the relay cannot read and write outbox.relay_state (the polling cursor)".into()
            }
            Self::CannotDelete { table } => {
                format!("source.retention is set but the relay cannot DELETE from {table}")
            }
            Self::TableMissing { table } => format!("the outbox table {table} does not exist"),
            Self::ColumnMissing { table, column, key } => {
                format!("the outbox table {table} has no column {column:?} (source.columns.{key})")
            }
            Self::ColumnGenerated { table, column, key } => format!(
                "column {column:?} of {table} (source.columns.{key}) is generated, and logical replication does not send generated columns"
            ),
            Self::ColumnLeftStream {
                table,
                column,
                key,
                commit_lsn,
            } => format!(
                "the replication stream describes {table} without column {column:?} \
                 (source.columns.{key}) in the transaction committed at {commit_lsn} \
                 (renamed, dropped, or left out by the publication's column list); \
                 nothing from there on was published"
            ),
            Self::TxidType { table, found } => format!(
                "the txid column of {table} has type {found}; polling needs the writing transaction's id"
            ),
            Self::PublicationMissing {
                publication,
                create_disabled,
                ..
            } => {
                if *create_disabled {
                    format!("publication {publication} does not exist and source.create is false")
                } else {
                    format!("publication {publication} does not exist")
                }
            }
            Self::PublicationMissingInStream { error } => {
                format!("the publication is missing ({error})")
            }
            Self::NoInserts { publication, .. } => format!(
                "publication {publication} does not publish inserts, so no outbox event reaches the relay"
            ),
            Self::NotViaRoot {
                publication, table, ..
            } => format!(
                "{table} is partitioned and publication {publication} lacks publish_via_partition_root, so its inserts arrive under the partitions' names"
            ),
            Self::NotPublished {
                publication, table, ..
            } => format!(
                "publication {publication} does not publish the outbox table {table}, so its inserts never reach the relay"
            ),
            Self::RowFilter {
                publication,
                table,
                filter,
                ..
            } => format!(
                "publication {publication} publishes only the rows of {table} WHERE {filter}; the relay would confirm past the others"
            ),
            Self::ColumnList {
                publication,
                table,
                column,
                key,
                ..
            } => format!(
                "publication {publication} leaves column {column:?} (source.columns.{key}) of {table} out of its column list"
            ),
            Self::TableRecreated {
                table, was, now, ..
            } => format!(
                "the outbox table {table} was dropped and created again while the relay ran (relation {was} is now {now})"
            ),
            Self::Readded { publication, table } => format!(
                "the outbox table {table} was removed from publication {publication} and added again while the relay ran"
            ),
            Self::CoverageLost { cause, held } => format!(
                "{}; the slot stays at or before {held}, where coverage was last verified",
                cause.problem()
            ),
            Self::SlotMissing { slot } => {
                format!("replication slot {slot} does not exist and source.create is false")
            }
            Self::SlotVanished { slot, position } => format!(
                "replication slot {slot} was consumed up to {position} and no longer exists \
                 (dropped by hand, or lost in a failover); recreating it would skip every \
                 event committed since"
            ),
            Self::SlotVanishedWhileStreaming { slot } => format!(
                "replication slot {slot} vanished while streaming; events committed since the last confirmed position may be lost if it is recreated"
            ),
            Self::SlotLost { slot, confirmed } => format!(
                "replication slot {slot} lost the WAL it still needed (wal_status = lost: it fell \
                 more than max_slot_wal_keep_size behind); events committed after {} were lost \
                 to the relay and will not be published from this slot",
                lost_after(confirmed)
            ),
            Self::SlotPlugin { slot, plugin } => format!(
                "replication slot {slot} uses plugin {} instead of pgoutput",
                plugin.as_deref().unwrap_or("(none: a physical slot)")
            ),
            Self::SlotOtherDatabase { slot } => {
                format!("replication slot {slot} belongs to another database")
            }
            Self::UnreadableLsn { text } => format!("postgres reported an unreadable LSN {text:?}"),
            Self::StateTableMissing => "the state table outbox.relay_state does not exist".into(),
            Self::CursorKind { name, kind } => format!(
                "outbox.relay_state row {name:?} has kind {kind:?}, not a polling cursor"
            ),
            Self::CursorUnreadable { name, position } => {
                format!("the polling cursor {name:?} holds {position:?}, not \"txid/seq\"")
            }
            Self::CursorVanished { name } => {
                format!("the polling cursor row {name:?} vanished from outbox.relay_state")
            }
            Self::InvalidEvent { id, reason, error } => format!(
                "event {id} is invalid ({reason}: {error}); halted because source.on_invalid = \"halt\""
            ),
            Self::DeadLetterRefused { topic, error } => format!(
                "the dead-letter topic {topic} refused a record even without its value ({error})"
            ),
            Self::SourceAheadOfProgress { identity, position, recorded, topic } => format!(
                "the source of {identity} stands at {position}, past the progress recorded in \
                 {topic} ({recorded}): events committed in between were confirmed without being \
                 recorded as published exactly once"
            ),
            Self::ProgressUnreadable { identity, topic, value } => format!(
                "the progress record of {identity} in {topic} is unreadable: {value:?}"
            ),
        }
    }

    /// How to fix it: one sentence, or the statement to run.
    pub fn fix(&self) -> String {
        match self {
            Self::PostgresUrl { .. } => "set postgres.url to a valid libpq URL".into(),
            Self::PostgresTls { .. } => {
                "fix the TLS settings (sslmode, sslrootcert, sslcert, sslkey) of postgres.url".into()
            }
            Self::SeveralServers { .. } => "point postgres.url at the primary alone (a DNS name or virtual IP that follows failovers), or use source.mode = \"polling\"".into(),
            Self::WalLevel { .. } => "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart Postgres, or use source.mode = \"polling\"".into(),
            Self::PermissionDenied { .. } => "grant the relay's role the privileges in sql/roles.sql (or run `outbox-relay init` as the table owner)".into(),
            Self::ReplicationLogin { .. } => "check the user and password in postgres.url and that pg_hba.conf allows replication connections for it".into(),
            Self::ReplicationPrivilege { .. } => {
                "grant REPLICATION to the relay's role (see sql/roles.sql)".into()
            }
            Self::NoReplicationRole => "ALTER ROLE <relay role> REPLICATION (see sql/roles.sql)".into(),
            Self::CannotSelect { table } => {
                format!("GRANT SELECT ON {table} TO <relay role> (see sql/roles.sql)")
            }
            Self::StateTableRights => "run `outbox-relay init`, and GRANT SELECT, INSERT, UPDATE ON outbox.relay_state TO <relay role> (see sql/roles.sql)".into(),
            Self::CannotDelete { table } => {
                format!("GRANT DELETE ON {table} TO <relay role>, or remove source.retention")
            }
            Self::TableMissing { .. } => {
                "run `outbox-relay init` (it applies sql/outbox.sql) or set source.table".into()
            }
            Self::ColumnMissing { key, .. } => format!(
                "set source.columns.{key} to the column's name, or add the column (see sql/outbox.sql)"
            ),
            Self::ColumnGenerated { key, .. } => {
                format!("map source.columns.{key} to a stored column")
            }
            Self::ColumnLeftStream {
                table, column, key, ..
            } => format!(
                "point source.columns.{key} at the column's new name, or restore the \
                 column (ALTER TABLE {table} RENAME COLUMN ... TO {}), then restart the \
                 relay; see README \"Coverage\"",
                quote_ident(column)
            ),
            Self::TxidType { .. } => "make it xid8 NOT NULL DEFAULT pg_current_xact_id() (or bigint DEFAULT txid_current()), as in sql/outbox.sql".into(),
            Self::PublicationMissing { quoted, table, .. } => format!(
                "run `outbox-relay init`, or CREATE PUBLICATION {quoted} FOR TABLE {table} \
                 WITH (publish_via_partition_root = true) as the table owner"
            ),
            Self::PublicationMissingInStream { .. } => {
                "run `outbox-relay init` or create the publication for the outbox table".into()
            }
            Self::NoInserts { quoted, publish, .. } => format!(
                "ALTER PUBLICATION {quoted} SET (publish = '{publish}') (or run `outbox-relay init`); {LOST_MEANWHILE}"
            ),
            Self::NotViaRoot { quoted, .. } => format!(
                "ALTER PUBLICATION {quoted} SET (publish_via_partition_root = true) (or run `outbox-relay init`); {LOST_MEANWHILE}"
            ),
            Self::NotPublished {
                quoted,
                table,
                needs_via_root,
                ..
            } => {
                if *needs_via_root {
                    format!(
                        "ALTER PUBLICATION {quoted} ADD TABLE {table}; ALTER PUBLICATION {quoted} SET (publish_via_partition_root = true) (or run `outbox-relay init`); {LOST_MEANWHILE}"
                    )
                } else {
                    format!("ALTER PUBLICATION {quoted} ADD TABLE {table} (or run `outbox-relay init`); {LOST_MEANWHILE}")
                }
            }
            Self::RowFilter { quoted, table, .. } => {
                format!("publish the whole table: {}", readd(quoted, table))
            }
            Self::ColumnList { quoted, table, .. } => {
                format!("publish every column: {}", readd(quoted, table))
            }
            Self::TableRecreated { quoted, table, .. } => format!(
                "make sure publication {quoted} publishes the new table (ALTER PUBLICATION {quoted} ADD TABLE {table}) and restart the relay; \
                 inserts into the new table committed before it was in the publication are not in the replication stream: republish them"
            ),
            Self::Readded { .. } => "inserts committed while it was out of the publication are not in the replication stream: republish them, then restart the relay".into(),
            Self::CoverageLost { cause, .. } => cause.fix(),
            Self::SlotMissing { .. } => "run `outbox-relay init`, or set source.create = true".into(),
            Self::SlotVanished { slot, position } => format!(
                "republish what may be missing (outbox rows committed after {position}), then \
                 DELETE FROM outbox.relay_state WHERE name = '{slot}' so the relay may create a new slot"
            ),
            Self::SlotVanishedWhileStreaming { .. } => {
                "see the README section \"A vanished slot\"".into()
            }
            Self::SlotLost { slot, confirmed } => {
                let after = lost_after(confirmed);
                format!(
                    "republish what is missing (outbox rows committed after {after}; events written \
                     with outbox.emit are gone), then SELECT pg_drop_replication_slot('{slot}') and \
                     DELETE FROM outbox.relay_state WHERE name = '{slot}' so the relay creates a new \
                     slot; raise max_slot_wal_keep_size so it does not happen again"
                )
            }
            Self::SlotPlugin { .. } => {
                "choose another source.slot, or drop that slot if nothing else uses it".into()
            }
            Self::SlotOtherDatabase { .. } => "choose another source.slot for this database".into(),
            Self::UnreadableLsn { .. } => "report this as a bug".into(),
            Self::StateTableMissing => "run `outbox-relay init` (it applies sql/outbox.sql)".into(),
            Self::CursorKind { .. } => {
                "remove or rename that row (nothing else should use this name)".into()
            }
            Self::CursorUnreadable { name, .. } => format!(
                "correct outbox.relay_state.position for {name:?} (\"0/0\" republishes everything in the outbox)"
            ),
            Self::CursorVanished { .. } => {
                "do not edit outbox.relay_state while a relay runs; restart the relay".into()
            }
            Self::InvalidEvent { .. } => "correct the producer of this event, then set on_invalid = \"dead-letter\" to let it pass to the dead-letter topic".into(),
            Self::DeadLetterRefused { .. } => "let the topic take it (its max.message.bytes, policy or ACLs), then restart the relay".into(),
            Self::SourceAheadOfProgress { identity, topic, .. } => format!(
                "if an at-least-once relay published them, delete the record (a tombstone with key \
                 {identity:?} in {topic}) and restart; otherwise republish the events between the \
                 two positions first"
            ),
            Self::ProgressUnreadable { identity, topic, .. } => format!(
                "delete the record (a tombstone with key {identity:?} in {topic}) and republish \
                 what follows the source's confirmed position"
            ),
        }
    }
}

impl std::fmt::Display for Definite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; to fix: {}", self.problem(), self.fix())
    }
}

impl std::error::Error for Definite {}

/// Where the events lost with a slot begin.
fn lost_after(confirmed: &Option<String>) -> String {
    confirmed.clone().unwrap_or_else(|| {
        "its last confirmed position (`outbox-relay status` shows it)".to_owned()
    })
}

/// Puts the table back into the publication whole (no row filter, every column).
fn readd(quoted: &str, table: &str) -> String {
    format!(
        "BEGIN; ALTER PUBLICATION {quoted} DROP TABLE {table}; ALTER PUBLICATION {quoted} ADD TABLE {table}; COMMIT"
    )
}

/// A SQL identifier, quoted.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An error with its causes, one line, each cause once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Some errors (tokio-postgres's) already include their cause in their message.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
