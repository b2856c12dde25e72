//! The consuming side, end to end: two instances of the flashcards example
//! (`examples/flashcards`, Java/Spring Boot), each with its own database and relay, kept in sync
//! through one topic. Every write goes to the instance's table and its outbox in one
//! transaction; each instance applies the other's events through its inbox, last writer wins by
//! version. Random writes on both sides, edits of the same card on both, a relay and an
//! instance killed with SIGKILL and restarted: both databases end up with the same cards, every
//! event of the other side is applied exactly once, and redeliveries are dropped.
//!
//! Needs Java 17 and Maven (or the jar built): without them the test fails, it never skips.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use testkit::*;

/// Where the relays' default topic template puts the cards' events (aggregate_type `card`).
const TOPIC: &str = "outbox.event.card";
/// The inbox consumer name both instances use (`flashcards.consumer`).
const CONSUMER: &str = "flashcards";
const CONVERGE_DEADLINE: Duration = Duration::from_secs(150);

/// One instance with its database and its relay.
struct Side {
    name: &'static str,
    db: String,
    app: Flashcards,
    relay: Option<Relay>,
    relay_config: String,
    relay_port: u16,
    slot: String,
}

impl Side {
    fn start_relay(&mut self, pg: &ThrowawayPostgres) {
        let mut relay = Relay::start(&self.relay_config, &[]);
        relay.wait_ready(self.relay_port, Duration::from_secs(60));
        wait_until(
            Duration::from_secs(60),
            &format!("relay {} streams its slot", self.name),
            || {
                sql(
                    pg,
                    &self.db,
                    &format!(
                        "SELECT count(*) FROM pg_replication_slots \
                         WHERE slot_name = '{}' AND active",
                        self.slot
                    ),
                ) == "1"
            },
        );
        self.relay = Some(relay);
    }

    fn kill_relay(&mut self) {
        self.relay.take().expect("relay running").kill9();
    }
}

fn sql(pg: &ThrowawayPostgres, db: &str, query: &str) -> String {
    pg.psql(db, query)
        .unwrap_or_else(|e| panic!("{db}: {query}: {e}"))
        .trim()
        .to_owned()
}

/// A small deterministic generator (xorshift64*), seeded per run and printed, so a failing run
/// can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The live cards' ids an instance lists.
fn card_ids(app: &Flashcards) -> Vec<String> {
    match app.request("GET", "/cards", None) {
        Ok((200, body)) => {
            let cards: serde_json::Value = serde_json::from_str(&body).expect("cards are JSON");
            cards
                .as_array()
                .expect("a list")
                .iter()
                .map(|c| c["id"].as_str().expect("id").to_owned())
                .collect()
        }
        other => panic!("GET /cards: {other:?}\n{}", app.log_tail()),
    }
}

fn body(question: &str, answer: &str) -> String {
    serde_json::json!({ "question": question, "answer": answer }).to_string()
}

fn create(app: &Flashcards, question: &str) -> String {
    match app.request("POST", "/cards", Some(&body(question, "answer"))) {
        Ok((201, body)) => {
            let card: serde_json::Value = serde_json::from_str(&body).expect("card is JSON");
            card["id"].as_str().expect("id").to_owned()
        }
        other => panic!("POST /cards: {other:?}\n{}", app.log_tail()),
    }
}

/// PUT or DELETE; 404 (the card is gone meanwhile) is fine, anything else but success is not.
fn edit(app: &Flashcards, method: &str, id: &str, question: &str) {
    let json = body(question, &format!("{question}!"));
    let result = app.request(
        method,
        &format!("/cards/{id}"),
        (method == "PUT").then_some(json.as_str()),
    );
    match result {
        Ok((200 | 204 | 404, _)) => {}
        other => panic!("{method} /cards/{id}: {other:?}\n{}", app.log_tail()),
    }
}

/// `n` random writes spread over the running instances: creates, updates and deletes, of cards
/// each side knows (its own and the other's), and now and then the same card edited on both
/// sides one right after the other. Cards in `spare` are left alone.
fn random_writes(rng: &mut Rng, apps: &[&Flashcards], n: usize, tag: &str, spare: &[&str]) {
    let list = |app: &Flashcards| -> Vec<String> {
        let mut ids = card_ids(app);
        ids.retain(|id| !spare.contains(&id.as_str()));
        ids
    };
    let mut known: Vec<Vec<String>> = apps.iter().map(|app| list(app)).collect();
    for i in 0..n {
        let which = rng.below(apps.len());
        let app = apps[which];
        if i % 10 == 9 {
            known = apps.iter().map(|app| list(app)).collect();
        }
        let ids = &known[which];
        let roll = rng.below(100);
        if ids.is_empty() || roll < 35 {
            let id = create(app, &format!("{tag}-{i} created"));
            known[which].push(id);
        } else if roll < 80 {
            let id = ids[rng.below(ids.len())].clone();
            edit(app, "PUT", &id, &format!("{tag}-{i} updated"));
            if roll >= 65 && apps.len() == 2 {
                // The same card on the other side before it can have seen this edit.
                edit(
                    apps[1 - which],
                    "PUT",
                    &id,
                    &format!("{tag}-{i} concurrent"),
                );
            }
        } else {
            let id = ids[rng.below(ids.len())].clone();
            edit(app, "DELETE", &id, "");
        }
    }
}

/// Every card row, tombstones included, in one comparable text.
fn cards_table(pg: &ThrowawayPostgres, db: &str) -> String {
    sql(
        pg,
        db,
        "SELECT id, coalesce(question, '<null>'), coalesce(answer, '<null>'), deleted, \
                version_counter, version_origin \
         FROM flashcards.cards ORDER BY id",
    )
}

fn id_set(pg: &ThrowawayPostgres, db: &str, query: &str) -> BTreeSet<String> {
    sql(pg, db, query).lines().map(str::to_owned).collect()
}

/// The ids of the events a side published: its outbox rows (the relay deletes none).
fn published(pg: &ThrowawayPostgres, db: &str) -> BTreeSet<String> {
    id_set(pg, db, "SELECT DISTINCT id FROM outbox.events")
}

/// The ids a side's inbox recorded as processed.
fn received(pg: &ThrowawayPostgres, db: &str) -> BTreeSet<String> {
    id_set(
        pg,
        db,
        &format!("SELECT event_id FROM inbox.received WHERE consumer = '{CONSUMER}'"),
    )
}

fn card_row(pg: &ThrowawayPostgres, db: &str, id: &str) -> String {
    sql(
        pg,
        db,
        &format!(
            "SELECT coalesce(question, '<null>') || ' deleted=' || deleted \
             FROM flashcards.cards WHERE id = '{id}'"
        ),
    )
}

#[test]
fn two_instances_converge_through_outbox_relay_and_their_inboxes() {
    // Fails (never skips) without Java, Maven or the jar.
    let jar = flashcards_jar();
    eprintln!("flashcards jar: {}", jar.display());
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("seed: {seed}");
    let mut rng = Rng(seed);

    let pg = ThrowawayPostgres::start().expect("postgres starts");
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 3);

    let mut sides: Vec<Side> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let db = format!("flash_{name}");
            pg.create_database(&db).expect("create database");
            let url = jdbc_url(&pg, &db);
            let mut properties = vec![
                ("flashcards.instance", name),
                ("flashcards.jdbc-url", url.as_str()),
                ("flashcards.topic", TOPIC),
                ("flashcards.consumer", CONSUMER),
                ("flashcards.commit.max-records", "20"),
                ("flashcards.commit.max-interval", "200ms"),
            ];
            let brokers = kafka.brokers();
            properties.push(("flashcards.kafka-bootstrap", brokers.as_str()));
            if name == "b" {
                // B's first life commits no offset at all, so that its restart re-reads every
                // event it already applied: the redelivery is certain, not lucky.
                properties.push(("flashcards.commit.max-records", "1000000"));
                properties.push(("flashcards.commit.max-interval", "1h"));
            }
            let app = Flashcards::spawn(&properties);
            let slot = format!("relay_{name}");
            let relay_port = free_port().expect("free port");
            let relay_config =
                relay_config(&pg.url(&db), &kafka.brokers(), &slot, &slot, relay_port);
            Side {
                name,
                db,
                app,
                relay: None,
                relay_config,
                relay_port,
                slot,
            }
        })
        .collect();
    // The instances create their schemas (the outbox among them) before the relays start.
    for side in &mut sides {
        side.app.wait_ready();
    }
    for side in &mut sides {
        side.start_relay(&pg);
    }
    let (a, b) = (0, 1);

    // Phase 1: both up. B applies some of A's events (and commits no offset).
    random_writes(&mut rng, &[&sides[a].app, &sides[b].app], 60, "p1", &[]);
    wait_until(
        Duration::from_secs(60),
        "instance b applies events of instance a",
        || sides[b].app.stat("applied") > 0,
    );

    // Phase 2: a conflict made certain. Two cards both sides hold at version 1; then, while A's
    // relay is down (SIGKILL), A and B edit them: each side writes version 2.
    let x = create(&sides[a].app, "conflict x");
    let y = create(&sides[a].app, "conflict y");
    wait_until(
        Duration::from_secs(60),
        "instance b holds both conflict cards",
        || {
            let ids = card_ids(&sides[b].app);
            ids.contains(&x) && ids.contains(&y)
        },
    );
    sides[a].kill_relay();
    // X: updated on both. (2, "b") > (2, "a"): B's update wins on both sides.
    edit(&sides[a].app, "PUT", &x, "x from a");
    edit(&sides[b].app, "PUT", &x, "x from b");
    // Y: updated on A, deleted on B. B's tombstone (2, "b") is newer than A's update (2, "a"),
    // which reaches B only later and must not bring the card back.
    edit(&sides[a].app, "PUT", &y, "y from a");
    edit(&sides[b].app, "DELETE", &y, "");
    random_writes(
        &mut rng,
        &[&sides[a].app, &sides[b].app],
        40,
        "p2",
        &[&x, &y],
    );
    sides[a].start_relay(&pg);

    // Phase 3: instance B crashes while it has applied events it never committed offsets for.
    let applied_before = sides[b].app.stat("applied");
    assert!(applied_before > 0, "b applied nothing before its crash");
    sides[b].app.kill9();
    random_writes(&mut rng, &[&sides[a].app], 30, "p3", &[&x, &y]);
    sides[b].app.start_again(&[
        ("flashcards.commit.max-records", "20"),
        ("flashcards.commit.max-interval", "200ms"),
    ]);
    wait_until(
        Duration::from_secs(90),
        "the restarted instance b drops redelivered events",
        || sides[b].app.stat("duplicates") > 0,
    );

    // Phase 4: both up again.
    random_writes(
        &mut rng,
        &[&sides[a].app, &sides[b].app],
        60,
        "p4",
        &[&x, &y],
    );

    // Converged: the same rows (tombstones and versions included) on both sides, and each inbox
    // holds exactly the other side's published events.
    let converged = || {
        cards_table(&pg, &sides[a].db) == cards_table(&pg, &sides[b].db)
            && received(&pg, &sides[a].db) == published(&pg, &sides[b].db)
            && received(&pg, &sides[b].db) == published(&pg, &sides[a].db)
    };
    let deadline = std::time::Instant::now() + CONVERGE_DEADLINE;
    while !converged() {
        if std::time::Instant::now() >= deadline {
            for side in &sides {
                eprintln!(
                    "{}: published {}, received {}, stats {}\n{}",
                    side.name,
                    published(&pg, &side.db).len(),
                    received(&pg, &side.db).len(),
                    side.app.stats(),
                    side.app.log_tail()
                );
            }
            panic!("the two instances did not converge within {CONVERGE_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Exactly once: inbox rows per consumer = distinct ids the other side published (its own
    // events were skipped by origin, never recorded).
    for (me, other) in [(a, b), (b, a)] {
        let theirs = published(&pg, &sides[other].db);
        let mine = received(&pg, &sides[me].db);
        assert_eq!(
            mine.len(),
            theirs.len(),
            "{}'s inbox vs {}'s outbox",
            sides[me].name,
            sides[other].name
        );
        assert_eq!(mine, theirs);
        let count = sql(
            &pg,
            &sides[me].db,
            &format!("SELECT count(*) FROM inbox.received WHERE consumer = '{CONSUMER}'"),
        );
        assert_eq!(count, theirs.len().to_string());
        assert!(
            published(&pg, &sides[me].db).is_disjoint(&mine),
            "{} recorded its own events",
            sides[me].name
        );
    }
    let total = published(&pg, &sides[a].db).len() + published(&pg, &sides[b].db).len();
    assert!(total >= 150, "only {total} events were written");

    // The conflicts resolved by version, the same way on both sides.
    for side in &sides {
        assert_eq!(
            card_row(&pg, &side.db, &x),
            "x from b deleted=false",
            "{}",
            side.name
        );
        assert_eq!(
            card_row(&pg, &side.db, &y),
            "<null> deleted=true",
            "{}: an older update resurrected a deleted card",
            side.name
        );
    }

    // Redelivery after the crash was dropped, and each side saw (and skipped) its own events.
    let (stats_a, stats_b) = (sides[a].app.stats(), sides[b].app.stats());
    eprintln!("a: {stats_a}\nb: {stats_b}");
    assert!(stats_b["duplicates"].as_u64().unwrap() > 0);
    assert!(stats_a["own_skipped"].as_u64().unwrap() > 0);
    assert!(stats_b["own_skipped"].as_u64().unwrap() > 0);
    assert!(sides[a].app.is_running() && sides[b].app.is_running());
}
