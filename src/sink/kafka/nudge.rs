//! Sending what waits for `linger.ms` at once when the source has nothing more to give.
//!
//! `linger.ms` (5 ms by default) lets librdkafka fill batches from a backlog; without one it
//! is only delay, most of an event's commit-to-ack time at a few thousand events a second.
//! librdkafka treats linger as elapsed while a flush is under way, so when the pipeline has
//! taken every input the source had ready and the producer holds few records, a thread of its
//! own flushes for a moment ([`HOLD_MS`], at most once per [`EVERY`]): what waits is sent now,
//! and what is produced meanwhile too. Draining a backlog, the source has input ready or the
//! producer holds many records, nobody asks, and batches fill as configured. Above
//! [`NUDGE_UP_TO_RATE`] records a second nobody asks either: there each nudge is a produce
//! request more for the broker and wake-ups for the relay, where linger's batches are what
//! keeps both of them from saturating the machine. An operator's own `linger.ms` is left alone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};

/// How long one nudge holds librdkafka's flushing state at most (milliseconds; it ends sooner
/// once every record in the producer is acknowledged). What is produced meanwhile goes out
/// at once too.
const HOLD_MS: i32 = 1;

/// At most one nudge per this long: a request per record costs the broker more than the
/// linger saves (in the benchmark at 5,000 events/s a flush held 10 ms and repeated at once
/// doubled the p99 now and then; one every 2 ms took the p50 from 4.2 to 1.3 ms and the p99
/// from 10 to 6.6 ms).
const EVERY: Duration = Duration::from_millis(2);

/// Below this many records in the producer (queued or awaiting acks) the pipeline may nudge:
/// 5,000 events/s keeps a few dozen; draining a backlog keeps thousands, and linger fills
/// batches as configured.
pub(super) const NUDGE_BELOW: i32 = 100;

/// Above this many records a second (measured over [`RATE_WINDOW`]) the pipeline does not
/// nudge. In the benchmark at 20,000 events/s (one per transaction) nudges took the relay from
/// 9.4 to 16.6 µs of CPU per event and the broker from 15.9 to 18.5, with the two cores nearly
/// full, for no gain in the median (6.2 ms either way); at 5,000 events/s they took the p99
/// from 9.9 to 4.9 ms.
pub(super) const NUDGE_UP_TO_RATE: u64 = 10_000;

/// How long the rate that decides whether to nudge is counted over.
const RATE_WINDOW: Duration = Duration::from_millis(20);

/// The nudging thread of one producer; stopped and joined on drop.
pub(super) struct Nudge {
    flags: Arc<Flags>,
    thread: Option<JoinHandle<()>>,
    rate: Rate,
}

/// The producer's recent rate, counted on the pipeline's side: records produced, and where the
/// current window started.
struct Rate {
    epoch: Instant,
    produced: AtomicU64,
    /// Microseconds since `epoch` at the start of the current window.
    window_start_us: AtomicU64,
    /// `produced` at the start of the current window.
    window_produced: AtomicU64,
    /// The last full window ran above [`NUDGE_UP_TO_RATE`].
    fast: AtomicBool,
}

impl Rate {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            produced: AtomicU64::new(0),
            window_start_us: AtomicU64::new(0),
            window_produced: AtomicU64::new(0),
            fast: AtomicBool::new(false),
        }
    }

    /// Whether records went out faster than [`NUDGE_UP_TO_RATE`] in the last full window;
    /// starts the next window when the current one is over.
    fn fast(&self) -> bool {
        let now_us = self.epoch.elapsed().as_micros() as u64;
        let start_us = self.window_start_us.load(Ordering::Relaxed);
        let elapsed_us = now_us.saturating_sub(start_us);
        if elapsed_us >= RATE_WINDOW.as_micros() as u64 {
            let produced = self.produced.load(Ordering::Relaxed);
            let in_window = produced.saturating_sub(self.window_produced.load(Ordering::Relaxed));
            // A window the pipeline slept through (no request for a while) counts as slow.
            let fast = in_window * 1_000_000 > NUDGE_UP_TO_RATE * elapsed_us;
            self.fast.store(fast, Ordering::Relaxed);
            self.window_start_us.store(now_us, Ordering::Relaxed);
            self.window_produced.store(produced, Ordering::Relaxed);
        }
        self.fast.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Flags {
    requested: AtomicBool,
    stop: AtomicBool,
}

impl Nudge {
    /// Starts the thread for `producer`.
    pub(super) fn start<C: ProducerContext + 'static>(producer: &ThreadedProducer<C>) -> Self {
        let flags = Arc::new(Flags::default());
        let producer = producer.clone();
        let thread_flags = Arc::clone(&flags);
        let thread = std::thread::Builder::new()
            .name("kafka-nudge".into())
            .spawn(move || run(&producer, &thread_flags))
            .ok();
        Self {
            flags,
            thread,
            rate: Rate::new(),
        }
    }

    /// Counts a record handed to the producer (for the rate above which nobody nudges).
    pub(super) fn produced(&self) {
        self.rate.produced.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks for a nudge; cheap when one is already asked for or under way, and nothing when
    /// records go out faster than [`NUDGE_UP_TO_RATE`].
    pub(super) fn request(&self) {
        if self.rate.fast() {
            return;
        }
        if !self.flags.requested.swap(true, Ordering::AcqRel) {
            if let Some(thread) = &self.thread {
                thread.thread().unpark();
            }
        }
    }
}

fn run<C: ProducerContext + 'static>(producer: &ThreadedProducer<C>, flags: &Flags) {
    loop {
        while !flags.requested.swap(false, Ordering::AcqRel) {
            if flags.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::park();
        }
        if flags.stop.load(Ordering::Acquire) {
            return;
        }
        let started = Instant::now();
        // SAFETY: the handle lives as long as `producer`, which this thread holds a clone
        // of; rd_kafka_flush may be called from any thread, and with delivery reports as
        // events (as rdkafka sets it up) it only waits, never serving them here.
        unsafe {
            rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), HOLD_MS);
        }
        if let Some(rest) = (started + EVERY).checked_duration_since(Instant::now()) {
            std::thread::sleep(rest);
        }
    }
}

impl Drop for Nudge {
    fn drop(&mut self) {
        self.flags.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::config::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
    use rdkafka::ClientContext;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Default, Clone)]
    struct Delivered(Arc<AtomicUsize>);
    impl ClientContext for Delivered {}
    impl ProducerContext for Delivered {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            if result.is_ok() {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Waits up to `within` for `delivered` to reach `n`, asking `nudge` (if any) now and
    /// then meanwhile, as the pipeline does while the source has nothing ready.
    fn delivered_within(
        delivered: &Delivered,
        n: usize,
        nudge: Option<&Nudge>,
        within: Duration,
    ) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if delivered.0.load(Ordering::SeqCst) >= n {
                return true;
            }
            if let Some(nudge) = nudge {
                nudge.request();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// A producer on a mock cluster whose records wait a minute for linger, with its
    /// delivery count; the caller keeps the cluster until the producer is dropped.
    fn lingering_a_minute() -> (
        MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        Delivered,
        ThreadedProducer<Delivered>,
    ) {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let delivered = Delivered::default();
        let producer: ThreadedProducer<Delivered> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "60000")
            .create_with_context(delivered.clone())
            .expect("producer");
        (cluster, delivered, producer)
    }

    /// With a linger of a minute a record waits; a nudge sends it at once.
    #[test]
    fn a_nudge_sends_what_waits_for_linger() {
        let (_cluster, delivered, producer) = lingering_a_minute();
        let nudge = Nudge::start(&producer);

        producer
            .send(BaseRecord::<(), str, ()>::to("t").payload("first"))
            .map_err(|(e, _)| e)
            .expect("queued");
        assert!(
            !delivered_within(&delivered, 1, None, Duration::from_secs(2)),
            "sent before any nudge: the linger is not what holds it"
        );
        assert!(
            delivered_within(&delivered, 1, Some(&nudge), Duration::from_secs(20)),
            "a nudge sends it"
        );
        // Also after the thread went back to waiting.
        producer
            .send(BaseRecord::<(), str, ()>::to("t").payload("second"))
            .map_err(|(e, _)| e)
            .expect("queued");
        assert!(
            delivered_within(&delivered, 2, Some(&nudge), Duration::from_secs(20)),
            "a second nudge sends the next"
        );
        drop(nudge);
    }

    /// While records go out faster than the rate, requests send nothing; once the rate
    /// falls, the next request sends what waits.
    #[test]
    fn above_the_rate_nobody_nudges() {
        let (_cluster, delivered, producer) = lingering_a_minute();
        let nudge = Nudge::start(&producer);

        // 100,000 records every 5 ms as far as the rate knows: above it unless a loop takes
        // 10 s. The record goes in once the rate is known (the first window may nudge), then
        // waits.
        let started = Instant::now();
        let mut queued = false;
        while started.elapsed() < Duration::from_secs(2) {
            for _ in 0..100_000 {
                nudge.produced();
            }
            nudge.request();
            if !queued && started.elapsed() > Duration::from_millis(500) {
                producer
                    .send(BaseRecord::<(), str, ()>::to("t").payload("waits"))
                    .map_err(|(e, _)| e)
                    .expect("queued");
                queued = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            delivered.0.load(Ordering::SeqCst),
            0,
            "a request above the rate sent what waits for linger"
        );
        assert!(
            delivered_within(&delivered, 1, Some(&nudge), Duration::from_secs(20)),
            "once the rate fell, a nudge sends it"
        );
    }
}
