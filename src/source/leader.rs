//! Polling mode's leader election: a session-level advisory lock held on a dedicated
//! connection.
//!
//! Several relays may poll one outbox; the one whose connection holds the lock publishes, the
//! others stand by and try again every second or two. The lock belongs to the server session,
//! so it frees the moment the leader's connection closes: a crashed leader's socket is closed
//! by its kernel and a standby takes over at its next try.
//!
//! The same connection carries what may only happen while the lock is held: `LISTEN` for the
//! insert notifications, and the cursor writes (a write on the connection that holds the lock
//! is the leader's by definition, so a relay that lost the lock cannot move the cursor). A
//! heartbeat on it every second finds a dead connection, and keeps the session's
//! `pg_stat_activity.state_change` fresh: a holder silent for [`STALE_HOLDER`] is a
//! connection that died without closing (a half-open network), and a standby terminates it
//! rather than wait hours for TCP keepalives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};
use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::config::Config;
use crate::error::{error_chain, Definite};
use crate::postgres::setup::pg;

/// The channel `outbox.notify_relay()` notifies (sql/outbox.sql).
pub const NOTIFY_CHANNEL: &str = "outbox_relay";

/// How often the leader proves its connection alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat unanswered this long means the connection (and so maybe the lock) is gone.
/// Well below [`STALE_HOLDER`], so a leader on a dead connection stops publishing before a
/// standby may take over.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(4);
/// A lock holder idle this long has missed ten heartbeats: its connection is dead.
const STALE_HOLDER: Duration = Duration::from_secs(10);
/// How long opening the dedicated connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shown in `pg_stat_activity`, so operators can tell who holds the lock.
const APPLICATION_NAME: &str = "outbox-relay-polling";

/// The advisory lock key for an outbox table: FNV-1a (64 bit) of `outbox-relay:<schema.table>`.
/// Stable across versions and platforms, so relays of every version agree on it.
pub fn lock_key(table: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in "outbox-relay:".bytes().chain(table.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// The lock, held for as long as this value lives; dropping it closes the connection, which
/// releases the lock.
pub struct Leadership {
    client: Arc<Client>,
    lost: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
    wake: Option<mpsc::Receiver<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Leadership {
    /// Opens the dedicated connection and takes the lock for `table`, then listens for
    /// notifications. `Err(LeaderBusy)` when another session holds it.
    pub async fn acquire(cfg: &Config) -> Result<Self, SourceError> {
        let table = cfg.source.table.clone();
        let key = lock_key(&table);
        let lost = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        let (wake_tx, wake_rx) = mpsc::channel(1);
        let (client, driver) = connect(cfg, wake_tx, lost.clone(), Arc::clone(&reason)).await?;
        let mut leadership = Self {
            client: Arc::new(client),
            lost,
            reason,
            wake: Some(wake_rx),
            tasks: vec![driver],
        };
        let locked: bool = leadership
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(pg("taking the leader lock"))?
            .get(0);
        if !locked {
            release_stale_holder(&leadership.client, key).await;
            return Err(SourceError::LeaderBusy { table });
        }
        leadership
            .client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .await
            .map_err(pg("listening for notifications"))?;
        leadership.tasks.push(tokio::spawn(heartbeat(
            Arc::clone(&leadership.client),
            leadership.lost.clone(),
            Arc::clone(&leadership.reason),
        )));
        Ok(leadership)
    }

    /// The connection that holds the lock: cursor writes go here.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Cancelled when the connection ends or stops answering: the session must stop.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Why the leadership was lost, as the session's error.
    pub fn lost_error(&self) -> SourceError {
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        SourceError::LeaderLost(reason.unwrap_or_else(|| "connection closed".into()))
    }

    /// The notifications: one message (coalesced) whenever new rows may have committed.
    pub fn take_wake(&mut self) -> mpsc::Receiver<()> {
        self.wake.take().unwrap_or_else(|| mpsc::channel(1).1)
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // Dropping the driver drops the connection: the server ends the session and frees
        // the lock at once.
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn note(reason: &Mutex<Option<String>>, text: String) {
    let mut slot = reason.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        *slot = Some(text);
    }
}

/// Opens the dedicated connection (TLS as `postgres.url` says) and spawns its driver.
async fn connect(
    cfg: &Config,
    wake: mpsc::Sender<()>,
    lost: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
) -> Result<(Client, JoinHandle<()>), SourceError> {
    let mut pg_config = cfg.postgres_config().map_err(|e| Definite::PostgresUrl {
        problem: e.to_string(),
    })?;
    pg_config.application_name(APPLICATION_NAME);
    let tls = cfg.postgres_tls().map_err(|e| Definite::PostgresTls {
        problem: e.to_string(),
    })?;
    let connector =
        crate::postgres::tls::make_tls_connect(&tls).map_err(|e| Definite::PostgresTls {
            problem: error_chain(&e),
        })?;
    let connecting = async {
        match connector {
            Some(connector) => {
                let (client, connection) = pg_config.connect(connector).await?;
                Ok((client, tokio::spawn(drive(connection, wake, lost, reason))))
            }
            None => {
                let (client, connection) = pg_config.connect(NoTls).await?;
                Ok((client, tokio::spawn(drive(connection, wake, lost, reason))))
            }
        }
    };
    Ok(tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| SourceError::Timeout("connecting the leader session"))?
        .map_err(pg("connecting the leader session"))?)
}

/// Drives the connection: forwards notifications as wake-ups; when the connection ends, the
/// lock is gone and `lost` says so.
async fn drive<S, T>(
    mut connection: Connection<S, T>,
    wake: mpsc::Sender<()>,
    lost: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(_))) => {
                // A full channel already holds a wake-up: one poll covers both.
                let _ = wake.try_send(());
            }
            Some(Ok(AsyncMessage::Notice(notice))) => {
                tracing::debug!(notice = %notice.message(), "postgres notice on the leader session");
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                note(&reason, error_chain(&e));
                break;
            }
            None => {
                note(&reason, "the server closed the connection".into());
                break;
            }
        }
    }
    lost.cancel();
}

/// Proves the connection alive every [`HEARTBEAT`]; cancels `lost` when it is not.
async fn heartbeat(
    client: Arc<Client>,
    lost: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
) {
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.batch_execute("SELECT 1")).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                note(&reason, error_chain(&e));
                break;
            }
            Err(_) => {
                note(
                    &reason,
                    format!(
                        "no answer to a heartbeat within {} s",
                        HEARTBEAT_TIMEOUT.as_secs()
                    ),
                );
                break;
            }
        }
    }
    lost.cancel();
}

/// Terminates the lock holder's session when it has been idle past [`STALE_HOLDER`]: a live
/// leader's heartbeat keeps it younger than that, so such a holder is a dead connection the
/// server has not noticed yet. Best effort: without the right to see or signal the holder,
/// the lock frees when the server's TCP keepalive gives up.
async fn release_stale_holder(client: &Client, key: i64) {
    let (classid, objid) = ((key >> 32) as u32, key as u32);
    let row = client
        .query_opt(
            "SELECT a.pid, a.state, extract(epoch FROM now() - a.state_change)::float8 \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid = $1 AND l.objid = $2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&classid, &objid],
        )
        .await;
    let Ok(Some(row)) = row else {
        return;
    };
    let pid: i32 = row.get(0);
    let state: Option<String> = row.get(1);
    let idle: Option<f64> = row.get(2);
    let Some(idle) = idle.filter(|_| state.as_deref() == Some("idle")) else {
        return;
    };
    if idle < STALE_HOLDER.as_secs_f64() {
        return;
    }
    match client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
    {
        Ok(_) => tracing::warn!(
            pid,
            idle_secs = idle as u64,
            "terminated the session holding the leader lock without heartbeats (a dead connection)"
        ),
        Err(e) => tracing::warn!(pid, error = %e, "cannot terminate the stale leader session"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_key_is_pinned_and_per_table() {
        // FNV-1a of "outbox-relay:outbox.events": relays of every version must agree, so
        // this value may never change.
        assert_eq!(lock_key("outbox.events"), -9_108_412_845_816_869_702);
        assert_ne!(lock_key("outbox.events"), lock_key("shop.outbox"));
    }
}
