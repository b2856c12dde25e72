//! The decode ceiling (measurement 1): a null consumer of the replication stream
//! (pgwire-replication and the relay's `pgoutput::decode`, every column walked, nothing sent),
//! and `pg_recvlogical` into `/dev/null`, Postgres' own client.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use outbox_relay::config::Config;
use outbox_relay::source::logical::replication_config;
use outbox_relay::source::pgoutput::{self, Message};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use testkit::Proc;

use crate::backlog::{query_lsn, SLOT_CONFIRMED};
use crate::procfs::own_cpu_secs;
use crate::relay::relay_toml;
use crate::report::Rate;
use crate::{Env, CONFIRM_EVERY, DB, PUBLICATION};

/// [`null_consume`] on a runtime of its own with one thread, like the relay's: the replication
/// worker and the consumer share it, so handing a message over costs no cross-thread wake-up.
pub fn null_consume_on_own_thread(
    db: &tokio_postgres::Client,
    url: &str,
    slot: &str,
    n: u64,
    end: u64,
) -> Result<Rate> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(null_consume(db, url, slot, n, end))
}

/// Streams `slot` from its confirmed position, decodes every message (walking every column of
/// every insert) and discards it, confirming each commit; stops at the commit that completes
/// the `n`th insert.
pub async fn null_consume(
    db: &tokio_postgres::Client,
    url: &str,
    slot: &str,
    n: u64,
    end: u64,
) -> Result<Rate> {
    let toml = relay_toml(url, slot, "127.0.0.1:9", 9);
    let cfg = Config::from_parts(Some(&toml), Vec::<(String, String)>::new())
        .map_err(|e| anyhow!("bench config: {e}"))?;
    let start = query_lsn(db, SLOT_CONFIRMED, slot)
        .await?
        .ok_or_else(|| anyhow!("slot {slot} missing"))?;
    let start = Lsn::from_u64(start);
    let t0 = Instant::now();
    let cpu0 = own_cpu_secs();
    let repl = replication_config(&cfg)
        .map_err(|e| anyhow!("replication config: {e}"))?
        .with_start_lsn(start)
        .with_ack_lsn(start)
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1));
    let mut stream = ReplicationClient::connect(repl).await?;
    stream.wait_started().await?;
    let mut inserts = 0u64;
    let mut checksum = 0usize;
    let mut last_confirm = Instant::now();
    loop {
        let event = stream
            .recv()
            .await?
            .ok_or_else(|| anyhow!("the replication stream ended after {inserts} inserts"))?;
        match event {
            ReplicationEvent::XLogData { data, .. } => {
                let message =
                    pgoutput::decode(&data).map_err(|e| anyhow!("pgoutput decode: {e:?}"))?;
                if let Message::Insert { new, .. } = message {
                    inserts += 1;
                    for value in new.iter() {
                        checksum = checksum.wrapping_add(value.as_bytes().map_or(0, <[u8]>::len));
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                // Confirm like the relay does, at most every 50 ms: raising the applied LSN
                // wakes the replication worker, which at one event per transaction would
                // cost more than the decoding.
                if last_confirm.elapsed() >= CONFIRM_EVERY {
                    stream.update_applied_lsn(end_lsn);
                    last_confirm = Instant::now();
                }
                if inserts >= n {
                    if end_lsn.as_u64() > end {
                        bail!(
                            "the backlog ended at {end_lsn}, past {}",
                            Lsn::from_u64(end)
                        );
                    }
                    break;
                }
            }
            ReplicationEvent::StoppedAt { .. } => bail!("the stream stopped early"),
            _ => {}
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu_secs = own_cpu_secs() - cpu0;
    std::hint::black_box(checksum);
    let _ = stream.shutdown().await;
    Ok(Rate {
        events: inserts,
        secs,
        cpu_secs,
    })
}

/// The decode ceiling as Postgres' own client sees it: `pg_recvlogical` streaming the slot's
/// pgoutput (the relay's options) into `/dev/null` until the end of the backlog.
pub fn recvlogical_ceiling(env: &Env<'_>, slot: &str, n: u64, end: u64) -> Result<Rate> {
    let t0 = Instant::now();
    let mut cmd = Command::new(env.pg.bin_dir().join("pg_recvlogical"));
    cmd.args(["-h", "127.0.0.1", "-U", "postgres", "-d", DB])
        .arg("-p")
        .arg(env.pg.port().to_string())
        // `-F 0`: no fsync, which /dev/null refuses.
        .args([
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "-F",
            "0",
            "-f",
            "/dev/null",
        ])
        .arg(format!("--endpos={}", Lsn::from_u64(end)))
        .args(["-o", "proto_version=1", "-o", "messages=true"])
        .arg("-o")
        .arg(format!("publication_names={PUBLICATION}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut recv = Proc::spawn("pg_recvlogical", &mut cmd)?;
    let Some(status) = recv.wait_until(t0 + Duration::from_secs(60 + n / 1_000)) else {
        recv.terminate(Duration::from_secs(5));
        bail!("pg_recvlogical did not reach the end of the backlog in time");
    };
    let secs = t0.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut stderr) = recv.child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        bail!("pg_recvlogical exited ({status}): {}", err.trim());
    }
    Ok(Rate {
        events: n,
        secs,
        cpu_secs: f64::NAN,
    })
}
