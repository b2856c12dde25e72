//! Exactly-once delivery (`kafka.delivery = "exactly-once"`): the sink's records go out in
//! Kafka transactions, each ending with the relay's progress record, so the records and the
//! position they bring the relay to commit together or not at all.
//!
//! A transaction begins with the first record after the last commit and is committed at a
//! source boundary (no source transaction half sent) once it is due ([`due`]): [`LINGER`]
//! old under light traffic, up to [`MAX_LINGER`] or [`MAX_RECORDS`] under load; inside a
//! source transaction only once it outgrew [`MAX_RECORDS`] or [`MAX_AGE`], recording how far
//! into that source transaction it got. Before the commit every record must be acknowledged
//! and every refused one dead-lettered, inside the transaction. Only then does the watermark release the covered
//! position to the source (`Checkpoint::release`). While idle nothing is committed, except a
//! progress-only transaction at most every [`IDLE_PROGRESS_EVERY`] when the source position
//! moved without events (so an idle outbox on a busy database does not pin WAL). See
//! `docs/EXACTLY-ONCE.md`.

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};

use super::error::SinkError;
use super::producer::KafkaSink;
use crate::checkpoint::Progress;
use crate::route::Router;

/// The delivery opaque of the progress record: it acknowledges no unit.
pub(super) const PROGRESS_OPAQUE: usize = usize::MAX;

/// A transaction open this long is committed at the next source boundary, unless it is busy
/// (see [`BUSY_RECORDS`]).
pub const LINGER: Duration = Duration::from_millis(100);

/// A transaction that reached [`LINGER`] holding at least this many records (a backlog, or
/// more than 10,000 events/s) goes on, up to [`MAX_LINGER`] or [`MAX_RECORDS`]: a commit stalls
/// production (the last records' acknowledgements, then the commit itself), which short
/// transactions under load would pay often. Light traffic keeps the short [`LINGER`]
/// (latency).
pub const BUSY_RECORDS: u64 = 1_000;

/// A busy transaction open this long is committed at the next source boundary.
pub const MAX_LINGER: Duration = Duration::from_millis(500);

/// A transaction holding this many records is committed at the next source boundary, or
/// inside a large source transaction at the next event.
pub const MAX_RECORDS: u64 = 100_000;

/// A transaction open this long inside a large source transaction is committed at the next
/// event, well within `transaction.timeout.ms`.
pub const MAX_AGE: Duration = Duration::from_secs(5);

/// While idle, the source position is recorded (and then confirmed) at most this often.
pub const IDLE_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How long one call of librdkafka's transactional API may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an abort may take: one that can't is left to the next `init_transactions`.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a commit waits for its records' acknowledgements.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a commit waits for them once shutdown was asked for: then the transaction is
/// aborted and its records are resent after the restart.
const FLUSH_TIMEOUT_ON_SHUTDOWN: Duration = Duration::from_secs(5);

/// Names a test failpoint: `before-commit` (records produced, progress record produced, the
/// commit not sent) or `after-commit` (committed, the source not yet confirmed). The relay
/// aborts the process there on the `N`th transaction (`before-commit:N`). Test-only.
pub const FAILPOINT_ENV: &str = "RELAY_TEST_FAILPOINT";

/// The transactional state of an exactly-once sink.
pub struct Transactions<P> {
    /// The relay's identity: the progress record's key and the `transactional.id`'s base.
    pub identity: String,
    /// The compacted progress topic.
    pub topic: String,
    encode: fn(&P) -> String,
    /// When the open transaction began, if one is open.
    began: Option<Instant>,
    /// Records produced in the open transaction.
    records: u64,
    /// The position the last committed transaction recorded.
    recorded: Option<P>,
    last_commit: Instant,
    committed: u64,
    failpoint: Option<(String, u64)>,
}

impl<P: Progress> Transactions<P> {
    pub fn new(identity: String, topic: String, recorded: Option<P>) -> Self {
        Self {
            identity,
            topic,
            encode: P::to_progress,
            began: None,
            records: 0,
            recorded,
            last_commit: Instant::now(),
            committed: 0,
            failpoint: failpoint(),
        }
    }
}

impl<P> Transactions<P> {
    /// The progress record's value: the position to confirm, and where a source transaction
    /// split across Kafka transactions stands.
    fn value(&self, position: &P, partial: Option<&(P, u64)>) -> String {
        let mut value = serde_json::json!({
            "position": (self.encode)(position),
            "identity": self.identity,
        });
        if let Some((key, events)) = partial {
            value["partial"] = serde_json::json!({
                "transaction": (self.encode)(key),
                "events": events,
            });
        }
        value.to_string()
    }

    fn reached(&self, point: &str) {
        if let Some((name, n)) = &self.failpoint {
            if name == point && self.committed + 1 == *n {
                tracing::error!(
                    failpoint = point,
                    "test failpoint reached: aborting the process"
                );
                std::process::abort();
            }
        }
    }
}

/// Whether a transaction open for `age` with `records` is committed at a source boundary.
fn due(age: Duration, records: u64) -> bool {
    records >= MAX_RECORDS || age >= MAX_LINGER || (age >= LINGER && records < BUSY_RECORDS)
}

/// `RELAY_TEST_FAILPOINT=name:N`, if set.
fn failpoint() -> Option<(String, u64)> {
    let text = std::env::var(FAILPOINT_ENV).ok()?;
    let (name, n) = text.split_once(':').unwrap_or((&text, "1"));
    Some((name.to_owned(), n.parse().ok()?))
}

/// A transactional API call failed while `context`.
fn txn_error(context: &'static str, error: &KafkaError) -> SinkError {
    SinkError::Transaction {
        context,
        error: error.to_string(),
    }
}

impl<P: Copy + Ord + Send + Sync + 'static> KafkaSink<P> {
    /// Exactly once: begins a transaction before the first record after a commit.
    pub(super) fn begin_if_needed(&mut self) -> Result<(), SinkError> {
        let Some(txn) = &mut self.txn else {
            return Ok(());
        };
        if txn.began.is_none() {
            self.producer
                .begin_transaction()
                .map_err(|e| txn_error("beginning a transaction", &e))?;
            txn.began = Some(Instant::now());
            txn.records = 0;
        }
        Ok(())
    }

    /// Counts a record produced in the open transaction.
    pub(super) fn count_in_transaction(&mut self) {
        if let Some(txn) = &mut self.txn {
            txn.records += 1;
        }
    }

    /// At a source boundary: commits the open transaction when it is due; while idle, records
    /// a moved source position now and then.
    pub async fn at_boundary(&mut self, router: &Router) -> Result<(), SinkError> {
        let Some(txn) = &self.txn else {
            return Ok(());
        };
        match txn.began {
            Some(began) if due(began.elapsed(), txn.records) => self.commit(router).await,
            Some(_) => Ok(()),
            None => {
                let moved = self.shared.checkpoint().covered() > txn.recorded;
                if moved && txn.last_commit.elapsed() >= IDLE_PROGRESS_EVERY {
                    self.begin_if_needed()?;
                    self.commit(router).await
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Inside a source transaction that outgrew the bounds ([`MAX_RECORDS`], [`MAX_AGE`]):
    /// commits, recording how far into it the relay got (`Checkpoint::partial`).
    pub async fn within_transaction(&mut self, router: &Router) -> Result<(), SinkError> {
        let Some(txn) = &self.txn else {
            return Ok(());
        };
        let Some(began) = txn.began else {
            return Ok(());
        };
        let oversized = txn.records >= MAX_RECORDS || began.elapsed() >= MAX_AGE;
        if oversized && self.shared.checkpoint().partial().is_some() {
            self.commit(router).await
        } else {
            Ok(())
        }
    }

    /// Commits the open transaction, if any: waits for every record's acknowledgement
    /// (dead-lettering refused ones inside it), appends the progress record for what the
    /// transaction covers, commits, and releases that position to the source. Only at a
    /// source boundary.
    pub async fn commit(&mut self, router: &Router) -> Result<(), SinkError> {
        let Some(began) = self.txn.as_ref().and_then(|t| t.began) else {
            return Ok(());
        };
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let mut shutdown_seen: Option<Instant> = None;
        loop {
            while let Some(refused) = self.try_refused() {
                self.redirect(refused, router).await?;
            }
            if self.shared.checkpoint().inflight() == 0 {
                break;
            }
            if let Some(failure) = self.shared.failure() {
                return Err(SinkError::Delivery(failure));
            }
            if self.stop.is_cancelled() {
                return Err(SinkError::LeadershipLost);
            }
            if self.shutdown.is_cancelled() {
                let seen = *shutdown_seen.get_or_insert_with(Instant::now);
                if seen.elapsed() >= FLUSH_TIMEOUT_ON_SHUTDOWN {
                    return Err(SinkError::Transaction {
                        context: "waiting for the transaction's acknowledgements at shutdown",
                        error: "Kafka acknowledged too slowly; the transaction is aborted and resent after the restart".into(),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(SinkError::Transaction {
                    context: "waiting for the transaction's acknowledgements",
                    error: "timed out".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let flushed = began.elapsed();
        let (covered, partial) = {
            let checkpoint = self.shared.checkpoint();
            (checkpoint.covered(), checkpoint.partial())
        };
        let Some(txn) = &self.txn else {
            return Ok(());
        };
        if let Some(position) = covered {
            let value = txn.value(&position, partial.as_ref());
            let headers = OwnedHeaders::new().insert(Header {
                key: "relay",
                value: Some("outbox-relay"),
            });
            let record = BaseRecord::with_opaque_to(&txn.topic, PROGRESS_OPAQUE)
                .key(&txn.identity)
                .payload(&value)
                .partition(0)
                .headers(headers);
            self.producer
                .send(record)
                .map_err(|(e, _)| txn_error("producing the progress record", &e))?;
        }
        txn.reached("before-commit");
        let producer = self.producer.clone();
        let result = tokio::task::spawn_blocking(move || {
            // The progress record must be out first: rdkafka's commit flushes by polling for
            // up to 100 ms at a time, events that the producer's own polling thread takes
            // away, so it would wait that long for nothing. Flushing in 1 ms steps sends the
            // record at once (librdkafka skips the linger while flushing).
            let deadline = Instant::now() + CALL_TIMEOUT;
            while producer.in_flight_count() > 0 && Instant::now() < deadline {
                let _ = producer.flush(Duration::from_millis(1));
            }
            producer.commit_transaction(CALL_TIMEOUT)
        })
        .await
        .map_err(|e| SinkError::Transaction {
            context: "committing",
            error: e.to_string(),
        })?;
        let metrics = &self.shared.metrics;
        if let Err(error) = result {
            self.abort().await;
            return Err(txn_error("committing", &error));
        }
        let Some(txn) = &mut self.txn else {
            return Ok(());
        };
        metrics.transactions.with_label_values(&["committed"]).inc();
        tracing::debug!(
            records = txn.records,
            flushed_ms = flushed.as_millis() as u64,
            committed_ms = began.elapsed().as_millis() as u64,
            "kafka transaction committed"
        );
        metrics
            .transaction_duration
            .observe(began.elapsed().as_secs_f64());
        metrics.transaction_records.observe(txn.records as f64);
        txn.began = None;
        txn.recorded = txn.recorded.max(covered);
        txn.last_commit = Instant::now();
        txn.reached("after-commit");
        txn.committed += 1;
        if let Some(position) = covered {
            self.shared.checkpoint().release(position);
            self.state.set_progress(Some((txn.encode)(&position)));
        }
        Ok(())
    }

    /// Aborts the open transaction, if any (best effort: a producer that can't is fenced or
    /// failed, and the next `init_transactions` with this identity aborts it anyway). Counted
    /// as aborted either way.
    pub async fn abort(&mut self) {
        let Some(txn) = &mut self.txn else {
            return;
        };
        if txn.began.take().is_none() {
            return;
        }
        self.shared
            .metrics
            .transactions
            .with_label_values(&["aborted"])
            .inc();
        self.producer
            .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        let producer = self.producer.clone();
        let aborted =
            tokio::task::spawn_blocking(move || producer.abort_transaction(ABORT_TIMEOUT)).await;
        match aborted {
            Ok(Ok(())) => tracing::info!("kafka transaction aborted"),
            Ok(Err(error)) => {
                tracing::warn!(error = %error, "cannot abort the kafka transaction; the next session's start aborts it")
            }
            Err(_) => {}
        }
    }

    /// True with `kafka.delivery = "exactly-once"`.
    pub fn is_transactional(&self) -> bool {
        self.txn.is_some()
    }

    /// The position the last committed transaction recorded, encoded.
    pub fn recorded(&self) -> Option<String> {
        let txn = self.txn.as_ref()?;
        txn.recorded.as_ref().map(|p| (txn.encode)(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn light_transactions_commit_soon_and_busy_ones_grow() {
        let ms = Duration::from_millis;
        assert!(!due(ms(50), 10), "young");
        assert!(due(ms(100), 10), "light traffic: latency first");
        assert!(!due(ms(100), 5_000), "busy: amortise the commit");
        assert!(due(ms(500), 5_000));
        assert!(due(ms(10), MAX_RECORDS));
    }
}
