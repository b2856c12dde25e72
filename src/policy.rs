//! The error policy: what the relay does when a session ends with an error
//! ([`SessionError`]: the source's fault or the sink's). One exhaustive `match` from error
//! kind to [`Directive`], over every kind of both, so a new kind of error cannot be added
//! without deciding it here.
//!
//! - **Retry**: a transient fault (a connection dropped, a timeout, Kafka unreachable). The
//!   session restarts from the confirmed position, with backoff; nothing is lost, and at worst
//!   some events are sent again.
//! - **Standby**: another relay holds the slot (logical) or the leader lock (polling). This
//!   relay stays ready and tries to take over every second or two.
//! - **Halt**: a [`Definite`] fault only the operator can fix. Retrying would only hide it, so
//!   the relay stays up, not ready, and says what is wrong and how to fix it.

use crate::error::Definite;
use crate::pipeline::SessionError;
use crate::sink::kafka::SinkError;
use crate::source::SourceError;

/// What to do after a session ended with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// Restart the session from the confirmed position, with backoff.
    Retry,
    /// Another relay leads: wait as a ready standby and try again soon.
    Standby,
    /// Stop and wait for the operator, who must apply `fix`.
    Halt { fix: String },
}

/// The directive for `error`.
pub fn directive(error: &SessionError) -> Directive {
    match error {
        SessionError::Source(SourceError::Definite(definite))
        | SessionError::Sink(SinkError::Definite(definite)) => halt(definite),
        SessionError::Source(SourceError::SlotBusy { .. } | SourceError::LeaderBusy { .. }) => {
            Directive::Standby
        }
        SessionError::Source(
            SourceError::LeaderLost(_)
            | SourceError::Postgres { .. }
            | SourceError::Pool(_)
            | SourceError::Replication(_)
            | SourceError::StreamEnded
            | SourceError::Timeout(_)
            | SourceError::StreamLost
            | SourceError::ServerStopping
            | SourceError::Decode(_),
        ) => Directive::Retry,
        SessionError::Sink(
            SinkError::Create(_)
            | SinkError::Produce(_)
            | SinkError::CreateTopic { .. }
            | SinkError::Delivery(_)
            | SinkError::Stopped(_)
            | SinkError::QueueFullAtShutdown
            | SinkError::LeadershipLost
            | SinkError::BatchTooLarge { .. }
            | SinkError::Transaction { .. },
        ) => Directive::Retry,
    }
}

fn halt(definite: &Definite) -> Directive {
    Directive::Halt {
        fix: definite.fix(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError;
    use rdkafka::error::KafkaError;

    /// What a row expects: the directive, and for a halt a part of its fix.
    #[derive(Debug)]
    enum Expect {
        Retry,
        Standby,
        Halt(&'static str),
    }

    fn postgres_error() -> tokio_postgres::Error {
        "port=not-a-number"
            .parse::<tokio_postgres::Config>()
            .expect_err("an invalid port")
    }

    fn kafka_error() -> KafkaError {
        KafkaError::ClientCreation("no brokers".into())
    }

    fn s(text: &str) -> String {
        text.to_owned()
    }

    /// Every kind of both sides: each variant of [`SourceError`] and of [`SinkError`] has a row.
    fn rows() -> Vec<(SessionError, Expect)> {
        let mut rows: Vec<_> = source_rows()
            .into_iter()
            .map(|(e, expect)| (SessionError::Source(e), expect))
            .collect();
        rows.extend(sink_rows());
        rows
    }

    fn sink_rows() -> Vec<(SessionError, Expect)> {
        use Expect::*;
        let sink = SessionError::Sink;
        vec![
            // Transient: resend from the confirmed position.
            (sink(SinkError::Create(kafka_error())), Retry),
            (sink(SinkError::Produce(kafka_error())), Retry),
            (
                sink(SinkError::CreateTopic {
                    topic: s("t"),
                    reason: s("denied"),
                }),
                Retry,
            ),
            (sink(SinkError::Delivery(s("timed out"))), Retry),
            (sink(SinkError::Stopped(s("t"))), Retry),
            (sink(SinkError::QueueFullAtShutdown), Retry),
            (sink(SinkError::LeadershipLost), Retry),
            (
                sink(SinkError::BatchTooLarge {
                    topic: s("t"),
                    cap: 1000,
                }),
                Retry,
            ),
            // The dead-letter topic refused a record for good: halt with the fix.
            (
                sink(SinkError::Definite(Definite::DeadLetterRefused {
                    topic: s("dlq"),
                    error: s("too large"),
                })),
                Halt("let the topic take it (its max.message.bytes, policy or ACLs)"),
            ),
        ]
    }

    fn source_rows() -> Vec<(SourceError, Expect)> {
        use Expect::*;
        let definite = |d: Definite| SourceError::Definite(d);
        vec![
            // Another relay leads.
            (SourceError::SlotBusy { slot: s("s") }, Standby),
            (SourceError::LeaderBusy { table: s("t") }, Standby),
            // Transient: resume from the confirmed position.
            (SourceError::LeaderLost(s("closed")), Retry),
            (
                SourceError::Postgres {
                    context: "reading",
                    source: postgres_error(),
                },
                Retry,
            ),
            (
                SourceError::Pool(deadpool_postgres::PoolError::Timeout(
                    deadpool_postgres::TimeoutType::Wait,
                )),
                Retry,
            ),
            (
                SourceError::Replication(PgWireError::Server(s("terminating connection"))),
                Retry,
            ),
            (SourceError::StreamEnded, Retry),
            (SourceError::Timeout("preparing the slot"), Retry),
            (SourceError::StreamLost, Retry),
            (SourceError::ServerStopping, Retry),
            (
                SourceError::Decode(crate::source::pgoutput::DecodeError::Empty),
                Retry,
            ),
            (
                definite(Definite::PostgresUrl {
                    problem: s("invalid"),
                }),
                Halt("set postgres.url to a valid libpq URL"),
            ),
            (
                definite(Definite::PostgresTls {
                    problem: s("no such file"),
                }),
                Halt("fix the TLS settings (sslmode, sslrootcert, sslcert, sslkey)"),
            ),
            (
                definite(Definite::SeveralServers { servers: 2 }),
                Halt("point postgres.url at the primary alone"),
            ),
            (
                definite(Definite::WalLevel {
                    level: s("replica"),
                }),
                Halt("set wal_level = logical in postgresql.conf"),
            ),
            (
                definite(Definite::PermissionDenied {
                    context: "creating the publication",
                    message: s("must be owner"),
                }),
                Halt("grant the relay's role the privileges in sql/roles.sql"),
            ),
            (
                definite(Definite::ReplicationLogin {
                    error: s("password authentication failed"),
                }),
                Halt("check the user and password in postgres.url"),
            ),
            (
                definite(Definite::ReplicationPrivilege {
                    error: s("permission denied"),
                }),
                Halt("grant REPLICATION to the relay's role"),
            ),
            (
                definite(Definite::NoReplicationRole),
                Halt("ALTER ROLE <relay role> REPLICATION"),
            ),
            (
                definite(Definite::CannotSelect {
                    table: s("\"outbox\".\"events\""),
                }),
                Halt("GRANT SELECT ON \"outbox\".\"events\" TO <relay role>"),
            ),
            (
                definite(Definite::StateTableRights),
                Halt("GRANT SELECT, INSERT, UPDATE ON outbox.relay_state"),
            ),
            (
                definite(Definite::CannotDelete { table: s("t") }),
                Halt("GRANT DELETE ON t TO <relay role>, or remove source.retention"),
            ),
            (
                definite(Definite::TableMissing { table: s("t") }),
                Halt("run `outbox-relay init` (it applies sql/outbox.sql) or set source.table"),
            ),
            (
                definite(Definite::ColumnMissing {
                    table: s("t"),
                    column: s("paylod"),
                    key: "payload",
                }),
                Halt("set source.columns.payload to the column's name"),
            ),
            (
                definite(Definite::ColumnGenerated {
                    table: s("t"),
                    column: s("payload"),
                    key: "payload",
                }),
                Halt("map source.columns.payload to a stored column"),
            ),
            (
                definite(Definite::ColumnLeftStream {
                    table: s("t"),
                    column: s("payload"),
                    key: "payload",
                    commit_lsn: s("0/16B3748"),
                }),
                Halt("point source.columns.payload at the column's new name"),
            ),
            (
                definite(Definite::TxidType {
                    table: s("t"),
                    found: s("integer"),
                }),
                Halt("make it xid8 NOT NULL DEFAULT pg_current_xact_id()"),
            ),
            (
                definite(Definite::PublicationMissing {
                    publication: s("p"),
                    quoted: s("\"p\""),
                    table: s("t"),
                    create_disabled: true,
                }),
                Halt(
                    "CREATE PUBLICATION \"p\" FOR TABLE t WITH (publish_via_partition_root = true)",
                ),
            ),
            (
                definite(Definite::PublicationMissingInStream {
                    error: s("publication \"p\" does not exist"),
                }),
                Halt("create the publication for the outbox table"),
            ),
            (
                definite(Definite::NoInserts {
                    publication: s("p"),
                    quoted: s("\"p\""),
                    publish: s("insert, update"),
                }),
                Halt("ALTER PUBLICATION \"p\" SET (publish = 'insert, update')"),
            ),
            (
                definite(Definite::NotViaRoot {
                    publication: s("p"),
                    quoted: s("\"p\""),
                    table: s("t"),
                }),
                Halt("ALTER PUBLICATION \"p\" SET (publish_via_partition_root = true)"),
            ),
            (
                definite(Definite::NotPublished {
                    publication: s("p"),
                    quoted: s("\"p\""),
                    table: s("t"),
                    needs_via_root: false,
                }),
                Halt("ALTER PUBLICATION \"p\" ADD TABLE t (or run `outbox-relay init`)"),
            ),
            (
                definite(Definite::NotPublished {
                    publication: s("p"),
                    quoted: s("\"p\""),
                    table: s("t"),
                    needs_via_root: true,
                }),
                Halt(
                    "ADD TABLE t; ALTER PUBLICATION \"p\" SET (publish_via_partition_root = true)",
                ),
            ),
            (
                definite(Definite::RowFilter {
                    publication: s("p"),
                    quoted: s("\"p\""),
                    table: s("t"),
                    filter: s("(id > 0)"),
                }),
                Halt("publish the whole table: BEGIN; ALTER PUBLICATION \"p\" DROP TABLE t"),
            ),
            (
                definite(Definite::ColumnList {
                    publication: s("p"),
                    quoted: s("\"p\""),
                    table: s("t"),
                    column: s("payload"),
                    key: "payload",
                }),
                Halt("publish every column: BEGIN; ALTER PUBLICATION \"p\" DROP TABLE t"),
            ),
            (
                definite(Definite::TableRecreated {
                    quoted: s("\"p\""),
                    table: s("t"),
                    was: 1,
                    now: s("2"),
                }),
                Halt("make sure publication \"p\" publishes the new table"),
            ),
            (
                definite(Definite::Readded {
                    publication: s("p"),
                    table: s("t"),
                }),
                Halt("inserts committed while it was out of the publication"),
            ),
            (
                definite(Definite::CoverageLost {
                    cause: Box::new(Definite::Readded {
                        publication: s("p"),
                        table: s("t"),
                    }),
                    held: s("0/16B3748"),
                }),
                Halt("inserts committed while it was out of the publication"),
            ),
            (
                definite(Definite::SlotMissing { slot: s("s") }),
                Halt("run `outbox-relay init`, or set source.create = true"),
            ),
            (
                definite(Definite::SlotVanished {
                    slot: s("s"),
                    position: s("0/16B3748"),
                }),
                Halt("DELETE FROM outbox.relay_state WHERE name = 's'"),
            ),
            (
                definite(Definite::SlotVanishedWhileStreaming { slot: s("s") }),
                Halt("see the README section \"A vanished slot\""),
            ),
            (
                definite(Definite::SlotLost {
                    slot: s("s"),
                    confirmed: Some(s("0/16B3748")),
                }),
                Halt("SELECT pg_drop_replication_slot('s')"),
            ),
            (
                definite(Definite::SlotPlugin {
                    slot: s("s"),
                    plugin: None,
                }),
                Halt("choose another source.slot, or drop that slot"),
            ),
            (
                definite(Definite::SlotOtherDatabase { slot: s("s") }),
                Halt("choose another source.slot for this database"),
            ),
            (
                definite(Definite::UnreadableLsn { text: s("x") }),
                Halt("report this as a bug"),
            ),
            (
                definite(Definite::StateTableMissing),
                Halt("run `outbox-relay init` (it applies sql/outbox.sql)"),
            ),
            (
                definite(Definite::CursorKind {
                    name: s("n"),
                    kind: s("logical-slot"),
                }),
                Halt("remove or rename that row"),
            ),
            (
                definite(Definite::CursorUnreadable {
                    name: s("n"),
                    position: s("x"),
                }),
                Halt("correct outbox.relay_state.position for \"n\""),
            ),
            (
                definite(Definite::CursorVanished { name: s("n") }),
                Halt("do not edit outbox.relay_state while a relay runs"),
            ),
            (
                definite(Definite::InvalidEvent {
                    id: s("e1"),
                    reason: s("invalid_headers"),
                    error: s("not an object"),
                }),
                Halt("set on_invalid = \"dead-letter\""),
            ),
            (
                definite(Definite::DeadLetterRefused {
                    topic: s("dlq"),
                    error: s("too large"),
                }),
                Halt("let the topic take it"),
            ),
        ]
    }

    #[test]
    fn each_kind_of_error_has_its_directive() {
        for (error, expect) in rows() {
            let got = directive(&error);
            match (&expect, &got) {
                (Expect::Retry, Directive::Retry) | (Expect::Standby, Directive::Standby) => {}
                (Expect::Halt(part), Directive::Halt { fix }) => {
                    assert!(fix.contains(part), "{error}: fix {fix:?} lacks {part:?}");
                    // The operator reads problem and fix in one line.
                    assert!(
                        error.to_string().ends_with(&format!("; to fix: {fix}")),
                        "{error}"
                    );
                }
                _ => panic!("{error}: expected {expect:?}, got {got:?}"),
            }
            assert_eq!(
                matches!(got, Directive::Halt { .. }),
                error.is_definite(),
                "{error}"
            );
        }
    }
}
