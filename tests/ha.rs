//! High availability as deployed: relays running as the least-privilege role of
//! `sql/roles.sql`, which sees `pg_stat_replication`'s details as NULL. The stream's liveness
//! is judged from what the relay receives, a standby never evicts a healthy leader, a
//! walsender busy decoding an unrelated transaction is not taken for a dead one, and catalog
//! values that may be NULL never crash a relay.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::*;

/// Creates the relay role of `sql/roles.sql` and runs `init` as the owner (the publication
/// needs ownership of the outbox); returns the relay role's URL.
fn relay_role(world: &World) -> String {
    world.psql(include_str!("../sql/roles.sql"));
    world.psql("ALTER ROLE outbox_relay PASSWORD 'relay-pw'");
    let owner = world.config(free_port().unwrap());
    let init = relay_cli(&["init"], &owner, &[]);
    assert!(
        init.status.success(),
        "init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    format!(
        "postgres://outbox_relay:relay-pw@127.0.0.1:{}/postgres",
        world.pg.port()
    )
}

/// Starts a relay connecting with `url`; returns it with its HTTP port.
fn start_relay(world: &World, url: &str) -> (Relay, u16) {
    let port = free_port().unwrap();
    let config = relay_config(
        url,
        &world.kafka.brokers(),
        "outbox_relay",
        "outbox_relay",
        port,
    );
    (Relay::start(&config, &[]), port)
}

/// The pid of the walsender holding the slot (empty when none does).
fn slot_holder(world: &World) -> String {
    world
        .psql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")
        .trim()
        .to_owned()
}

fn reconnects(port: u16) -> Option<f64> {
    metric(port, "outbox_relay_source_reconnects_total")
}

/// Log lines that mean a stream was given up or a holder evicted.
fn disruptions(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("the connection is dead")
                || l.contains("source session failed")
                || l.contains("terminated a walsender")
                || l.contains("panicked")
        })
        .collect()
}

/// SPEC §8's pair of relays, both as the least-privilege role: through a minute of idle the
/// same walsender keeps the slot (no eviction by the standby, no reconnect by the leader), and
/// then steady writes arrive once each.
#[test]
fn a_least_privileged_pair_keeps_one_leader_through_idle_and_publishes_each_event_once() {
    let world = World::new();
    let url = relay_role(&world);
    let (leader, leader_port) = start_relay(&world, &url);
    world.wait_streaming();
    let (standby, standby_port) = start_relay(&world, &url);
    wait_until(Duration::from_secs(30), "both ready, one leader", || {
        ready(leader_port)
            && ready(standby_port)
            && metric(leader_port, "outbox_relay_is_leader") == Some(1.0)
            && metric(standby_port, "outbox_relay_is_leader") == Some(0.0)
    });
    let holder = slot_holder(&world);
    assert!(!holder.is_empty());
    assert!(
        world
            .psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'outbox_relay'")
            .trim()
            == "f"
    );

    let idle_from = Instant::now();
    let mut looked = Instant::now();
    wait_until(Duration::from_secs(90), "a minute of idle", || {
        if looked.elapsed() < Duration::from_secs(1) {
            return false;
        }
        looked = Instant::now();
        let holder_now = slot_holder(&world);
        assert_eq!(
            holder_now,
            holder,
            "after {:?} of idle the slot's walsender changed\nleader log:\n{}\nstandby log:\n{}",
            idle_from.elapsed(),
            leader.log_tail(),
            standby.log_tail()
        );
        idle_from.elapsed() >= Duration::from_secs(60)
    });
    assert_eq!(metric(leader_port, "outbox_relay_is_leader"), Some(1.0));
    assert_eq!(metric(standby_port, "outbox_relay_is_leader"), Some(0.0));
    assert_eq!(reconnects(leader_port), Some(0.0), "{}", leader.log());
    assert_eq!(reconnects(standby_port), Some(0.0), "{}", standby.log());

    // Steady writes: 200 transactions of 10 events, one after another.
    world.write(2_000, 10, 20, &["order"]);
    let records = consume_n(&world, &topics(&["order"]), 2_000, Duration::from_secs(120));
    let (distinct, duplicates) = check_records(&records);
    println!("least-privileged pair: {distinct} distinct of 2000, {duplicates} duplicates");
    assert_eq!(distinct, 2_000, "leader log:\n{}", leader.log());
    assert_eq!(duplicates, 0, "leader log:\n{}", leader.log());
    assert_eq!(slot_holder(&world), holder);
    assert_eq!(reconnects(leader_port), Some(0.0));
    for (name, relay) in [("leader", &leader), ("standby", &standby)] {
        let log = relay.log();
        let bad = disruptions(&log);
        assert!(bad.is_empty(), "{name}: {bad:#?}");
    }
}

/// A 2,000,000-row UPDATE of a table outside the publication keeps the walsender decoding for
/// a long time without anything to send; with `wal_sender_timeout = 10s` it then reads the
/// relay's replies only every 5 s. The relay must take that for a busy server, not a dead
/// one: no reconnect, the same walsender, and events written after it are delivered.
#[test]
fn a_huge_unrelated_transaction_does_not_make_the_relay_reconnect() {
    let pg = ThrowawayPostgres::start_with(
        &PostgresOptions::default().setting("wal_sender_timeout", "10s"),
    )
    .expect("postgres starts");
    pg.psql("postgres", include_str!("../sql/outbox.sql"))
        .expect("schema applies");
    let world = World {
        pg,
        kafka: Kafka::start(),
        proxy: None,
    };
    // Written before the slot exists, so only the UPDATE is decoded.
    world.psql(
        "CREATE TABLE public.bulk (id int PRIMARY KEY, n int NOT NULL); \
         INSERT INTO public.bulk SELECT g, 0 FROM generate_series(1, 2000000) AS g",
    );
    let url = relay_role(&world);
    let (relay, port) = start_relay(&world, &url);
    world.wait_streaming();
    world.write(100, 10, 10, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 100, Duration::from_secs(60));
    let holder = slot_holder(&world);

    let started = Instant::now();
    world.psql("UPDATE public.bulk SET n = n + 1");
    let committed = Instant::now();
    // Written right after the UPDATE committed: decoded only once it has been.
    world.psql(
        "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('order', 'after-update', 'Happened', '{\"n\": 0}')",
    );
    let records = consume_n(&world, &topics(&["order"]), 101, Duration::from_secs(300));
    println!(
        "2,000,000-row update: {:?} to run, then {:?} until the next event was delivered",
        committed - started,
        committed.elapsed()
    );
    assert!(records
        .iter()
        .any(|r| r.key_str().as_deref() == Some("after-update")));
    assert_eq!(reconnects(port), Some(0.0), "log:\n{}", relay.log());
    assert_eq!(slot_holder(&world), holder, "log:\n{}", relay.log());
    let log = relay.log();
    let bad = disruptions(&log);
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A standby whose role cannot see the leader's session (another role, no
/// `pg_read_all_stats`: `reply_time` and `backend_start` are NULL) waits without crashing and
/// without evicting it, and takes over when the leader dies.
#[test]
fn a_standby_that_cannot_see_the_leaders_session_waits_and_takes_over() {
    let world = World::new();
    // The leader runs as the superuser that owns the cluster.
    let (mut leader, leader_port) = world.relay_with(&[]);
    world.wait_streaming();
    let url = relay_role(&world);
    let (mut standby, standby_port) = start_relay(&world, &url);
    standby.wait_ready(standby_port, Duration::from_secs(30));
    let holder = slot_holder(&world);

    let since = Instant::now();
    wait_until(Duration::from_secs(30), "15 s as a standby", || {
        assert!(
            standby.is_running(),
            "the standby exited:\n{}",
            standby.log_tail()
        );
        since.elapsed() >= Duration::from_secs(15)
    });
    assert!(standby.is_running(), "{}", standby.log_tail());
    assert_eq!(metric(standby_port, "outbox_relay_is_leader"), Some(0.0));
    assert_eq!(metric(leader_port, "outbox_relay_is_leader"), Some(1.0));
    assert_eq!(slot_holder(&world), holder, "{}", standby.log());

    leader.kill9();
    let died = Instant::now();
    wait_until(Duration::from_secs(15), "the standby leads", || {
        metric(standby_port, "outbox_relay_is_leader") == Some(1.0)
    });
    println!(
        "takeover by the least-privileged standby took {:?}",
        died.elapsed()
    );
    world.write(300, 10, 10, &["order"]);
    let records = consume_n(&world, &topics(&["order"]), 300, Duration::from_secs(60));
    let (distinct, _) = check_records(&records);
    assert_eq!(distinct, 300, "{}", standby.log());
    let log = standby.log();
    let bad = disruptions(&log);
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A proxy to Postgres whose open connections can be made black holes: they swallow
/// everything both ways and never pass a close on (unlike `testkit::Proxy`, which passes the
/// server's close to the relay). Only the relay's own silence detection finds such a stream.
struct BlackHoleProxy {
    port: u16,
    generation: Arc<AtomicU64>,
}

impl BlackHoleProxy {
    fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let generation = Arc::new(AtomicU64::new(0));
        let current = Arc::clone(&generation);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let born = current.load(Ordering::SeqCst);
                let (Ok(client_in), Ok(server_in)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                for (from, to) in [(client_in, server), (server_in, client)] {
                    let current = Arc::clone(&current);
                    std::thread::spawn(move || pump(from, to, born, &current));
                }
            }
        });
        Self { port, generation }
    }

    /// Makes every open connection a black hole; new ones are forwarded.
    fn blackhole(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while the connection's generation is current; afterwards swallows
/// what arrives and, at the end, leaves `to` open.
fn pump(mut from: TcpStream, mut to: TcpStream, born: u64, current: &AtomicU64) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if current.load(Ordering::SeqCst) != born {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if current.load(Ordering::SeqCst) == born {
        let _ = to.shutdown(Shutdown::Both);
    } else {
        // No close gets through a black hole.
        std::mem::forget(to);
    }
}

/// A replication connection that goes silent without closing (the network drops everything,
/// and the server's own timeout is never seen by the relay) is found by the relay: nothing
/// arrives, not even the pings a live server sends, so it reconnects and resumes, well before
/// the 60 s default `wal_sender_timeout`.
#[test]
fn a_black_holed_stream_is_found_by_its_silence_and_the_relay_resumes() {
    let world = World::new();
    let direct = relay_role(&world);
    let proxy = BlackHoleProxy::start(world.pg.port());
    let url = direct.replace(
        &format!(":{}/", world.pg.port()),
        &format!(":{}/", proxy.port),
    );
    let (relay, port) = start_relay(&world, &url);
    world.wait_streaming();
    world.write(100, 10, 10, &["order"]);
    let _ = consume_n(&world, &topics(&["order"]), 100, Duration::from_secs(60));

    proxy.blackhole();
    let cut = Instant::now();
    world.write(100, 10, 10, &["order"]);
    let records = consume_n(&world, &topics(&["order"]), 200, Duration::from_secs(120));
    let resumed = cut.elapsed();
    let (distinct, duplicates) = check_records(&records);
    println!(
        "black-holed stream: resumed after {resumed:?}; {distinct} distinct of 200, {duplicates} duplicates"
    );
    assert_eq!(distinct, 200, "log:\n{}", relay.log());
    let log = relay.log();
    assert!(
        log.contains("the connection is dead"),
        "found by its silence:\n{log}"
    );
    assert!(reconnects(port).is_some_and(|n| n >= 1.0));
    assert!(
        resumed < Duration::from_secs(60),
        "resumed before the server's default wal_sender_timeout: {resumed:?}"
    );
}
