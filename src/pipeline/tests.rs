//! The pipeline with a fake source and a fake sink: the delivery contract without Postgres
//! or a broker.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Pipeline, SessionError, Sink};
use crate::checkpoint::{UnitId, Watermark};
use crate::config::{Config, OnInvalid};
use crate::error::Definite;
use crate::metrics::Metrics;
use crate::route::{OutboxEvent, Routed, Router};
use crate::sink::kafka::SinkError;
use crate::source::{Publish, Session, Source, SourceError};

/// What the fake source reads, one step at a time.
#[derive(Debug)]
enum Step {
    Begin,
    Event(&'static str),
    Commit(u64),
    /// An event only the operator can fix: the session halts on it.
    Invalid,
    /// A keepalive: everything up to here has been read.
    Idle(u64),
}

/// What the fake source was told.
#[derive(Debug, Default)]
struct SourceLog {
    /// Every position confirmed, in order.
    confirmed: Vec<u64>,
    finished: bool,
    settled: bool,
    aborted: bool,
    stopped: bool,
}

impl SourceLog {
    fn last(&self) -> u64 {
        self.confirmed.iter().copied().max().unwrap_or(0)
    }
}

struct FakeSource {
    steps: mpsc::UnboundedReceiver<Step>,
    open: Option<UnitId>,
    log: Arc<Mutex<SourceLog>>,
    lost: CancellationToken,
}

impl FakeSource {
    fn confirmed(&mut self, acked: Option<u64>) {
        if let Some(position) = acked {
            self.log.lock().unwrap().confirmed.push(position);
        }
    }
}

impl Source for FakeSource {
    type Position = u64;
    type Input = Step;

    async fn prepare(_: &Session, _: &CancellationToken) -> Result<Self, SourceError> {
        unreachable!("the tests build the fake source themselves")
    }

    fn start_position(&self) -> u64 {
        0
    }

    fn skip_through(&mut self, _: u64, _: Option<(u64, u64)>) {}

    fn start(&mut self, _: &Session) {}

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    fn lost_error(&self) -> SourceError {
        SourceError::StreamLost
    }

    async fn next(&mut self) -> Result<Step, SourceError> {
        match self.steps.recv().await {
            Some(step) => Ok(step),
            None => std::future::pending().await,
        }
    }

    async fn pump<W: Publish<u64> + Send>(
        &mut self,
        step: Step,
        out: &mut W,
    ) -> Result<(), W::Error> {
        match step {
            Step::Begin => self.open = Some(out.open(Some(Instant::now()))),
            Step::Event(id) => {
                let unit = self.open.expect("an event inside a transaction");
                out.publish(unit, event(id)).await?;
            }
            Step::Commit(end) => {
                let unit = self.open.take().expect("a commit ends a transaction");
                out.seal(unit, end);
            }
            Step::Invalid => {
                return Err(SourceError::from(Definite::InvalidEvent {
                    id: "bad".into(),
                    reason: "invalid_payload".into(),
                    error: "not JSON".into(),
                })
                .into())
            }
            Step::Idle(position) => out.idle_at(position),
        }
        Ok(())
    }

    fn at_boundary(&self) -> bool {
        self.open.is_none()
    }

    async fn confirm(&mut self, acked: Option<u64>) -> Result<(), SourceError> {
        self.confirmed(acked);
        Ok(())
    }

    async fn finish(&mut self, watermark: &Watermark<u64>) -> Result<(), SourceError> {
        let acked = watermark.lock().take_confirmable();
        self.confirmed(acked);
        self.log.lock().unwrap().finished = true;
        Ok(())
    }

    async fn settle(&mut self, watermark: &Watermark<u64>) {
        let acked = watermark.lock().take_confirmable();
        self.confirmed(acked);
        self.log.lock().unwrap().settled = true;
    }

    async fn stop(&mut self) {
        self.log.lock().unwrap().stopped = true;
    }

    fn abort(&mut self) {
        self.log.lock().unwrap().aborted = true;
    }
}

fn event(id: &'static str) -> OutboxEvent<'static> {
    OutboxEvent {
        id: Some(id),
        aggregate_type: Some("order"),
        aggregate_id: Some("o-1"),
        event_type: Some("created"),
        payload: Some(Cow::Borrowed(b"{}")),
        headers: None,
        timestamp_ms: Some(0),
        pg_lsn: None,
    }
}

/// The fake broker: what was sent, and the acks it holds back.
#[derive(Debug, Default)]
struct Broker {
    /// Event ids in the order they were sent, with their units.
    sent: Vec<(UnitId, String)>,
    /// Units of records sent and not acknowledged yet.
    held: Vec<UnitId>,
    /// Acknowledge each record as it is sent.
    auto_ack: bool,
    /// The event whose send fails.
    fail_on: Option<&'static str>,
    /// The event the sink refuses for good (the dead-letter topic would not take it).
    refuse_on: Option<&'static str>,
    purged: bool,
}

struct FakeSink {
    broker: Arc<Mutex<Broker>>,
    watermark: Arc<Watermark<u64>>,
}

impl Sink<u64> for FakeSink {
    type Refused = ();

    async fn send(&mut self, unit: UnitId, routed: Routed<'_>) -> Result<(), SinkError> {
        let Routed::Publish(record) = routed else {
            panic!("only valid events in these tests");
        };
        let id = String::from_utf8_lossy(record.header("id").unwrap_or_default()).into_owned();
        let mut broker = self.broker.lock().unwrap();
        if broker.fail_on == Some(id.as_str()) {
            return Err(SinkError::Delivery(format!("{id} refused")));
        }
        if broker.refuse_on == Some(id.as_str()) {
            return Err(SinkError::Definite(Definite::DeadLetterRefused {
                topic: "dlq".into(),
                error: format!("{id} too large"),
            }));
        }
        self.watermark.lock().add(unit);
        broker.sent.push((unit, id));
        if broker.auto_ack {
            self.watermark.lock().ack(unit);
        } else {
            broker.held.push(unit);
        }
        Ok(())
    }

    async fn refused(&mut self) -> Option<()> {
        std::future::pending().await
    }

    async fn redirect(&mut self, (): (), _: &Router) -> Result<(), SinkError> {
        Ok(())
    }

    fn failure(&self) -> Option<String> {
        None
    }

    /// Kafka acknowledges everything in flight.
    async fn drain(&mut self, _: &Router, _: Instant) -> Result<(), SinkError> {
        let held: Vec<UnitId> = self.broker.lock().unwrap().held.drain(..).collect();
        for unit in held {
            self.watermark.lock().ack(unit);
        }
        Ok(())
    }

    fn queue_depth(&self) -> i32 {
        self.broker.lock().unwrap().held.len() as i32
    }

    fn purge(&self) {
        let mut broker = self.broker.lock().unwrap();
        broker.purged = true;
        broker.held.clear();
    }
}

struct Harness {
    steps: mpsc::UnboundedSender<Step>,
    broker: Arc<Mutex<Broker>>,
    log: Arc<Mutex<SourceLog>>,
    watermark: Arc<Watermark<u64>>,
    shutdown: CancellationToken,
    lost: CancellationToken,
    session: JoinHandle<Result<(), SessionError>>,
}

impl Harness {
    fn start(broker: Broker) -> Self {
        let (steps, rx) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(SourceLog::default()));
        let broker = Arc::new(Mutex::new(broker));
        let watermark = Arc::new(Watermark::new());
        let cfg = Config::default();
        let router = Router::new(
            &cfg.kafka.topic_template().unwrap(),
            &cfg.kafka.dead_letter_topic,
            1_000_000,
        );
        let lost = CancellationToken::new();
        let source = FakeSource {
            steps: rx,
            open: None,
            log: Arc::clone(&log),
            lost: lost.clone(),
        };
        let sink = FakeSink {
            broker: Arc::clone(&broker),
            watermark: Arc::clone(&watermark),
        };
        let mut pipeline = Pipeline::new(
            source,
            sink,
            Arc::clone(&watermark),
            router,
            OnInvalid::Halt,
            Metrics::new(),
        );
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let session = tokio::spawn(async move {
            let result = pipeline.run(&stop).await;
            pipeline.end(&result).await;
            result
        });
        Self {
            steps,
            broker,
            log,
            watermark,
            shutdown,
            lost,
            session,
        }
    }

    fn feed(&self, steps: impl IntoIterator<Item = Step>) {
        for step in steps {
            self.steps.send(step).unwrap();
        }
    }

    fn sent(&self) -> Vec<String> {
        let broker = self.broker.lock().unwrap();
        broker.sent.iter().map(|(_, id)| id.clone()).collect()
    }

    fn unit_of(&self, id: &str) -> UnitId {
        let broker = self.broker.lock().unwrap();
        broker.sent.iter().find(|(_, e)| e == id).unwrap().0
    }

    fn ack(&self, id: &str) {
        let unit = self.unit_of(id);
        self.broker.lock().unwrap().held.retain(|u| *u != unit);
        self.watermark.lock().ack(unit);
    }

    fn confirmed(&self) -> u64 {
        self.log.lock().unwrap().last()
    }

    async fn until(&self, what: &str, condition: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn ended(mut self) -> (Result<(), SessionError>, Self) {
        let result = tokio::time::timeout(Duration::from_secs(10), &mut self.session)
            .await
            .expect("the session ends")
            .expect("no panic");
        (result, self)
    }
}

#[tokio::test]
async fn out_of_order_acks_confirm_only_a_contiguous_run() {
    let h = Harness::start(Broker::default());
    h.feed([
        Step::Begin,
        Step::Event("a"),
        Step::Commit(10),
        Step::Begin,
        Step::Event("b"),
        Step::Commit(20),
    ]);
    h.until("both sent", |h| h.sent().len() == 2).await;
    h.ack("b");
    // Several ticks pass: the later transaction is acknowledged, the earlier is not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.confirmed(),
        0,
        "nothing confirmed past an unacknowledged event"
    );
    h.ack("a");
    h.until("both confirmed", |h| h.confirmed() == 20).await;
    h.shutdown.cancel();
    let (result, h) = h.ended().await;
    result.unwrap();
    let log = h.log.lock().unwrap();
    assert!(log.finished && log.stopped && !log.settled && !log.aborted);
    assert!(!h.broker.lock().unwrap().purged);
    assert!(log.confirmed.windows(2).all(|w| w[0] <= w[1]), "{log:?}");
}

#[tokio::test]
async fn a_failure_mid_transaction_confirms_nothing_of_it() {
    let h = Harness::start(Broker {
        auto_ack: true,
        fail_on: Some("c"),
        ..Broker::default()
    });
    h.feed([Step::Begin, Step::Event("a"), Step::Commit(10)]);
    h.until("the first transaction confirmed", |h| h.confirmed() == 10)
        .await;
    h.feed([
        Step::Begin,
        Step::Event("b"),
        Step::Event("c"),
        Step::Commit(20),
    ]);
    let (result, h) = h.ended().await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, SessionError::Sink(SinkError::Delivery(_))),
        "{error}"
    );
    assert!(!error.is_definite());
    assert_eq!(h.sent(), ["a", "b"]);
    let log = h.log.lock().unwrap();
    assert_eq!(log.last(), 10, "nothing of the failed transaction");
    assert!(!log.finished && !log.settled && log.aborted && log.stopped);
    assert!(h.broker.lock().unwrap().purged, "the rest is resent");
}

#[tokio::test]
async fn shutdown_mid_transaction_finishes_it_drains_and_confirms() {
    let h = Harness::start(Broker::default());
    h.feed([Step::Begin, Step::Event("a")]);
    h.until("the first event sent", |h| h.sent().len() == 1)
        .await;
    h.shutdown.cancel();
    // The transaction is open: the session waits for its end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!h.session.is_finished(), "stopped inside a transaction");
    h.feed([
        Step::Event("b"),
        Step::Commit(10),
        Step::Begin,
        Step::Event("c"),
        Step::Commit(20),
    ]);
    let (result, h) = h.ended().await;
    result.unwrap();
    assert_eq!(
        h.sent(),
        ["a", "b"],
        "each event once, nothing past the boundary"
    );
    let log = h.log.lock().unwrap();
    assert!(log.finished && !log.aborted);
    assert_eq!(log.last(), 10, "the drained transaction is confirmed");
    assert!(!h.broker.lock().unwrap().purged);
}

#[tokio::test]
async fn halt_confirms_what_was_acknowledged_and_nothing_past_the_cause() {
    let h = Harness::start(Broker::default());
    h.feed([
        Step::Begin,
        Step::Event("a"),
        Step::Commit(10),
        Step::Begin,
        Step::Event("b"),
        Step::Commit(20),
        Step::Begin,
        Step::Event("c"),
        Step::Invalid,
        Step::Event("d"),
        Step::Commit(30),
    ]);
    let (result, h) = h.ended().await;
    let error = result.unwrap_err();
    assert!(error.is_definite(), "{error}");
    assert_eq!(h.sent(), ["a", "b", "c"], "nothing read past the cause");
    let log = h.log.lock().unwrap();
    assert!(log.settled && !log.finished && log.aborted);
    assert_eq!(
        log.last(),
        20,
        "everything before the cause's transaction, drained and confirmed"
    );
}

/// The sink's definite fault reaches the pipeline through the source unchanged: the session
/// halts as on the source's own (drains, confirms what precedes the cause); another sink
/// fault only ends it (`a_failure_mid_transaction_confirms_nothing_of_it`).
#[tokio::test]
async fn a_sink_fault_for_good_halts_like_a_definite_source_error() {
    let h = Harness::start(Broker {
        refuse_on: Some("c"),
        ..Broker::default()
    });
    h.feed([
        Step::Begin,
        Step::Event("a"),
        Step::Commit(10),
        Step::Begin,
        Step::Event("b"),
        Step::Event("c"),
        Step::Commit(20),
    ]);
    let (result, h) = h.ended().await;
    let error = result.unwrap_err();
    assert!(
        matches!(
            error,
            SessionError::Sink(SinkError::Definite(Definite::DeadLetterRefused { .. }))
        ),
        "{error}"
    );
    assert!(error.is_definite(), "{error}");
    assert_eq!(h.sent(), ["a", "b"]);
    let log = h.log.lock().unwrap();
    assert!(log.settled && !log.finished && log.aborted && log.stopped);
    assert_eq!(
        log.last(),
        10,
        "what precedes the cause's transaction, drained and confirmed"
    );
}

#[tokio::test]
async fn an_idle_position_is_confirmed_only_with_nothing_pending() {
    let h = Harness::start(Broker::default());
    h.feed([Step::Idle(5)]);
    h.until("the idle position confirmed", |h| h.confirmed() == 5)
        .await;
    h.feed([
        Step::Begin,
        Step::Event("a"),
        Step::Commit(10),
        Step::Idle(15),
    ]);
    h.until("the event sent", |h| h.sent().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.confirmed(), 5, "an event is pending");
    h.ack("a");
    h.until("the transaction confirmed", |h| h.confirmed() == 10)
        .await;
    h.feed([Step::Idle(15)]);
    h.until("the idle position confirmed", |h| h.confirmed() == 15)
        .await;
    h.shutdown.cancel();
    h.ended().await.0.unwrap();
}

#[tokio::test]
async fn a_lost_source_ends_the_session_and_drops_what_is_in_flight() {
    let h = Harness::start(Broker::default());
    h.feed([Step::Begin, Step::Event("a"), Step::Commit(10)]);
    h.until("the event sent", |h| h.sent().len() == 1).await;
    h.lost.cancel();
    let (result, h) = h.ended().await;
    assert!(matches!(
        result,
        Err(SessionError::Source(SourceError::StreamLost))
    ));
    assert_eq!(h.confirmed(), 0, "nothing acknowledged, nothing confirmed");
    let log = h.log.lock().unwrap();
    assert!(log.aborted && !log.settled && !log.finished);
    assert!(h.broker.lock().unwrap().purged);
}
