//! The `outbox-relay` command line: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use outbox_relay::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

/// mimalloc for the whole process, librdkafka's C allocations included (`override`):
/// librdkafka allocates each record's headers on the pipeline thread and frees them on its
/// delivery thread, which glibc's malloc serves through its slow, locked path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's own option calls (part of its C API; the crate exposes no constant for this one).
extern "C" {
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e`: how long freed memory stays
/// committed before it goes back to the OS.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// The purge delay the relay runs with, in ms (mimalloc 3's default is 1,000). Freed record
/// buffers then return to the OS within 100 ms instead of a second, where they piled up in a
/// drain: peak RSS 14 to 18 MB lower in the benchmark's full drains at the same CPU per event
/// (10 ms cut a little more but cost CPU; docs/PERFORMANCE.md, "Memory").
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Applies the relay's allocator options, unless the operator set them through mimalloc's
/// environment (`MIMALLOC_PURGE_DELAY`).
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it on each purge.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Relays a Postgres transactional outbox to Kafka, at least once, in order per aggregate."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default).
    Run(ConfigArg),
    /// Apply sql/outbox.sql and create the publication and slot.
    Init(ConfigArg),
    /// Validate the config, Postgres and Kafka; exit 1 with the fix on failure.
    Check(ConfigArg),
    /// Show slot lag, retained WAL and who holds the slot.
    Status(ConfigArg),
    /// Run the whole path on embedded defaults: a throwaway Postgres and Kafka endpoint.
    Demo(outbox_relay::demo::DemoArgs),
}

#[derive(Args, Default)]
struct ConfigArg {
    /// The TOML config file.
    #[arg(long, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    // One thread: the replication client's reader task and the pipeline hand every message
    // over through a channel, and on one thread that costs no wake-up of another. librdkafka
    // runs its own threads; blocking calls go to tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run(ConfigArg::default())) {
            Command::Run(arg) => run(arg).await,
            Command::Init(arg) => {
                let config = load(&arg)?;
                init_logging(&config);
                outbox_relay::commands::init(&config).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Check(arg) => {
                let config = match load(&arg) {
                    Ok(c) => c,
                    Err(e) => {
                        println!("config: FAILED: {e:#}");
                        return Ok(ExitCode::FAILURE);
                    }
                };
                Ok(if outbox_relay::commands::check(&config).await {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Status(arg) => {
                let config = load(&arg)?;
                outbox_relay::commands::status(&config).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Demo(args) => {
                init_text_logging("warn");
                outbox_relay::demo::run(args).await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(arg: &ConfigArg) -> anyhow::Result<Config> {
    let config = Config::load(arg.config.as_deref())?;
    outbox_relay::postgres::tls::check_files(&config.postgres_tls()?)?;
    Ok(config)
}

async fn run(arg: ConfigArg) -> anyhow::Result<ExitCode> {
    let config = load(&arg)?;
    init_logging(&config);
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    outbox_relay::relay::run(config, shutdown).await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signals(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_RELAY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn init_text_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number names mimalloc's purge delay: before the relay sets it, it reads
    /// mimalloc 3's default for that option (1,000 ms; its neighbours default to 1 and 0),
    /// and after, the relay's value.
    #[test]
    fn the_allocator_purges_freed_memory_sooner_than_its_default() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one integer option.
        assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
        tune_allocator();
        // SAFETY: as above.
        assert_eq!(
            unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) },
            PURGE_DELAY_MS
        );
    }
}
