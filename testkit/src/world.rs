//! A test's world: its own Postgres with the outbox schema and its own broker, plus the
//! writer and the checks the end-to-end tests share.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::*;

/// A test's world: its own Postgres (schema applied) and broker.
pub struct World {
    pub pg: ThrowawayPostgres,
    pub kafka: Kafka,
    /// Set when the broker sits behind a cuttable proxy.
    pub proxy: Option<Proxy>,
}

impl World {
    /// Starts a Postgres with the schema and a broker (no `Default`: this starts processes).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let pg = Self::postgres();
        let kafka = Kafka::start();
        Self {
            pg,
            kafka,
            proxy: None,
        }
    }

    /// A world whose broker is reachable only through a proxy the test can cut.
    pub fn behind_proxy() -> Self {
        let pg = Self::postgres();
        let (kafka, proxy) = Kafka::start_behind_proxy();
        Self {
            pg,
            kafka,
            proxy: Some(proxy),
        }
    }

    fn postgres() -> ThrowawayPostgres {
        let pg = ThrowawayPostgres::start().expect("postgres starts");
        pg.psql("postgres", include_str!("../../sql/outbox.sql"))
            .expect("schema applies");
        pg
    }

    pub fn config(&self, http_port: u16) -> String {
        relay_config(
            &self.pg.url("postgres"),
            &self.kafka.brokers(),
            "outbox_relay",
            "outbox_relay",
            http_port,
        )
    }

    /// Starts a relay and waits until it streams (its slot is active), so that everything
    /// written afterwards is covered by the slot.
    pub fn relay(&self) -> Relay {
        let (relay, _) = self.relay_with(&[]);
        self.wait_streaming();
        relay
    }

    /// Starts a relay with extra environment (config overrides) without waiting for it;
    /// returns it with its HTTP port.
    pub fn relay_with(&self, env: &[(&str, &str)]) -> (Relay, u16) {
        let port = free_port().expect("free port");
        (Relay::start(&self.config(port), env), port)
    }

    /// Waits until a relay streams the slot, so that everything written afterwards is
    /// covered by it.
    pub fn wait_streaming(&self) {
        wait_until(Duration::from_secs(60), "a relay streams the slot", || {
            self.psql(
                "SELECT count(*) FROM pg_replication_slots \
                 WHERE slot_name = 'outbox_relay' AND active",
            )
            .trim()
                == "1"
        });
    }

    pub fn psql(&self, sql: &str) -> String {
        self.pg.psql("postgres", sql).expect("sql runs")
    }

    /// Writes `per_tx`-event transactions until `total` events are committed. Each payload
    /// carries its aggregate's sequence number so order can be checked.
    pub fn write(&self, total: usize, per_tx: usize, aggregates: usize, types: &[&str]) {
        self.write_with(total, per_tx, aggregates, types, false);
    }

    /// [`World::write`] that rides out a Postgres restart: a batch that fails is retried
    /// until the server is back (a retried batch may then exist twice, with other ids).
    pub fn write_through_restarts(
        &self,
        total: usize,
        per_tx: usize,
        aggregates: usize,
        types: &[&str],
    ) {
        self.write_with(total, per_tx, aggregates, types, true);
    }

    fn write_with(
        &self,
        total: usize,
        per_tx: usize,
        aggregates: usize,
        types: &[&str],
        retry: bool,
    ) {
        let mut written = 0;
        while written < total {
            let n = per_tx.min(total - written);
            let sql = format!(
                "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, headers) \
                 SELECT (ARRAY[{types}])[1 + (g % {nt})], 'agg-' || (g % {aggregates}), 'Happened', \
                        jsonb_build_object('n', g, 'agg', 'agg-' || (g % {aggregates})), \
                        jsonb_build_object('traceparent', '00-' || g, 'n', g) \
                 FROM generate_series({from}, {to}) AS g ORDER BY g",
                types = types
                    .iter()
                    .map(|t| format!("'{t}'"))
                    .collect::<Vec<_>>()
                    .join(","),
                nt = types.len(),
                from = written,
                to = written + n - 1,
            );
            if retry {
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while let Err(e) = self.pg.psql("postgres", &sql) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "postgres did not come back: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            } else {
                self.psql(&sql);
            }
            written += n;
        }
    }
}

/// Checks per-aggregate order (payload `n` strictly rises per key, ignoring redeliveries of
/// earlier records) and returns (distinct ids, duplicates).
pub fn check_records(records: &[Record]) -> (usize, usize) {
    let mut ids = HashSet::new();
    // Order holds per aggregate, that is per (topic, key).
    let mut last: HashMap<(String, Vec<u8>), i64> = HashMap::new();
    let mut seen: HashSet<(String, Vec<u8>, i64)> = HashSet::new();
    let mut by_partition: Vec<&Record> = records.iter().collect();
    by_partition.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    for r in by_partition {
        let id = r.header("id").expect("every record has an id");
        ids.insert(id);
        let raw_key = r.key.clone().expect("key");
        let key = (r.topic.clone(), raw_key.clone());
        let v: serde_json::Value =
            serde_json::from_slice(r.value.as_deref().expect("value")).expect("json value");
        let n = v["n"].as_i64().expect("n");
        if !seen.insert((r.topic.clone(), raw_key.clone(), n)) {
            continue; // a duplicate of an earlier record
        }
        let prev = last.entry(key.clone()).or_insert(-1);
        assert!(
            n > *prev,
            "aggregate {} out of order: {} after {}",
            String::from_utf8_lossy(&raw_key),
            n,
            prev
        );
        *prev = n;
    }
    (ids.len(), records.len() - ids.len())
}

pub fn topics(types: &[&str]) -> Vec<String> {
    types.iter().map(|t| format!("outbox.event.{t}")).collect()
}

pub fn consume_n(world: &World, topics: &[String], n: usize, timeout: Duration) -> Vec<Record> {
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    // Counts distinct ids incrementally: the condition runs after every record.
    let mut ids = HashSet::new();
    let mut counted = 0;
    consume(
        &world.kafka.brokers(),
        &refs,
        |records| {
            for r in &records[counted..] {
                ids.extend(r.header("id"));
            }
            counted = records.len();
            ids.len() >= n
        },
        timeout,
    )
}
