//! outbox-relay: moves events from a Postgres transactional outbox to Kafka.
//!
//! The binary in `main.rs` only parses the command line; everything it runs lives here so that
//! tests, benchmarks and the demo share one code path. The stages, in the order an event
//! passes them:
//!
//! ```text
//!              relay (lifecycle: start, sessions, backoff)   policy (retry / standby / halt)
//!   ┌───────────────────────────────────────────────────────────────────────────────────────┐
//!   │ postgres ──▶ source ──────────▶ pipeline ───────────────────▶ sink ──▶ Kafka          │
//!   │ (tls, pool,  (logical+pgoutput,  (route: row to record,         (kafka: produce,      │
//!   │  setup,       or polling)         checkpoint: what may be        delivery acks)       │
//!   │  coverage)                        confirmed back to Postgres)                         │
//!   └───────────────────────────────────────────────────────────────────────────────────────┘
//!     beside them: http (/metrics, /healthz, /readyz, /status) ◀── metrics, status
//!     around them: config (loaded and validated once), error (the typed faults)
//!     for the operator, called by main only: commands (init, check, status), demo
//! ```
//!
//! Reading order: `source` (where rows come from, and the `Source` contract), `pipeline` (the
//! one loop that drives a source into the sink: drain, then confirm), `route` (row to record),
//! `sink` (Kafka), `checkpoint` (what may be confirmed), `relay` (the lifecycle around them),
//! `policy` (what a failure means: a session ends with the pipeline's `SessionError`, the
//! source's fault or the sink's; sources never see the sink's). Which module may import which is pinned by
//! `tests/architecture.rs`.

pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod demo;
pub mod error;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod postgres;
pub mod relay;
pub mod route;
pub mod sink;
pub mod source;
pub mod status;
