//! The `tansu` broker (Kafka protocol, in-memory storage) as a child process.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

use crate::process::{log_stdio, read_log, tail, Proc};
use crate::proxy::Proxy;
use crate::{client_config, free_port, LOG_TAIL_LINES, POLL, PORT_ATTEMPTS, START_DEADLINE};

/// The tansu release CI installs (`.ci/run`); any recent one works.
pub const TANSU_VERSION: &str = "0.6.0";

/// A `tansu` broker with in-memory storage, listening on 127.0.0.1 at a free port; killed on
/// drop. Its data lives only as long as the process.
pub struct Tansu {
    proc: Proc,
    port: u16,
    dir: tempfile::TempDir,
    log_path: PathBuf,
    bin: PathBuf,
}

impl Tansu {
    /// Starts a broker and waits until it answers a metadata request.
    pub fn start() -> Tansu {
        Self::try_start().unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Tansu::start`] that reports a failure instead of panicking.
    pub fn try_start() -> Result<Tansu, String> {
        let bin = try_tansu_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let log_path = dir.path().join("tansu.log");
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().map_err(|e| format!("free port: {e}"))?;
            let mut proc = spawn_tansu(&bin, port, port, &log_path)?;
            match wait_tansu_ready(&mut proc, port, &log_path) {
                Ok(()) => {
                    return Ok(Tansu {
                        proc,
                        port,
                        dir,
                        log_path,
                        bin,
                    })
                }
                // It exited: most likely the port was taken meanwhile, so try another.
                Err(why) if why.exited => last_failure = why.message,
                Err(why) => return Err(why.message),
            }
        }
        Err(format!("tansu did not start: {last_failure}"))
    }

    /// Starts a broker reachable only through a [`Proxy`] (it advertises the proxy's port),
    /// so a test can cut the network between clients and the broker.
    pub fn start_behind_proxy() -> (Tansu, Proxy) {
        let bin = tansu_bin();
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .expect("tempdir");
        let log_path = dir.path().join("tansu.log");
        let (listener, proxy_port) = Proxy::bind();
        let port = free_port().expect("free port");
        let proxy = Proxy::forward(listener, port);
        let mut proc =
            spawn_tansu(&bin, port, proxy_port, &log_path).unwrap_or_else(|why| panic!("{why}"));
        if let Err(why) = wait_tansu_ready(&mut proc, proxy_port, &log_path) {
            panic!("{}", why.message);
        }
        let tansu = Tansu {
            proc,
            port: proxy_port,
            dir,
            log_path,
            bin,
        };
        (tansu, proxy)
    }

    /// `bootstrap.servers` for clients and for the relay.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// The directory holding the broker's log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's output so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered, like a
    /// network partition. Nothing is lost; [`Tansu::resume`] continues.
    pub fn pause(&self) {
        self.proc.signal("STOP").expect("SIGSTOP tansu");
    }

    /// Continues a broker frozen by [`Tansu::pause`].
    pub fn resume(&self) {
        self.proc.signal("CONT").expect("SIGCONT tansu");
    }

    /// Kills the broker (SIGKILL), so clients see refused connections.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Kills and starts the broker again on the same port. Storage is in memory: all topics
    /// and records are gone afterwards.
    pub fn restart(&mut self) {
        self.kill();
        self.proc = spawn_tansu(&self.bin, self.port, self.port, &self.log_path)
            .unwrap_or_else(|why| panic!("{why}"));
        if let Err(why) = wait_tansu_ready(&mut self.proc, self.port, &self.log_path) {
            panic!(
                "tansu did not restart on port {}: {}",
                self.port, why.message
            );
        }
    }

    /// Creates a topic (replication factor 1) and waits until its metadata shows every
    /// partition. An existing topic is fine.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.try_create_topic(name, partitions)
            .unwrap_or_else(|why| panic!("{why}"));
    }

    /// [`Tansu::create_topic`] that reports a failure instead of panicking.
    pub fn try_create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.brokers())
            .create()
            .map_err(|e| format!("admin client: {e}"))?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = crate::block_on(admin.create_topics([&topic], &AdminOptions::new()))
            .map_err(|e| format!("create topic {name}: {e}\n{}", self.log_tail()))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(format!("create topic {topic}: {code}")),
            }
        }
        crate::wait_for_partitions(&self.brokers(), name, partitions)
    }

    fn log_tail(&self) -> String {
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path.display(),
            tail(&self.log(), LOG_TAIL_LINES)
        )
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // A paused broker must be continued, or the kill is not delivered until it is.
        let _ = self.proc.signal("CONT");
        self.proc.kill();
    }
}

/// Why tansu did not become ready.
struct NotReady {
    exited: bool,
    message: String,
}

fn wait_tansu_ready(proc: &mut Proc, port: u16, log_path: &Path) -> Result<(), NotReady> {
    let log_tail = || {
        format!(
            "--- last lines of {} ---\n{}",
            log_path.display(),
            tail(&read_log(log_path), LOG_TAIL_LINES)
        )
    };
    let deadline = Instant::now() + START_DEADLINE;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let brokers = format!("127.0.0.1:{port}");
    let consumer: BaseConsumer = client_config(&brokers).create().map_err(|e| NotReady {
        exited: false,
        message: e.to_string(),
    })?;
    loop {
        if let Some(status) = proc.try_wait() {
            return Err(NotReady {
                exited: true,
                message: format!("tansu exited ({status})\n{}", log_tail()),
            });
        }
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            if let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(2)) {
                if !md.brokers().is_empty() {
                    return Ok(());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(NotReady {
                exited: false,
                message: format!(
                    "tansu not ready on port {port} after {START_DEADLINE:?}\n{}",
                    log_tail()
                ),
            });
        }
        std::thread::sleep(POLL);
    }
}

fn spawn_tansu(bin: &Path, port: u16, advertised: u16, log_path: &Path) -> Result<Proc, String> {
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://127.0.0.1:{advertised}");
    let (out, err) = log_stdio(log_path);
    let mut cmd = Command::new(bin);
    cmd.arg("broker")
        .args(["--listener-url", &url])
        .args(["--advertised-listener-url", &advertised])
        .args(["--storage-engine", "memory://tansu/"])
        .env(
            "RUST_LOG",
            std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    Proc::spawn(&bin.display().to_string(), &mut cmd).map_err(|e| e.to_string())
}

/// The tansu binary: env `TANSU_BIN`, else `tansu` on PATH, else `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> PathBuf {
    try_tansu_bin().unwrap_or_else(|why| panic!("{why}"))
}

/// [`tansu_bin`] that reports a missing binary instead of panicking.
pub fn try_tansu_bin() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("TANSU_BIN").filter(|b| !b.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("tansu"))
        .find(|p| p.is_file());
    let in_cargo_home = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/tansu"))
        .filter(|p| p.is_file());
    on_path.or(in_cargo_home).ok_or_else(|| {
        format!(
            "tansu not found (TANSU_BIN, PATH, ~/.cargo/bin): install it with \
             `cargo install tansu --locked --features dynostore --version {TANSU_VERSION}`"
        )
    })
}
