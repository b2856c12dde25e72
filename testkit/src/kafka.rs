//! Apache Kafka (KRaft, one node acting as broker and controller, plus brokers a test adds for
//! replicated topics) as child processes, run from the jars `testkit/kafka/pom.xml` fetches
//! from Maven Central.
//!
//! The jars live in `target/kafka-<version>/libs` (or `$KAFKA_LIBS`); `.ci/run` fetches them,
//! and the first broker of a run fetches them itself when they are missing. Each broker gets
//! its own data directory (copied from a storage directory formatted once per version) and two
//! free ports (clients, controller); its data survives [`Kafka::restart`] and [`Kafka::stop`] +
//! [`Kafka::start_again`], like a real broker's.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

use crate::process::{log_stdio, read_log, tail, Proc};
use crate::proxy::Proxy;
use crate::{client_config, free_port, LOG_TAIL_LINES, POLL, PORT_ATTEMPTS};

/// The Apache Kafka release the tests and the benchmark run (`testkit/kafka/pom.xml`).
pub const KAFKA_VERSION: &str = "4.4.0";

/// How long a broker may take to start: a JVM on a busy 2-core machine.
const KAFKA_START_DEADLINE: Duration = Duration::from_secs(90);

/// How long fetching the jars may take (a cold `~/.m2`: about a minute).
const FETCH_DEADLINE: Duration = Duration::from_secs(600);

/// The cluster id every throwaway broker's storage is formatted with.
const CLUSTER_ID: &str = "b3V0Ym94LXJlbGF5LXQ";

/// How a broker is started.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    /// Extra `server.properties` lines, after (and so overriding) the defaults.
    pub properties: Vec<(String, String)>,
    /// Maximum Java heap.
    pub heap_mb: u32,
    /// Start fast (C1 only, serial GC): right for tests, wrong for measuring throughput.
    pub quick_jit: bool,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            properties: Vec::new(),
            heap_mb: 512,
            quick_jit: true,
        }
    }
}

impl KafkaOptions {
    /// Adds a `server.properties` line.
    pub fn property(mut self, key: &str, value: &str) -> Self {
        self.properties.push((key.to_owned(), value.to_owned()));
        self
    }

    /// For the benchmark: a bigger heap and the full JIT.
    pub fn for_throughput() -> Self {
        Self {
            properties: Vec::new(),
            heap_mb: 1024,
            quick_jit: false,
        }
    }
}

/// An Apache Kafka broker listening on 127.0.0.1 at a free port; killed on drop, its data
/// directory removed.
pub struct Kafka {
    proc: Option<Proc>,
    /// The port clients connect to (the proxy's, when behind one).
    port: u16,
    /// The port the broker listens on for clients.
    listen_port: u16,
    /// The controller's port: this node's own, or the first node's for an added broker.
    controller_port: u16,
    /// 1 for the first node (broker and controller); more for brokers added to its cluster.
    node_id: u32,
    options: KafkaOptions,
    dir: tempfile::TempDir,
    log_path: PathBuf,
    /// Where this broker writes the class-data archive of its run when it exits (the one
    /// broker that makes [`class_archive`]).
    archive_to: Option<PathBuf>,
}

impl Kafka {
    /// Starts a broker with the defaults (auto-creation of topics off, as in production) and
    /// waits until it answers a metadata request.
    pub fn start() -> Kafka {
        Self::try_start().unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Kafka::start`] that reports a failure instead of panicking.
    pub fn try_start() -> Result<Kafka, String> {
        Self::try_start_with(KafkaOptions::default())
    }

    /// Starts a broker with `options`.
    pub fn start_with(options: KafkaOptions) -> Kafka {
        Self::try_start_with(options).unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Kafka::start_with`] that reports a failure instead of panicking.
    pub fn try_start_with(options: KafkaOptions) -> Result<Kafka, String> {
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().map_err(|e| format!("free port: {e}"))?;
            let mut kafka = Self::prepare(options.clone(), port, port, 1, None)?;
            match kafka.spawn_and_wait() {
                Ok(()) => return Ok(kafka),
                // It exited: most likely a port was taken meanwhile, so try others.
                Err(why) if why.exited => last_failure = why.message,
                Err(why) => return Err(why.message),
            }
        }
        Err(format!("kafka did not start: {last_failure}"))
    }

    /// Starts a broker reachable only through a [`Proxy`] (it advertises the proxy's port),
    /// so a test can cut the network between clients and the broker.
    pub fn start_behind_proxy() -> (Kafka, Proxy) {
        let (listener, proxy_port) = Proxy::bind();
        let port = free_port().expect("free port");
        let proxy = Proxy::forward(listener, port);
        let mut kafka = Self::prepare(KafkaOptions::default(), port, proxy_port, 1, None)
            .unwrap_or_else(|why| panic!("{why}"));
        if let Err(why) = kafka.spawn_and_wait() {
            panic!("{}", why.message);
        }
        (kafka, proxy)
    }

    /// Starts another broker (broker only, `node_id` 2 or more, unique in the cluster) in this
    /// node's cluster, so topics can have more than one replica; stop it to shrink their
    /// in-sync replicas. Waits until it answers. Its own data, ports and log; killed on drop.
    pub fn add_broker(&self, node_id: u32) -> Kafka {
        assert!(node_id >= 2, "node 1 is the first node");
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().expect("free port");
            let mut kafka = Self::prepare(
                KafkaOptions::default(),
                port,
                port,
                node_id,
                Some(self.controller_port),
            )
            .unwrap_or_else(|why| panic!("{why}"));
            match kafka.spawn_and_wait() {
                Ok(()) => return kafka,
                Err(why) if why.exited => last_failure = why.message,
                Err(why) => panic!("{}", why.message),
            }
        }
        panic!("broker {node_id} did not start: {last_failure}");
    }

    /// A data directory and a `server.properties` for node `node_id` listening on
    /// `listen_port` and advertising `port`; `controller_port` is the first node's for an
    /// added broker (`None`: this node is the controller, on a free port).
    fn prepare(
        options: KafkaOptions,
        listen_port: u16,
        port: u16,
        node_id: u32,
        controller_port: Option<u16>,
    ) -> Result<Kafka, String> {
        let libs = kafka_libs()?;
        let template = formatted_storage(&libs, node_id)?;
        let dir = tempfile::Builder::new()
            .prefix("kafka-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        copy_dir(&template, &dir.path().join("data"))
            .map_err(|e| format!("copying the formatted storage: {e}"))?;
        let controller_port = match controller_port {
            Some(port) => port,
            None => free_port().map_err(|e| format!("free port: {e}"))?,
        };
        let kafka = Kafka {
            proc: None,
            port,
            listen_port,
            controller_port,
            node_id,
            options,
            log_path: dir.path().join("kafka.log"),
            archive_to: None,
            dir,
        };
        kafka.write_config()?;
        Ok(kafka)
    }

    fn write_config(&self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let mut properties = server_properties(
            self.node_id,
            self.listen_port,
            self.port,
            self.controller_port,
            &data,
        );
        for (key, value) in &self.options.properties {
            properties.push_str(&format!("{key}={value}\n"));
        }
        std::fs::write(self.dir.path().join("server.properties"), properties)
            .map_err(|e| format!("writing server.properties: {e}"))?;
        std::fs::write(self.dir.path().join("log4j2.properties"), LOG4J2)
            .map_err(|e| format!("writing log4j2.properties: {e}"))
    }

    fn spawn_and_wait(&mut self) -> Result<(), NotReady> {
        let libs = kafka_libs().map_err(|message| NotReady {
            exited: false,
            message,
        })?;
        let (out, err) = log_stdio(&self.log_path);
        let mut cmd = Command::new(java_bin());
        cmd.args(jvm_flags(&self.options));
        match &self.archive_to {
            Some(archive) => {
                cmd.arg(format!("-XX:ArchiveClassesAtExit={}", archive.display()));
            }
            // Tests only: the benchmark's JVM runs as it would in production.
            None if self.options.quick_jit => {
                if let Some(archive) = class_archive() {
                    cmd.arg(format!("-XX:SharedArchiveFile={}", archive.display()));
                }
            }
            None => {}
        }
        cmd.arg(format!(
            "-Dlog4j2.configurationFile={}",
            self.dir.path().join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg("kafka.Kafka")
        .arg(self.dir.path().join("server.properties"))
        .current_dir(self.dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        let proc = Proc::spawn("kafka", &mut cmd).map_err(|e| NotReady {
            exited: true,
            message: e.to_string(),
        })?;
        self.proc = Some(proc);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), NotReady> {
        let deadline = Instant::now() + KAFKA_START_DEADLINE;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let consumer: BaseConsumer =
            client_config(&self.brokers())
                .create()
                .map_err(|e: rdkafka::error::KafkaError| NotReady {
                    exited: false,
                    message: e.to_string(),
                })?;
        loop {
            if let Some(status) = self.proc.as_mut().and_then(Proc::try_wait) {
                return Err(NotReady {
                    exited: true,
                    message: format!("kafka exited ({status})\n{}", self.log_tail()),
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
                        "kafka not ready on port {} after {KAFKA_START_DEADLINE:?}\n{}",
                        self.port,
                        self.log_tail()
                    ),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// `bootstrap.servers` for clients and for the relay.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's process id (panics while it is stopped).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("kafka is running").id()
    }

    /// The directory holding the broker's configuration, data (`data/`) and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's output so far (every start appends to it).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered, like a
    /// network partition. Nothing is lost; [`Kafka::resume`] continues.
    pub fn pause(&self) {
        self.running().signal("STOP").expect("SIGSTOP kafka");
    }

    /// Continues a broker frozen by [`Kafka::pause`].
    pub fn resume(&self) {
        self.running().signal("CONT").expect("SIGCONT kafka");
    }

    /// Kills the broker (SIGKILL), so clients see refused connections. Its data stays;
    /// [`Kafka::start_again`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.signal("CONT");
            proc.kill();
        }
    }

    /// Stops the broker cleanly (SIGTERM, as an operator's restart does), waiting up to a
    /// minute before killing it. Its data stays; [`Kafka::start_again`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.signal("CONT");
            proc.terminate(Duration::from_secs(60));
        }
    }

    /// Starts a stopped (or killed) broker again, on the same ports with the same data, and
    /// waits until it answers.
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "kafka is still running");
        if let Err(why) = self.spawn_and_wait() {
            panic!(
                "kafka did not start again on port {}: {}",
                self.port, why.message
            );
        }
    }

    /// Kills the broker and starts it again on the same ports; topics and records survive.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Creates a topic (replication factor 1) and waits until its metadata shows every
    /// partition. An existing topic is fine.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.try_create_topic(name, partitions)
            .unwrap_or_else(|why| panic!("{why}"));
    }

    /// [`Kafka::create_topic`] that reports a failure instead of panicking.
    pub fn try_create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        self.try_create_topic_with(name, partitions, &[])
    }

    /// [`Kafka::create_topic`] with topic configs (`max.message.bytes`, `min.insync.replicas`).
    pub fn create_topic_with(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) {
        self.try_create_topic_with(name, partitions, configs)
            .unwrap_or_else(|why| panic!("{why}"));
    }

    /// [`Kafka::create_topic_with`] that reports a failure instead of panicking.
    pub fn try_create_topic_with(
        &self,
        name: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<(), String> {
        self.try_create_replicated_topic(name, partitions, 1, configs)
    }

    /// [`Kafka::create_topic_with`] with `replicas` replicas of each partition (a cluster of
    /// that many brokers: [`Kafka::add_broker`]).
    pub fn create_replicated_topic(
        &self,
        name: &str,
        partitions: i32,
        replicas: i32,
        configs: &[(&str, &str)],
    ) {
        self.try_create_replicated_topic(name, partitions, replicas, configs)
            .unwrap_or_else(|why| panic!("{why}"));
    }

    fn try_create_replicated_topic(
        &self,
        name: &str,
        partitions: i32,
        replicas: i32,
        configs: &[(&str, &str)],
    ) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.brokers())
            .create()
            .map_err(|e| format!("admin client: {e}"))?;
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replicas));
        for (key, value) in configs {
            topic = topic.set(key, value);
        }
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

    /// How many partitions the broker knows `topic` to have (`None`: no such topic).
    pub fn partitions(&self, topic: &str) -> Option<usize> {
        let consumer: BaseConsumer = client_config(&self.brokers()).create().ok()?;
        crate::partition_count(&consumer, topic)
    }

    /// Sets topic configs (`min.insync.replicas`, `max.message.bytes`) through the admin API.
    /// Kafka's `AlterConfigs` replaces the topic's whole set of overrides: pass every one the
    /// topic should keep.
    pub fn alter_topic_config(&self, name: &str, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.brokers())
            .create()
            .expect("admin client");
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(name));
        for (key, value) in configs {
            alter = alter.set(key, value);
        }
        let results = crate::block_on(admin.alter_configs([&alter], &AdminOptions::new()))
            .unwrap_or_else(|e| panic!("alter topic {name}: {e}\n{}", self.log_tail()));
        for result in results {
            if let Err((resource, code)) = result {
                panic!("alter topic {name} ({resource:?}): {code}");
            }
        }
    }

    fn running(&self) -> &Proc {
        self.proc.as_ref().expect("kafka is running")
    }

    fn log_tail(&self) -> String {
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path.display(),
            tail(&self.log(), LOG_TAIL_LINES)
        )
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Why the broker did not become ready.
struct NotReady {
    exited: bool,
    message: String,
}

/// Node 1: broker and controller; other nodes: brokers of node 1's cluster. Plaintext;
/// production's defaults where a test would notice (no auto-creation of topics),
/// single-replica internal topics, and few threads (tests run many brokers side by side on two
/// cores).
fn server_properties(
    node_id: u32,
    listen_port: u16,
    advertised: u16,
    controller_port: u16,
    data: &Path,
) -> String {
    let (roles, listeners) = if node_id == 1 {
        (
            "broker,controller",
            format!("PLAINTEXT://127.0.0.1:{listen_port},CONTROLLER://127.0.0.1:{controller_port}"),
        )
    } else {
        ("broker", format!("PLAINTEXT://127.0.0.1:{listen_port}"))
    };
    format!(
        "process.roles={roles}
node.id={node_id}
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners={listeners}
advertised.listeners=PLAINTEXT://127.0.0.1:{advertised}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.enable=false
",
        data = data.display()
    )
}

/// Warnings and the broker's start and stop lines: enough to see why one failed.
const LOG4J2: &str = "status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = info
";

fn jvm_flags(options: &KafkaOptions) -> Vec<String> {
    let mut flags = vec![
        format!("-Xmx{}m", options.heap_mb),
        format!("-Xms{}m", options.heap_mb.min(256)),
        "-XX:-UsePerfData".to_owned(),
        "-Djava.awt.headless=true".to_owned(),
    ];
    if options.quick_jit {
        flags.push("-XX:+UseSerialGC".to_owned());
        flags.push("-XX:TieredStopAtLevel=1".to_owned());
    } else {
        flags.push("-XX:+UseG1GC".to_owned());
        flags.push("-XX:MaxGCPauseMillis=20".to_owned());
    }
    // While investigating (e.g. `-Xlog:gc:file=/tmp/kafka-gc-%p.log`): extra flags, last.
    if let Ok(extra) = std::env::var("TESTKIT_KAFKA_JVM_FLAGS") {
        flags.extend(extra.split_whitespace().map(str::to_owned));
    }
    flags
}

/// `$JAVA_HOME/bin/java` when set, else `java` on PATH.
pub fn java_bin() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .filter(|home| !home.is_empty())
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|java| java.is_file())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// The workspace's `target/kafka-<version>`.
fn kafka_home() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join(format!("kafka-{KAFKA_VERSION}"))
}

/// The broker's jars: `$KAFKA_LIBS`, else `target/kafka-<version>/libs`, fetched through Maven
/// when missing (one fetch at a time; the others wait for it).
pub fn kafka_libs() -> Result<PathBuf, String> {
    if let Some(libs) = std::env::var_os("KAFKA_LIBS").filter(|l| !l.is_empty()) {
        return Ok(PathBuf::from(libs));
    }
    let libs = kafka_home().join("libs");
    let pom = Path::new(env!("CARGO_MANIFEST_DIR")).join("kafka/pom.xml");
    maven_fetch(&pom, &libs, &format!("Kafka {KAFKA_VERSION}"))?;
    Ok(libs)
}

/// A class-data archive of the classes a broker loads while it starts (the JVM's dynamic CDS),
/// made once per version by one broker started and stopped for it: test brokers that map it
/// start in about 2.7 s on one CPU-second instead of 3.5 s on two. `None` if it could not be
/// made (then brokers start without it); a JVM that finds it stale ignores it.
fn class_archive() -> Option<PathBuf> {
    static ARCHIVE: OnceLock<Option<PathBuf>> = OnceLock::new();
    ARCHIVE
        .get_or_init(|| {
            let dir = kafka_home().join("classes");
            // Always "made", archive or not, so a failure is not retried by every test.
            let made = once(&dir, "archiving Kafka's classes", |staging| {
                if let Err(why) = dump_class_archive(&staging.join("kafka.jsa")) {
                    eprintln!("no class-data archive for Kafka (brokers start without): {why}");
                }
                Ok(())
            });
            made.ok()
                .map(|()| dir.join("kafka.jsa"))
                .filter(|archive| archive.is_file())
        })
        .clone()
}

fn dump_class_archive(archive: &Path) -> Result<(), String> {
    let port = free_port().map_err(|e| format!("free port: {e}"))?;
    let mut kafka = Kafka::prepare(KafkaOptions::default(), port, port, 1, None)?;
    kafka.archive_to = Some(archive.to_owned());
    kafka.spawn_and_wait().map_err(|why| why.message)?;
    // The JVM writes the archive as it exits.
    kafka.stop();
    if archive.is_file() {
        Ok(())
    } else {
        Err(format!("the JVM wrote none\n{}", kafka.log_tail()))
    }
}

/// The jars `pom` depends on, copied into `libs` by Maven (`dependency:copy-dependencies`,
/// cached in `~/.m2`) unless `libs` exists already; concurrent callers fetch once, the others
/// wait. `what` names it in errors.
pub fn maven_fetch(pom: &Path, libs: &Path, what: &str) -> Result<(), String> {
    once(libs, &format!("fetching {what}"), |staging| {
        let output = Command::new("mvn")
            .args(["-q", "-B", "-f"])
            .arg(pom)
            .arg("dependency:copy-dependencies")
            .arg(format!("-DoutputDirectory={}", staging.display()))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running mvn (is Maven installed?): {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mvn could not fetch {what} ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    })
}

/// A storage directory formatted once per version and node id (`kafka-storage format`), which
/// each broker copies: formatting starts a JVM, copying does not.
fn formatted_storage(libs: &Path, node_id: u32) -> Result<PathBuf, String> {
    let storage = match node_id {
        1 => kafka_home().join("formatted"),
        n => kafka_home().join(format!("formatted-node{n}")),
    };
    once(&storage, "formatting Kafka storage", |staging| {
        let config = staging.join("format.properties");
        let data = staging.join("data");
        std::fs::write(&config, server_properties(node_id, 1, 1, 2, &data))
            .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let output = Command::new(java_bin())
            .args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp"])
            .arg(format!("{}/*", libs.display()))
            .args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running java: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "kafka-storage format failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    })?;
    Ok(storage.join("data"))
}

/// Makes `dir` exist exactly once across concurrent test processes: `make` fills a staging
/// directory, renamed into place when done; a `.lock` directory next to `dir` keeps others
/// waiting meanwhile (one left by a killed process is taken over after the deadline).
fn once(
    dir: &Path,
    what: &str,
    make: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().expect("a parent directory");
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let lock = dir.with_extension("lock");
    let deadline = Instant::now() + FETCH_DEADLINE;
    while std::fs::create_dir(&lock).is_err() {
        if dir.is_dir() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            // Its holder died: take it over.
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let result = (|| {
        if dir.is_dir() {
            return Ok(());
        }
        let staging = dir.with_extension(format!("staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)
            .map_err(|e| format!("creating {}: {e}", staging.display()))?;
        make(&staging).map_err(|e| format!("{what}: {e}"))?;
        std::fs::rename(&staging, dir)
            .map_err(|e| format!("{what}: moving {} into place: {e}", staging.display()))
    })();
    let _ = std::fs::remove_dir(&lock);
    result
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
