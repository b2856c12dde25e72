//! `kafka.delivery = "exactly-once"` against Apache Kafka: a `read_committed` consumer sees
//! every event exactly once, whatever happens to the relay (docs/EXACTLY-ONCE.md). A
//! `read_uncommitted` consumer of the same run sees the aborted records, so the checks can
//! fail.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use testkit::*;

const TOPIC: &str = "outbox.event.order";
const PARTITIONS: i32 = 3;
const COMMITTED: &str = "outbox_relay_kafka_transactions_total{outcome=\"committed\"}";
const ABORTED: &str = "outbox_relay_kafka_transactions_total{outcome=\"aborted\"}";

/// Postgres with the outbox schema and an Apache Kafka broker (transactions supported).
struct Eos {
    pg: ThrowawayPostgres,
    kafka: Kafka,
    /// Environment every relay of the test gets (the source mode).
    env: Vec<(&'static str, &'static str)>,
}

impl Eos {
    fn new() -> Self {
        Self::with_env(&[])
    }

    fn with_env(env: &[(&'static str, &'static str)]) -> Self {
        let pg = ThrowawayPostgres::start().expect("postgres starts");
        pg.psql("postgres", include_str!("../sql/outbox.sql"))
            .expect("schema applies");
        let kafka = Kafka::start();
        kafka.create_topic(TOPIC, PARTITIONS);
        Self {
            pg,
            kafka,
            env: env.to_vec(),
        }
    }

    fn psql(&self, sql: &str) -> String {
        self.pg.psql("postgres", sql).expect("sql runs")
    }

    /// The relay's config on `slot`, serving HTTP on `port`.
    fn config(&self, slot: &str, port: u16) -> String {
        relay_config(
            &self.pg.url("postgres"),
            &self.kafka.brokers(),
            slot,
            "outbox_relay",
            port,
        )
    }

    /// Starts an exactly-once relay with extra environment; waits until it is ready.
    fn relay(&self, env: &[(&str, &str)]) -> (Relay, u16) {
        let (mut relay, port) = self.start_relay(env);
        relay.wait_ready(port, Duration::from_secs(90));
        (relay, port)
    }

    /// Starts an exactly-once relay with extra environment, without waiting for it.
    fn start_relay(&self, env: &[(&str, &str)]) -> (Relay, u16) {
        let port = free_port().expect("free port");
        let mut all = vec![("OUTBOX_RELAY_KAFKA_DELIVERY", "exactly-once")];
        all.extend_from_slice(&self.env);
        all.extend_from_slice(env);
        (Relay::start(&self.config("outbox_relay", port), &all), port)
    }

    /// Commits `n` events in transactions of `per_tx`, payload `n` counting from `from`.
    fn write(&self, from: usize, n: usize, per_tx: usize) {
        let mut done = 0;
        while done < n {
            let k = per_tx.min(n - done);
            self.psql(&insert(from + done, k));
            done += k;
        }
    }

    /// Every event id in the outbox.
    fn ids(&self) -> HashSet<String> {
        self.psql("SELECT id::text FROM outbox.events")
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// How often a `read_committed` consumer sees each id of `TOPIC`, reading until it saw
    /// `expect` ids and every partition's end (or `timeout`).
    fn read_committed(&self, expect: usize, timeout: Duration) -> HashMap<String, usize> {
        read_ids(&self.kafka.brokers(), "read_committed", expect, timeout)
    }

    /// A `read_committed` consumer sees every event in the outbox exactly once (waiting up to
    /// `timeout`); `log` goes into the failure message.
    fn assert_every_event_once(&self, timeout: Duration, log: &str) {
        let expected = self.ids();
        let counts = self.read_committed(expected.len(), timeout);
        assert_exactly_once(&counts, &expected, log);
    }

    /// Waits (up to a minute) until a `read_committed` consumer has seen as many ids as the
    /// outbox holds events.
    fn wait_delivered(&self) {
        self.read_committed(self.ids().len(), Duration::from_secs(60));
    }

    fn slot_position(&self) -> String {
        self.psql(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
        )
        .trim()
        .to_owned()
    }
}

/// One transaction of `n` events with payloads `from..from+n`.
fn insert(from: usize, n: usize) -> String {
    format!(
        "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', 'agg-' || (g % 7), 'Happened', jsonb_build_object('n', g) \
         FROM generate_series({from}, {to}) AS g ORDER BY g",
        to = from + n - 1
    )
}

/// Reads `TOPIC` from the start with `isolation`, until every partition is at its end and at
/// least `expect` distinct ids were seen (or `timeout`): how often each id arrived.
fn read_ids(
    brokers: &str,
    isolation: &str,
    expect: usize,
    timeout: Duration,
) -> HashMap<String, usize> {
    read_topic_ids(brokers, TOPIC, isolation, expect, timeout)
}

/// [`read_ids`] for `topic` (with `PARTITIONS` partitions).
fn read_topic_ids(
    brokers: &str,
    topic: &str,
    isolation: &str,
    expect: usize,
    timeout: Duration,
) -> HashMap<String, usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", unique_name("eos"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&tpl).expect("assign");
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut at_end = vec![false; PARTITIONS as usize];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if counts.len() >= expect && at_end.iter().all(|e| *e) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                at_end[m.partition() as usize] = false;
                let id = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "id").and_then(|h| h.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .expect("every record has an id");
                *counts.entry(id).or_default() += 1;
            }
            Some(Err(KafkaError::PartitionEOF(p))) => at_end[p as usize] = true,
            _ => {}
        }
    }
    counts
}

/// Asserts that `counts` holds every id of `expected` exactly once and nothing else.
fn assert_exactly_once(counts: &HashMap<String, usize>, expected: &HashSet<String>, log: &str) {
    let lost: Vec<&String> = expected
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let foreign = counts.keys().filter(|id| !expected.contains(*id)).count();
    assert!(
        lost.is_empty() && duplicated.is_empty() && foreign == 0,
        "{} lost (e.g. {:?}), {} duplicated (e.g. {:?}), {foreign} unknown, of {} events\n{log}",
        lost.len(),
        lost.first(),
        duplicated.len(),
        duplicated.first(),
        expected.len()
    );
}

fn committed(port: u16) -> f64 {
    metric(port, COMMITTED).unwrap_or(0.0)
}

/// The relay exits (within `timeout`) at its `RELAY_TEST_FAILPOINT`.
fn exits_at_failpoint(relay: &mut Relay, timeout: Duration) {
    assert!(
        relay.wait_exit(timeout).is_some(),
        "the failpoint aborts the relay\n{}",
        relay.log_tail()
    );
}

#[test]
fn every_event_reaches_a_read_committed_consumer_once_across_a_sigterm() {
    let eos = Eos::new();
    let (mut relay, port) = eos.relay(&[]);
    eos.write(0, 500, 10);
    eos.assert_every_event_once(Duration::from_secs(60), &relay.log_tail());
    let status = status(port);
    assert_eq!(status["delivery"], "exactly-once", "{status}");
    assert!(status["recorded_progress"].is_string(), "{status}");
    assert!(committed(port) >= 1.0);
    let config = eos.config("outbox_relay", free_port().expect("free port"));
    let out = relay_cli(
        &["check"],
        &config,
        &[("OUTBOX_RELAY_KAFKA_DELIVERY", "exactly-once")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("kafka transactions: ok"), "{stdout}");
    // A graceful stop commits and confirms everything: the next relay skips nothing and
    // resends nothing.
    relay.sigterm();
    assert!(
        relay.wait_exit(Duration::from_secs(30)).is_some(),
        "{}",
        relay.log_tail()
    );
    let (relay, _) = eos.relay(&[]);
    eos.write(500, 300, 7);
    eos.assert_every_event_once(Duration::from_secs(60), &relay.log_tail());
}

/// A crash between producing a transaction's records and committing it: the records exist
/// (aborted), and the next relay sends them again in a transaction that commits.
#[test]
fn a_crash_before_the_commit_leaves_only_aborted_records() {
    let eos = Eos::new();
    let (mut relay, _) = eos.relay(&[("RELAY_TEST_FAILPOINT", "before-commit:1")]);
    eos.write(0, 200, 10);
    exits_at_failpoint(&mut relay, Duration::from_secs(60));
    let (relay, _) = eos.relay(&[]);
    eos.assert_every_event_once(Duration::from_secs(60), &relay.log_tail());
    assert_aborted_records_exist(&eos.kafka.brokers(), eos.ids().len());
}

/// A crash after the commit and before the slot is confirmed: the slot replays what is in
/// Kafka already, and the relay skips it by the recorded progress.
#[test]
fn a_crash_after_the_commit_skips_what_was_committed() {
    let eos = Eos::new();
    let (mut relay, _) = eos.relay(&[("RELAY_TEST_FAILPOINT", "after-commit:1")]);
    let slot_before = eos.slot_position();
    eos.write(0, 200, 10);
    exits_at_failpoint(&mut relay, Duration::from_secs(60));
    assert_eq!(
        eos.slot_position(),
        slot_before,
        "the slot was not confirmed past the committed transaction"
    );
    let (relay, _) = eos.relay(&[]);
    eos.assert_every_event_once(Duration::from_secs(60), &relay.log_tail());
    assert!(
        relay
            .log()
            .contains("skipped events already published exactly once"),
        "{}",
        relay.log_tail()
    );
}

/// kill -9 in a loop under a steady writer, with crashes at both failpoints among them: a
/// `read_committed` consumer sees every event once; a `read_uncommitted` one sees duplicates.
#[test]
fn kill9_in_a_loop_under_a_steady_writer_loses_and_duplicates_nothing() {
    crash_loop(Eos::new());
}

/// The same in polling mode: the progress is the `(txid, seq)` cursor.
#[test]
fn polling_kill9_in_a_loop_under_a_steady_writer_loses_and_duplicates_nothing() {
    crash_loop(Eos::with_env(&[("OUTBOX_RELAY_SOURCE_MODE", "polling")]));
}

fn crash_loop(eos: Eos) {
    // The slot exists before the writer starts: everything written is streamed.
    let (mut first, _) = eos.relay(&[]);
    first.kill9();
    let stop = AtomicBool::new(false);
    let written = AtomicUsize::new(0);
    let mut logs = String::new();
    std::thread::scope(|scope| {
        scope.spawn(|| steady_writer(&eos.pg, &stop, &written));
        let rounds: [&[(&str, &str)]; 6] = [
            &[],
            &[("RELAY_TEST_FAILPOINT", "before-commit:3")],
            &[],
            &[("RELAY_TEST_FAILPOINT", "after-commit:3")],
            &[],
            &[],
        ];
        for (round, env) in rounds.iter().enumerate() {
            let (mut relay, port) = eos.relay(env);
            if env.is_empty() {
                // Crash at a different point of the transaction cycle each round.
                let target = 2.0 + (round % 3) as f64;
                wait_until(Duration::from_secs(60), "transactions commit", || {
                    committed(port) >= target
                });
                relay.kill9();
            } else {
                exits_at_failpoint(&mut relay, Duration::from_secs(60));
            }
            logs.push_str(&relay.log_tail());
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(written.load(Ordering::Relaxed) > 0);
    let (mut relay, _) = eos.relay(&[]);
    eos.assert_every_event_once(
        Duration::from_secs(120),
        &format!("{logs}\n{}", relay.log_tail()),
    );
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(30));
    assert_aborted_records_exist(&eos.kafka.brokers(), eos.ids().len());
}

/// A `read_uncommitted` consumer sees more records than `events`: aborted transactions left
/// theirs in the log, so the `read_committed` count could have seen duplicates and did not.
fn assert_aborted_records_exist(brokers: &str, events: usize) {
    let uncommitted = read_ids(brokers, "read_uncommitted", events, Duration::from_secs(60));
    let total: usize = uncommitted.values().sum();
    assert!(
        total > events,
        "aborted transactions left their records in the log: {total} records of {events} events"
    );
}

/// A slot confirmed past the recorded progress (events no exactly-once relay published) is a
/// definite error, not a silent skip.
#[test]
fn a_slot_ahead_of_the_recorded_progress_halts() {
    let eos = Eos::new();
    let (mut relay, port) = eos.relay(&[]);
    eos.write(0, 50, 10);
    eos.wait_delivered();
    wait_until(Duration::from_secs(30), "the progress is recorded", || {
        status(port)["recorded_progress"].is_string()
    });
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(30));
    // Events committed and consumed from the slot behind the relay's back.
    eos.write(50, 20, 10);
    eos.psql("SELECT pg_replication_slot_advance('outbox_relay', pg_current_wal_lsn())");
    let (relay, port) = eos.start_relay(&[]);
    wait_until(Duration::from_secs(60), "the relay halts", || {
        status(port)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("past the progress recorded"))
    });
    assert!(!ready(port), "{}", relay.log_tail());
}

/// `check` tries a transactional producer: a broker that cannot run transactions is refused
/// with a clear error, before any relay runs.
#[test]
fn check_refuses_brokers_without_transactions() {
    // One broker cannot host a transaction state log that wants three replicas.
    let kafka = Kafka::start_with(
        KafkaOptions::default().property("transaction.state.log.replication.factor", "3"),
    );
    let pg = ThrowawayPostgres::start().expect("postgres starts");
    let config = relay_config(
        &pg.url("postgres"),
        &kafka.brokers(),
        "outbox_relay",
        "outbox_relay",
        free_port().expect("free port"),
    );
    let env = [("OUTBOX_RELAY_KAFKA_DELIVERY", "exactly-once")];
    let out = relay_cli(&["check"], &config, &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("kafka transactions: FAILED")
            && stdout.contains("kafka.delivery = \"at-least-once\""),
        "{stdout}"
    );
    // At least once needs no transactions.
    let out = relay_cli(&["check"], &config, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("kafka transactions"), "{stdout}");
}

/// Writes transactions of 5 events until stopped, riding out a Postgres restart (a failed
/// insert is retried; it committed nothing).
fn steady_writer(pg: &ThrowawayPostgres, stop: &AtomicBool, written: &AtomicUsize) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        match pg.psql("postgres", &insert(n, 5)) {
            Ok(_) => {
                n += 5;
                written.store(n, Ordering::Relaxed);
            }
            // Postgres is restarting: try again shortly.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits until the relay on `port` has committed `more` transactions after now.
fn wait_for_commits(port: u16, more: f64, relay: &Relay) {
    let from = committed(port);
    let deadline = Duration::from_secs(120);
    let what = format!("{more} more transactions committed");
    let started = Instant::now();
    while committed(port) < from + more {
        assert!(started.elapsed() < deadline, "{what}\n{}", relay.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn postgres_and_broker_restarts_lose_and_duplicate_nothing() {
    let mut eos = Eos::new();
    let (relay, port) = eos.relay(&[]);
    let stop = AtomicBool::new(false);
    let written = AtomicUsize::new(0);
    let Eos { pg, kafka, .. } = &mut eos;
    std::thread::scope(|scope| {
        let pg = &*pg;
        scope.spawn(|| steady_writer(pg, &stop, &written));
        wait_for_commits(port, 3.0, &relay);
        pg.restart().expect("postgres restarts");
        wait_for_commits(port, 3.0, &relay);
        kafka.restart();
        wait_for_commits(port, 3.0, &relay);
        stop.store(true, Ordering::Relaxed);
    });
    eos.assert_every_event_once(Duration::from_secs(120), &relay.log_tail());
}

fn signal(relay: &Relay, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{sig}"), relay.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{sig}");
}

/// A leader frozen (SIGSTOP) while a transaction is open loses the slot to a standby, whose
/// transactional producer fences it; resumed, the old leader's commit fails and it stands
/// by. Nothing is lost or duplicated.
#[test]
fn a_frozen_leader_is_fenced_by_the_standby_that_takes_over() {
    frozen_leader(Eos::new(), true);
}

/// The same in polling mode: the standby ends the frozen leader's silent lock session and
/// takes the lock, and the same `transactional.id` fences the old leader's producer. Resumed,
/// the old leader stops on whichever it meets first (the fenced producer, the lost lock, its
/// cursor write on the ended session), so only what it does is checked, not why.
#[test]
fn polling_a_frozen_leader_is_fenced_by_the_standby_that_takes_over() {
    frozen_leader(
        Eos::with_env(&[("OUTBOX_RELAY_SOURCE_MODE", "polling")]),
        false,
    );
}

/// Freezes the leader under a steady writer, lets a standby take over, resumes the old one:
/// it commits nothing begun after the freeze and stands by; exactly once. With `fenced_log`,
/// its log must also show the fence.
fn frozen_leader(eos: Eos, fenced_log: bool) {
    let (mut old, old_port) = eos.relay(&[]);
    let stop = AtomicBool::new(false);
    let written = AtomicUsize::new(0);
    let (new, committed_when_frozen) = std::thread::scope(|scope| {
        scope.spawn(|| steady_writer(&eos.pg, &stop, &written));
        wait_for_commits(old_port, 3.0, &old);
        let committed_when_frozen = committed(old_port);
        signal(&old, "STOP");
        // The standby takes over once the frozen leader's hold has lapsed (the server ends
        // its replication connection at wal_sender_timeout; a standby ends a leader-lock
        // session silent for 10 s), then leads.
        let (new, new_port) = eos.relay(&[]);
        wait_for_commits(new_port, 3.0, &new);
        signal(&old, "CONT");
        wait_until(Duration::from_secs(60), "the old leader stands by", || {
            status(old_port)["role"] == "standby"
        });
        wait_for_commits(new_port, 3.0, &new);
        stop.store(true, Ordering::Relaxed);
        (new, committed_when_frozen)
    });
    let logs = format!(
        "old leader:\n{}\nnew leader:\n{}",
        old.log_tail(),
        new.log_tail()
    );
    eos.assert_every_event_once(Duration::from_secs(120), &logs);
    // A commit already sent when it froze may complete; nothing after it.
    let committed_after = committed(old_port);
    assert!(
        committed_after <= committed_when_frozen + 1.0,
        "the fenced leader committed {} transactions after it was frozen\n{logs}",
        committed_after - committed_when_frozen
    );
    let log = old.log();
    assert!(
        !fenced_log || log.contains("fenced") || log.contains("Fenced"),
        "the old leader's producer was fenced\n{logs}"
    );
    old.kill9();
}

/// A dead letter goes in the transaction of the events around it: a crash after that commit
/// neither loses nor repeats it.
#[test]
fn dead_letters_commit_with_their_transaction() {
    let eos = Eos::new();
    let (mut relay, _) = eos.relay(&[("RELAY_TEST_FAILPOINT", "after-commit:1")]);
    // One transaction: good events around one whose aggregate type makes no topic name.
    eos.psql(&format!(
        "BEGIN; {}; INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('no such topic!', 'a', 'Happened', '{{}}'); {}; COMMIT;",
        insert(0, 5),
        insert(5, 5)
    ));
    exits_at_failpoint(&mut relay, Duration::from_secs(60));
    let (relay, _) = eos.relay(&[]);
    eos.write(10, 20, 5);
    let bad: HashSet<String> = eos
        .psql("SELECT id::text FROM outbox.events WHERE aggregate_type <> 'order'")
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    let good: HashSet<String> = eos.ids().difference(&bad).cloned().collect();
    let brokers = eos.kafka.brokers();
    let counts = eos.read_committed(good.len(), Duration::from_secs(60));
    assert_exactly_once(&counts, &good, &relay.log_tail());
    let dead = read_topic_ids(
        &brokers,
        "outbox.dead-letter",
        "read_committed",
        bad.len(),
        Duration::from_secs(60),
    );
    assert_exactly_once(&dead, &bad, &relay.log_tail());
}

/// Idle, the relay commits no transaction per tick; on a busy database whose outbox is idle it
/// records the moved position now and then, so the slot advances and WAL is not pinned.
#[test]
fn an_idle_outbox_commits_rarely_and_pins_no_wal() {
    let eos = Eos::new();
    let (relay, port) = eos.relay(&[]);
    eos.write(0, 10, 10);
    eos.wait_delivered();
    let before = committed(port);
    let started = Instant::now();
    eos.psql("CREATE TABLE busy (n int)");
    let target = eos.psql("SELECT pg_current_wal_lsn()").trim().to_owned();
    wait_until(
        Duration::from_secs(60),
        "the slot passes the busy table's writes",
        || {
            eos.psql("INSERT INTO busy SELECT generate_series(1, 100)");
            eos.psql(&format!(
                "SELECT confirmed_flush_lsn >= '{target}' FROM pg_replication_slots \
                 WHERE slot_name = 'outbox_relay'"
            ))
            .trim()
                == "t"
        },
    );
    // Progress-only transactions at most every 5 s (one may have been due at the start).
    let allowed = 2.0 + started.elapsed().as_secs_f64() / 5.0;
    let idle = committed(port) - before;
    assert!(
        idle >= 1.0 && idle <= allowed,
        "{idle} transactions while idle for {:?}\n{}",
        started.elapsed(),
        relay.log_tail()
    );
}

/// A measurement, not a test (run with `--ignored --nocapture`): drains the same backlog
/// with an at-least-once and an exactly-once relay, each on its own slot, and prints the
/// throughput until the slot is confirmed at the end of the backlog (for exactly once: the
/// last transaction committed). Until the benchmark (`benches/relay`) runs exactly once.
#[test]
#[ignore = "a measurement: prints the throughput of both delivery modes"]
fn measure_exactly_once_against_at_least_once() {
    let events: usize = std::env::var("EOS_MEASURE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let eos = Eos::new();
    // Each mode twice, alternating: the first drain also warms the broker up.
    let modes = [
        ("at-least-once", "slot_alo_1"),
        ("exactly-once", "slot_eos_1"),
        ("at-least-once", "slot_alo_2"),
        ("exactly-once", "slot_eos_2"),
    ];
    // `EOS_MEASURE_PROPERTIES="k=v,..."`: producer settings for both relays, to try out.
    let properties: String = std::env::var("EOS_MEASURE_PROPERTIES")
        .unwrap_or_default()
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| format!("{k:?} = {v:?}\n"))
        .collect();
    let config =
        |slot: &str, port: u16| eos.config(slot, port) + "\n[kafka.properties]\n" + &properties;
    // Both slots exist before the backlog is written.
    for (mode, slot) in modes {
        let port = free_port().expect("free port");
        let mut relay = Relay::start(
            &config(slot, port),
            &[("OUTBOX_RELAY_KAFKA_DELIVERY", mode)],
        );
        relay.wait_ready(port, Duration::from_secs(90));
        relay.terminate(Duration::from_secs(30));
    }
    eos.psql(
        "CREATE PROCEDURE fill(total int, per_tx int) LANGUAGE plpgsql AS $$ \
         DECLARE i int := 0; BEGIN WHILE i < total LOOP \
         INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', (g % 10000)::text, 'Happened', jsonb_build_object('n', g, 'pad', repeat('x', 80)) \
         FROM generate_series(i, i + per_tx - 1) AS g; COMMIT; i := i + per_tx; END LOOP; END $$",
    );
    eos.psql(&format!("CALL fill({events}, 100)"));
    let end = eos.psql("SELECT pg_current_wal_lsn()").trim().to_owned();
    let mut rates = Vec::new();
    for (mode, slot) in modes {
        let port = free_port().expect("free port");
        let started = Instant::now();
        let relay = Relay::start(
            &config(slot, port),
            &[
                ("OUTBOX_RELAY_KAFKA_DELIVERY", mode),
                (
                    "OUTBOX_RELAY_LOG",
                    "info,outbox_relay=debug,librdkafka=debug",
                ),
            ],
        );
        wait_until(Duration::from_secs(600), "the backlog drains", || {
            eos.psql(&format!(
                "SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots \
                 WHERE slot_name = '{slot}'"
            ))
            .trim()
                == "t"
        });
        let secs = started.elapsed().as_secs_f64();
        let rate = events as f64 / secs;
        println!(
            "{mode}: {events} events (100 per transaction) in {secs:.2} s = {rate:.0} events/s; \
             transactions committed: {}",
            committed(port)
        );
        rates.push(rate);
        if let Some(path) = std::env::var_os("EOS_MEASURE_LOG") {
            let path = format!("{}.{slot}", path.to_string_lossy());
            std::fs::write(path, relay.log()).expect("log written");
        }
        drop(relay);
    }
    let best = |from: usize| rates[from].max(rates[from + 2]);
    println!(
        "exactly-once / at-least-once (best of two each) = {:.2}",
        best(1) / best(0)
    );
}

/// A source transaction larger than one Kafka transaction may hold (100,000 records) is split:
/// each Kafka transaction records how many of its events are in; a crash after the first
/// commit resumes inside it, by (commit LSN, index).
#[test]
fn a_large_source_transaction_is_split_and_resumed_inside() {
    let eos = Eos::new();
    let (mut relay, _) = eos.relay(&[("RELAY_TEST_FAILPOINT", "after-commit:1")]);
    eos.write(0, 250_000, 250_000);
    exits_at_failpoint(&mut relay, Duration::from_secs(120));
    // Again, right after the next relay's first commit, which also lies inside it.
    let (mut relay, _) = eos.relay(&[("RELAY_TEST_FAILPOINT", "after-commit:1")]);
    exits_at_failpoint(&mut relay, Duration::from_secs(120));
    let (relay, _) = eos.relay(&[]);
    eos.assert_every_event_once(Duration::from_secs(300), &relay.log_tail());
    let log = relay.log();
    assert!(
        log.contains("resuming after the recorded progress") && log.contains(" events of "),
        "{}",
        relay.log_tail()
    );
}

/// A definite error (an invalid event with `on_invalid = "halt"`) in the middle of a source
/// transaction larger than one Kafka transaction: the chunk committed before it stays, with
/// its partial progress; the open Kafka transaction is aborted, so a `read_committed`
/// consumer sees exactly the events the recorded progress covers. After the fix (dead-letter
/// the event) and a restart, every event arrives once.
#[test]
fn a_halt_inside_a_large_source_transaction_aborts_what_the_progress_does_not_cover() {
    let eos = Eos::new();
    let (mut relay, port) = eos.relay(&[("OUTBOX_RELAY_SOURCE_ON_INVALID", "halt")]);
    // 130,000 events, one whose headers are not a JSON object, 20,000 more: one transaction.
    eos.psql(&format!(
        "BEGIN; {}; INSERT INTO outbox.events \
         (aggregate_type, aggregate_id, event_type, payload, headers) \
         VALUES ('order', 'bad', 'Happened', '{{}}', '\"not an object\"'); {}; COMMIT;",
        insert(0, 130_000),
        insert(130_000, 20_000)
    ));
    wait_until(Duration::from_secs(300), "the relay halts", || {
        !ready(port)
            && status(port)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("invalid_headers"))
    });
    wait_until(
        Duration::from_secs(30),
        "the open transaction is aborted",
        || metric(port, ABORTED).unwrap_or(0.0) >= 1.0,
    );
    let log = relay.log_tail();
    // The recorded progress: how many events of the big transaction are in Kafka.
    let progress = last_progress(&eos.kafka.brokers());
    let covered = progress["partial"]["events"]
        .as_u64()
        .unwrap_or_else(|| panic!("a partial progress is recorded: {progress}\n{log}"));
    assert!((1..130_000).contains(&covered), "{progress}\n{log}");
    // Stream order is insertion order: those are the events with n below `covered`.
    let expected: HashSet<String> = eos
        .psql(&format!(
            "SELECT id::text FROM outbox.events \
             WHERE aggregate_id <> 'bad' AND (payload->>'n')::int < {covered}"
        ))
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    let counts = eos.read_committed(expected.len(), Duration::from_secs(120));
    assert_exactly_once(&counts, &expected, &log);
    // The aborted transaction's records are in the log: the count above could have seen them.
    assert_aborted_records_exist(&eos.kafka.brokers(), expected.len());
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(30));

    // The fix: dead-letter invalid events (the default), and restart.
    let (relay, _) = eos.relay(&[]);
    let bad: HashSet<String> = eos
        .psql("SELECT id::text FROM outbox.events WHERE aggregate_id = 'bad'")
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    let good: HashSet<String> = eos.ids().difference(&bad).cloned().collect();
    let counts = eos.read_committed(good.len(), Duration::from_secs(300));
    assert_exactly_once(&counts, &good, &relay.log_tail());
    let dead = read_topic_ids(
        &eos.kafka.brokers(),
        "outbox.dead-letter",
        "read_committed",
        bad.len(),
        Duration::from_secs(60),
    );
    assert_exactly_once(&dead, &bad, &relay.log_tail());
    assert!(
        relay.log().contains("resuming after the recorded progress"),
        "{}",
        relay.log_tail()
    );
}

/// The last progress record a `read_committed` reader sees in the default progress topic.
fn last_progress(brokers: &str) -> serde_json::Value {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", unique_name("eos-progress"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("outbox-relay.progress", 0, Offset::Beginning)
        .expect("offset");
    consumer.assign(&tpl).expect("assign");
    let mut last = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if let Some(value) = m.payload() {
                    last = serde_json::from_slice(value).expect("progress is JSON");
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) if !last.is_null() => break,
            _ => {}
        }
    }
    last
}

/// SIGTERM while the broker is down: the relay does not wait for Kafka for long; it aborts
/// its transaction and exits, and the next relay delivers everything once.
#[test]
fn sigterm_with_the_broker_down_exits_and_loses_and_duplicates_nothing() {
    let mut eos = Eos::new();
    let (mut relay, _) = eos.relay(&[]);
    eos.write(0, 100, 10);
    eos.wait_delivered();
    eos.kafka.stop();
    eos.write(100, 100, 10);
    relay.sigterm();
    assert!(
        relay.wait_exit(Duration::from_secs(60)).is_some(),
        "the relay exits without Kafka\n{}",
        relay.log_tail()
    );
    eos.kafka.start_again();
    let (relay, _) = eos.relay(&[]);
    eos.assert_every_event_once(Duration::from_secs(120), &relay.log_tail());
}

/// Another relay's transaction open on a shared progress topic holds back what a
/// `read_committed` reader is shown; the relay's own last record may lie behind it. A
/// restarting relay waits for that transaction to end instead of resuming from an older
/// record.
#[test]
fn a_foreign_open_transaction_on_the_progress_topic_is_waited_for() {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let eos = Eos::new();
    let (mut relay, _) = eos.relay(&[("RELAY_TEST_FAILPOINT", "after-commit:1")]);
    let foreign: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", eos.kafka.brokers())
        .set("broker.address.family", "v4")
        .set("transactional.id", unique_name("foreign"))
        .create()
        .expect("producer");
    foreign
        .init_transactions(Duration::from_secs(30))
        .expect("init");
    foreign.begin_transaction().expect("begin");
    foreign
        .send(
            BaseRecord::to("outbox-relay.progress")
                .key("another relay")
                .payload("{}")
                .partition(0),
        )
        .map_err(|(e, _)| e)
        .expect("send");
    foreign.flush(Duration::from_secs(30)).expect("flush");
    // The relay's first commit lands behind the open transaction; then it crashes before
    // confirming the slot.
    eos.write(0, 100, 10);
    exits_at_failpoint(&mut relay, Duration::from_secs(60));
    let (relay, _) = eos.start_relay(&[]);
    wait_until(Duration::from_secs(60), "the relay waits", || {
        relay
            .log()
            .contains("a transaction is open on the progress topic")
    });
    foreign
        .commit_transaction(Duration::from_secs(30))
        .expect("commit");
    eos.assert_every_event_once(Duration::from_secs(120), &relay.log_tail());
}
