//! `outbox-relay demo` and what it needs at run time: the command ([`run()`]) and the
//! throwaway Postgres cluster it starts ([`postgres`], with [`install`] finding the server
//! binaries). The test kit (`testkit/`) re-uses the cluster for the tests and the benchmark.

pub mod install;
pub mod postgres;
mod run;

pub use run::{run, DemoArgs, DemoError};
