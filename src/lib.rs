//! outbox-relay: moves events from a Postgres transactional outbox to Kafka.
//!
//! The binary in `main.rs` only parses the command line; everything it runs lives here so that
//! tests, benchmarks and the demo share one code path. Reading order: `source` (where rows
//! come from), `route` (row to record), `sink` (Kafka), `checkpoint` (what may be confirmed),
//! `relay` (the lifecycle around them).

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod error;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod relay;
pub mod route;
pub mod sink;
pub mod source;
pub mod status;
pub mod tls;
