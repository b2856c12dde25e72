//! Exactly once at the start of a session: the relay's identity, and resuming after the
//! progress recorded in Kafka (`docs/EXACTLY-ONCE.md`).

use super::error::SessionError;
use crate::checkpoint::Progress;
use crate::config::{Config, SourceMode};
use crate::error::Definite;
use crate::sink::kafka::Recorded;
use crate::source::{Session, Source, SourceError};

/// Who this relay is, the same for every relay that serves the same source: the database
/// cluster's system identifier (so a restored copy or another cluster is someone else) and
/// the slot (logical) or the database and table (polling). The progress record's key; the
/// `transactional.id` is derived from it.
pub(super) async fn identity(session: &Session) -> Result<String, SessionError> {
    let client = session.pool.get().await.map_err(SourceError::pool)?;
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|source| SourceError::Postgres {
            context: "reading the system identifier",
            source,
        })?;
    let (system, database): (String, String) = (row.get(0), row.get(1));
    Ok(identity_of(&session.config, &system, &database))
}

fn identity_of(cfg: &Config, system: &str, database: &str) -> String {
    match cfg.source.mode {
        SourceMode::Logical => format!("{system}/slot/{}", cfg.source.slot),
        SourceMode::Polling => format!("{system}/{database}/polling/{}", cfg.source.table),
    }
}

/// Has `source` skip what the progress `recorded` covers; fails when the source stands past
/// it (confirmed beyond what was recorded as published: events may be missing from Kafka).
/// Returns where the session starts: everything before it is in Kafka.
pub(super) fn resume<S: Source>(
    source: &mut S,
    recorded: Option<Recorded<S::Position>>,
    identity: &str,
    cfg: &Config,
) -> Result<S::Position, SessionError> {
    let start = source.start_position();
    let Some(Recorded {
        position: recorded,
        partial,
    }) = recorded
    else {
        tracing::info!(identity, from = %start.to_progress(), "no progress recorded yet: exactly-once delivery starts from the source's position");
        return Ok(start);
    };
    if start > recorded {
        return Err(SourceError::from(Definite::SourceAheadOfProgress {
            identity: identity.to_owned(),
            position: start.to_progress(),
            recorded: recorded.to_progress(),
            topic: cfg.kafka.progress_topic.clone(),
        })
        .into());
    }
    tracing::info!(
        identity,
        from = %start.to_progress(),
        recorded = %recorded.to_progress(),
        partial = ?partial.map(|(key, n)| format!("{} events of {}", n, key.to_progress())),
        "resuming after the recorded progress"
    );
    source.skip_through(recorded, partial);
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_names_the_cluster_and_the_slot_or_table() {
        let mut cfg = Config::default();
        assert_eq!(identity_of(&cfg, "7301", "app"), "7301/slot/outbox_relay");
        cfg.source.mode = SourceMode::Polling;
        assert_eq!(
            identity_of(&cfg, "7301", "app"),
            "7301/app/polling/outbox.events"
        );
    }
}
