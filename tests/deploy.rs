//! The deployment artifacts under `deploy/`, checked with the real tools they are written for
//! (docs/DEPLOY.md):
//! - the alert rules with `promtool check rules`, and their unit tests with `promtool test rules`;
//! - every Grafana dashboard query and every alert expression, evaluated by a real Prometheus
//!   scraping a real relay that is relaying events; `/metrics` through `promtool check metrics`;
//! - every metric name the dashboard and the alerts use, against the constants in `src/metrics.rs`;
//! - the Helm chart through Helm's own lint (its values and each `ci/` example), rendered by Helm
//!   and validated against the Kubernetes schemas, its `relay.toml` loaded by the relay's config
//!   loader; the plain manifests in `deploy/k8s/` the same way.
//!
//! The tools come from `bash .ci/run`: Debian's `prometheus` package (`promtool`, `prometheus`)
//! and PyPI's `helm-sdkpy` and `kubernetes-validate`, driven by `scripts/*.py`. A missing tool
//! fails the test with the command that installs it: nothing is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outbox_relay::config::Config;
use serde_json::Value;
use testkit::*;

/// The Kubernetes version the manifests are validated for (kubernetes-validate has 1.25+).
const KUBERNETES_VERSION: &str = "1.30.0";
/// The scrape job the alerts expect (`up{job="outbox-relay"}`, the chart's ServiceMonitor).
const JOB: &str = "outbox-relay";
/// What Grafana's variables become when the test evaluates the dashboard's queries.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[
    ("${__rate_interval}", "1m"),
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "1h"),
    ("${job}", JOB),
    ("$job", JOB),
    ("${instance}", ".*"),
    ("$instance", ".*"),
];
/// The relay drains within 10 s of SIGTERM; Kubernetes must wait longer than that.
const MIN_GRACE_PERIOD_SECONDS: i64 = 15;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The executable `name` on PATH, or a failure naming the package that provides it.
fn tool(name: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not on PATH: {install} (bash .ci/run does)"))
}

fn promtool() -> PathBuf {
    tool("promtool", "apt-get install prometheus")
}

fn python3() -> PathBuf {
    tool("python3", "apt-get install python3 python3-pip")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` in the repository root and returns its output, failing unless it succeeds.
fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(out.status.success(), "{what} failed: {}", output_text(&out));
    out
}

fn script(name: &str) -> Command {
    let mut cmd = Command::new(python3());
    cmd.arg(repo().join("scripts").join(name));
    cmd
}

// ---------------------------------------------------------------------------------------------
// Alert rules
// ---------------------------------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let out = run_ok(
        Command::new(promtool()).args(["check", "rules", "deploy/prometheus/alerts.yaml"]),
        "promtool check rules",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rules = alert_names().len();
    assert!(
        text.contains(&format!("SUCCESS: {rules} rules found")),
        "promtool saw other rules than the {rules} alerts in the file:\n{text}"
    );
    let out = run_ok(
        Command::new(promtool()).args(["test", "rules", "deploy/prometheus/alerts_test.yaml"]),
        "promtool test rules",
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS"));

    // The unit tests cover every alert, each firing (exp_alerts with labels) and not firing.
    let tests = read("deploy/prometheus/alerts_test.yaml");
    for name in alert_names() {
        let blocks: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|b| b.contains(&format!("alertname: {name}\n")))
            .collect();
        assert!(
            blocks.iter().any(|b| b.contains("exp_labels:")),
            "no test where {name} fires"
        );
        assert!(
            blocks.iter().any(|b| b.contains("exp_alerts: []")),
            "no test where {name} stays quiet"
        );
    }
}

/// The alert names in `deploy/prometheus/alerts.yaml`, in order.
fn alert_names() -> Vec<String> {
    read("deploy/prometheus/alerts.yaml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Metric names
// ---------------------------------------------------------------------------------------------

/// Every `outbox_relay_*` name in `text`, histogram series suffixes removed.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "outbox_relay_";
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let after = &rest[at..];
        let end = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(after.len());
        let name = after[..end].trim_end_matches('_');
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &after[end..];
    }
    names
}

/// The metric names `src/metrics.rs` defines: values of its `pub const X: &str = "outbox_relay_…"`.
fn defined_metric_names() -> BTreeSet<String> {
    read("src/metrics.rs")
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const ") && l.contains(": &str"))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|v| v.starts_with("outbox_relay_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn dashboard_and_alerts_use_only_metrics_defined_in_the_code() {
    let defined = defined_metric_names();
    assert!(
        defined.contains("outbox_relay_end_to_end_latency_seconds"),
        "could not read the constants of src/metrics.rs: {defined:?}"
    );
    for file in [
        "deploy/grafana/outbox-relay.json",
        "deploy/prometheus/alerts.yaml",
    ] {
        let used = metric_names_in(&read(file));
        assert!(used.len() >= 5, "{file}: found only {used:?}");
        let unknown: Vec<_> = used.difference(&defined).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics src/metrics.rs does not define: {unknown:?}"
        );
    }
    // The histogram is used through its _bucket series; the scan must map it back.
    assert!(metric_names_in(&read("deploy/grafana/outbox-relay.json"))
        .contains("outbox_relay_end_to_end_latency_seconds"));
}

#[test]
fn metric_name_scan_strips_series_suffixes_and_keeps_unknown_names() {
    let names =
        metric_names_in("rate(outbox_relay_x_seconds_bucket{a=\"b\"}[1m]) outbox_relay_nope_total");
    assert_eq!(
        names,
        BTreeSet::from([
            "outbox_relay_x_seconds".to_string(),
            "outbox_relay_nope_total".to_string()
        ])
    );
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus scraping a real relay
// ---------------------------------------------------------------------------------------------

/// `prometheus` as a child process on a free port, with its own config and storage; killed on
/// drop.
struct Prometheus {
    child: Child,
    port: u16,
    /// Config and storage; deleted on drop.
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(config_yaml: &str) -> Prometheus {
        let bin = tool("prometheus", "apt-get install prometheus");
        let dir = tempfile::Builder::new()
            .prefix("prometheus-")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("prometheus.yml"), config_yaml).expect("write config");
        let log = dir.path().join("prometheus.log");
        let mut last = String::new();
        // A free port may be taken before Prometheus binds it: then try another.
        for _ in 0..5 {
            let port = free_port().expect("free port");
            let log_file = std::fs::File::create(&log).expect("log file");
            let mut child = Command::new(&bin)
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("clone log"))
                .stderr(log_file)
                .spawn()
                .expect("spawn prometheus");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("exited {status}: {}", read_file(&log));
                    break;
                }
                if matches!(http_get(port, "/-/ready"), Ok((200, _))) {
                    return Prometheus {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("prometheus not ready after 60 s:\n{}", read_file(&log));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("prometheus did not start: {last}");
    }

    /// GET `path` on the HTTP API, parsed as JSON.
    fn api(&self, path: &str) -> Value {
        let (status, body) =
            http_get(self.port, path).unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus {path}: HTTP {status}, not JSON ({e}): {body}"))
    }

    /// An instant query: the API's whole answer (`status`, `data`, `error`).
    fn query(&self, expr: &str) -> Value {
        self.api(&format!("/api/v1/query?query={}", url_encode(expr)))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The samples of a successful instant query's vector (or scalar) result.
fn samples(answer: &Value) -> Vec<(String, f64)> {
    let value = |v: &Value| {
        v.get(1)
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    match answer["data"]["resultType"].as_str() {
        Some("vector") => answer["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| (s["metric"].to_string(), value(&s["value"])))
            .collect(),
        Some("scalar") => vec![(String::new(), value(&answer["data"]["result"]))],
        _ => Vec::new(),
    }
}

/// Every `expr` of the dashboard's panels (rows' nested panels included), in order.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    out.push(expr.clone());
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/outbox-relay.json")).expect("dashboard JSON");
    assert_eq!(
        dashboard["__inputs"][0]["name"], "DS_PROMETHEUS",
        "the datasource is the ${{DS_PROMETHEUS}} input"
    );
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard query as Prometheus gets it: Grafana's variables replaced.
fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = expr.to_string();
    for (var, value) in GRAFANA_VARIABLES {
        out = out.replace(var, value);
    }
    assert!(
        !out.contains('$'),
        "dashboard query uses a variable the test does not know: {expr}"
    );
    out
}

/// Writes a few events every 200 ms until `stop`: two aggregate types, so two topics.
fn write_events(pg: &ThrowawayPostgres, stop: &AtomicBool) {
    let mut batch = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let sql = format!(
            "SELECT count(outbox.publish(CASE WHEN g % 2 = 0 THEN 'order' ELSE 'payment' END, \
                                         'agg-' || (g % 7), 'Happened', \
                                         jsonb_build_object('batch', {batch}, 'n', g))) \
             FROM generate_series(1, 10) AS g"
        );
        pg.psql("postgres", &sql).expect("publish events");
        batch += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn prometheus_evaluates_the_dashboard_and_alerts_against_a_running_relay() {
    let dashboard = dashboard_queries();
    assert!(
        dashboard.len() >= 10,
        "dashboard has only {} queries",
        dashboard.len()
    );
    let alerts = alert_names();

    let pg = ThrowawayPostgres::start().expect("postgres starts");
    pg.psql("postgres", include_str!("../sql/outbox.sql"))
        .expect("schema applies");
    let kafka = Kafka::start();
    let relay_port = free_port().expect("free port");
    let relay = Relay::start(
        &relay_config(
            &pg.url("postgres"),
            &kafka.brokers(),
            "outbox_relay",
            "outbox_relay",
            relay_port,
        ),
        &[],
    );
    wait_until(
        Duration::from_secs(60),
        "the relay streams its slot",
        || {
            pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay' AND active",
        )
        .map(|n| n.trim() == "1")
        .unwrap_or(false)
        },
    );

    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['127.0.0.1:{relay_port}']\n",
        rules = repo().join("deploy/prometheus/alerts.yaml").display(),
    ));

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| write_events(&pg, &stop));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_dashboard_queries(&prometheus, &dashboard, &relay, relay_port);
            check_alert_rules(&prometheus, &alerts);
        }));
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer thread");
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });

    // The exposition itself, from a relay that has published: histogram, topic labels and all.
    let (status, metrics) = http_get(relay_port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("outbox_relay_events_published_total{topic=\"outbox.event.order\"}"));
    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool check metrics");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("pipe /metrics to promtool");
    let out = check.wait_with_output().expect("promtool check metrics");
    assert!(
        out.status.success(),
        "promtool check metrics rejects /metrics: {}\n{metrics}",
        output_text(&out)
    );
}

/// Waits until every dashboard query parses and returns at least one finite sample.
fn check_dashboard_queries(
    prometheus: &Prometheus,
    dashboard: &[String],
    relay: &Relay,
    port: u16,
) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut missing = Vec::new();
        for expr in dashboard {
            let query = substitute_grafana_variables(expr);
            let answer = prometheus.query(&query);
            assert_eq!(
                answer["status"], "success",
                "dashboard query does not evaluate: {query}\n{answer}"
            );
            if !samples(&answer).iter().any(|(_, v)| v.is_finite()) {
                missing.push(format!("{query}\n    -> {}", answer["data"]["result"]));
            }
        }
        if missing.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "after 180 s these dashboard queries still return no data:\n  {}\n\
                 targets: {}\nrelay /metrics:\n{}\nrelay log:\n{}",
                missing.join("\n  "),
                prometheus.api("/api/v1/targets")["data"]["activeTargets"],
                http_get(port, "/metrics").map(|r| r.1).unwrap_or_default(),
                relay.log_tail()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Every alert from alerts.yaml is loaded and evaluated without error by Prometheus, its
/// expression parses, and none fires for a healthy relay.
fn check_alert_rules(prometheus: &Prometheus, alerts: &[String]) {
    let mut rules = Vec::new();
    wait_until(
        Duration::from_secs(60),
        "prometheus evaluates every alert rule",
        || {
            let answer = prometheus.api("/api/v1/rules?type=alert");
            rules = answer["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            rules.len() == alerts.len() && rules.iter().all(|r| r["health"] != "unknown")
        },
    );
    let loaded: Vec<String> = rules
        .iter()
        .map(|r| r["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        loaded, alerts,
        "prometheus loaded other alerts than the file has"
    );
    for rule in &rules {
        let name = &rule["name"];
        assert_eq!(rule["health"], "ok", "{name} fails to evaluate: {rule}");
        let expr = rule["query"].as_str().expect("rule query");
        let answer = prometheus.query(expr);
        assert_eq!(
            answer["status"], "success",
            "{name} does not evaluate: {expr}\n{answer}"
        );
        assert!(
            samples(&answer).is_empty(),
            "{name} matches a healthy, publishing relay: {expr}\n{}",
            answer["data"]["result"]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Helm chart and plain manifests
// ---------------------------------------------------------------------------------------------

const CHART: &str = "deploy/helm/outbox-relay";

/// The chart's example values files (`ci/*.yaml`).
fn chart_examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(CHART).join("ci"))
        .expect("chart ci/ directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no example values in {CHART}/ci");
    files
}

#[test]
fn helm_chart_passes_helm_lint_with_its_values_and_every_example() {
    let out = run_ok(script("helm_chart.py").args(["lint", CHART]), "helm lint");
    let text = String::from_utf8_lossy(&out.stdout);
    // One lint for the chart's values, one per example.
    let linted = text
        .lines()
        .filter(|l| l.starts_with("ok   helm lint"))
        .count();
    assert_eq!(linted, 1 + chart_examples().len(), "{text}");
}

/// Validates `objects` (a JSON array) against the Kubernetes schemas, strictly.
fn kubernetes_validate(objects: &str, label: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("objects.json");
    std::fs::write(&file, objects).expect("write objects");
    // ServiceMonitor is a CRD: kubernetes-validate has no schema for it (checked below instead).
    run_ok(
        script("k8s_validate.py")
            .arg(KUBERNETES_VERSION)
            .arg("--skip-kinds=ServiceMonitor")
            .arg(&file),
        &format!("kubernetes-validate {label}"),
    );
}

/// The objects of a YAML manifest (via PyYAML, which kubernetes-validate brings), as JSON.
fn yaml_objects(path: &str) -> Vec<Value> {
    let out = run_ok(
        Command::new(python3()).args([
            "-c",
            "import json, sys, yaml; \
             print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            path,
        ]),
        &format!("read {path}"),
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Checks a pod template that runs the relay: its config (mounted from a ConfigMap) loads with
/// the relay's own loader and the container's environment, probes hit the right paths on the
/// relay's port, it runs as non-root on a read-only root filesystem without capabilities, and it
/// gets time to drain. Returns the relay's config.
fn check_relay_pod(objects: &[Value], deployment: &Value, label: &str, readiness: bool) -> Config {
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    let relay = containers
        .iter()
        .find(|c| {
            c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["name"] == "OUTBOX_RELAY_CONFIG")
        })
        .unwrap_or_else(|| panic!("{label}: no container sets OUTBOX_RELAY_CONFIG"));
    let env: Vec<&Value> = relay["env"].as_array().expect("env").iter().collect();

    // The config file: OUTBOX_RELAY_CONFIG -> volume mount -> ConfigMap key.
    let config_path = env
        .iter()
        .find(|e| e["name"] == "OUTBOX_RELAY_CONFIG")
        .and_then(|e| e["value"].as_str())
        .expect("OUTBOX_RELAY_CONFIG value");
    let (dir, key) = config_path.rsplit_once('/').expect("a path");
    let mount = relay["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("{label}: nothing mounted at {dir}"));
    assert_eq!(mount["readOnly"], true, "{label}: config mount is writable");
    let volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    let config_map = find(
        objects,
        "ConfigMap",
        volume["configMap"]["name"]
            .as_str()
            .expect("a ConfigMap volume"),
    );
    let toml = config_map["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{label}: ConfigMap has no {key}"));

    // The relay's own loader: unknown keys or OUTBOX_RELAY_* variables, bad values all fail.
    let vars: Vec<(String, String)> = env
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None if name == "OUTBOX_RELAY_POSTGRES_URL" => {
                    "postgres://outbox_relay:secret@postgres:5432/app".to_string()
                }
                None => {
                    assert!(
                        e["valueFrom"]["secretKeyRef"]["name"].is_string(),
                        "{label}: {name} is neither a value nor a secretKeyRef"
                    );
                    "secret".to_string()
                }
            };
            (name, value)
        })
        .collect();
    let config = Config::from_parts(Some(toml), vars)
        .unwrap_or_else(|e| panic!("{label}: the relay rejects its config: {e}\n{toml}"));

    // The port the relay listens on is the container's, and the probes use it.
    let port = config.http.listen.port();
    let port_name = relay["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["containerPort"] == port)
        .and_then(|p| p["name"].as_str())
        .unwrap_or_else(|| panic!("{label}: no named container port {port} ([http] listen)"));
    let probe_ok = |probe: &Value, path: &str| {
        probe["httpGet"]["path"] == path
            && (probe["httpGet"]["port"] == port_name || probe["httpGet"]["port"] == port)
    };
    assert!(
        probe_ok(&relay["livenessProbe"], "/healthz"),
        "{label}: liveness must be /healthz on {port_name}: {}",
        relay["livenessProbe"]
    );
    if readiness {
        assert!(
            probe_ok(&relay["readinessProbe"], "/readyz"),
            "{label}: readiness must be /readyz on {port_name}: {}",
            relay["readinessProbe"]
        );
    }

    // Service links would add OUTBOX_RELAY_SERVICE_HOST & co., which the relay rejects.
    assert_eq!(
        pod["enableServiceLinks"], false,
        "{label}: enableServiceLinks"
    );
    let security = &relay["securityContext"];
    assert!(
        security["runAsNonRoot"] == true || pod["securityContext"]["runAsNonRoot"] == true,
        "{label}: not runAsNonRoot"
    );
    assert_eq!(security["readOnlyRootFilesystem"], true, "{label}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{label}");
    assert_eq!(security["capabilities"]["drop"][0], "ALL", "{label}");
    assert!(
        relay["resources"]["requests"].is_object() && relay["resources"]["limits"].is_object(),
        "{label}: resources"
    );
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
    assert!(grace >= MIN_GRACE_PERIOD_SECONDS, "{label}: grace {grace}");
    config
}

#[test]
fn helm_chart_renders_valid_manifests_with_a_config_the_relay_accepts() {
    let mut cases: Vec<Option<PathBuf>> = vec![None];
    cases.extend(chart_examples().into_iter().map(Some));
    let mut seen_service_monitor = false;
    for values in cases {
        let label = values
            .as_ref()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .unwrap_or_else(|| "values.yaml".to_string());
        let mut cmd = script("helm_chart.py");
        cmd.args(["render", CHART]);
        if let Some(values) = &values {
            cmd.arg(values);
        }
        let out = run_ok(&mut cmd, &format!("helm render with {label}"));
        let rendered = String::from_utf8(out.stdout).expect("UTF-8");
        kubernetes_validate(&rendered, &label);
        let objects: Vec<Value> = serde_json::from_str(&rendered).expect("rendered JSON");

        let kinds: BTreeMap<&str, usize> = objects.iter().fold(BTreeMap::new(), |mut m, o| {
            *m.entry(o["kind"].as_str().unwrap_or("?")).or_default() += 1;
            m
        });
        let deployment = objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .unwrap_or_else(|| panic!("{label}: no Deployment in {kinds:?}"));
        let config = check_relay_pod(&objects, deployment, &label, true);

        // The Service and ServiceMonitor reach the relay's port by its name.
        let service = objects
            .iter()
            .find(|o| o["kind"] == "Service")
            .expect("a Service");
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "http", "{label}");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["ports"][0]["name"], "http", "{label}");
        assert_eq!(
            container["ports"][0]["containerPort"],
            config.http.listen.port(),
            "{label}"
        );
        if let Some(monitor) = objects.iter().find(|o| o["kind"] == "ServiceMonitor") {
            seen_service_monitor = true;
            assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http", "{label}");
            assert_eq!(
                monitor["spec"]["endpoints"][0]["path"], "/metrics",
                "{label}"
            );
            assert_eq!(
                monitor["spec"]["selector"]["matchLabels"],
                deployment["spec"]["selector"]["matchLabels"],
                "{label}: the ServiceMonitor selects the Service by the pods' labels"
            );
        }

        if values.is_none() {
            // The defaults are the HA setup: two relays, at most one disrupted at a time,
            // secrets from an existing Secret, no ServiceMonitor.
            assert_eq!(deployment["spec"]["replicas"], 2);
            let pdb = find(&objects, "PodDisruptionBudget", "outbox-relay");
            assert_eq!(pdb["spec"]["maxUnavailable"], 1);
            assert_eq!(
                pdb["spec"]["selector"]["matchLabels"],
                deployment["spec"]["selector"]["matchLabels"]
            );
            assert_eq!(
                deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
                10001
            );
            let url = container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["name"] == "OUTBOX_RELAY_POSTGRES_URL")
                .expect("OUTBOX_RELAY_POSTGRES_URL from the Secret");
            assert!(url["valueFrom"]["secretKeyRef"]["key"].is_string());
            assert!(!kinds.contains_key("ServiceMonitor"));
        }
    }
    assert!(
        seen_service_monitor,
        "no example enables the ServiceMonitor"
    );
}

#[test]
fn plain_manifests_are_valid_kubernetes_and_the_sidecar_config_loads() {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/k8s");
    run_ok(
        script("k8s_validate.py")
            .arg(KUBERNETES_VERSION)
            .args(&files),
        "kubernetes-validate deploy/k8s",
    );

    let objects = yaml_objects("deploy/k8s/sidecar.yaml");
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert!(
        containers.len() >= 2,
        "a sidecar needs the application next to it"
    );
    // A sidecar's readiness would be the application's: liveness only (see the manifest).
    check_relay_pod(&objects, deployment, "sidecar.yaml", false);
}

// ---------------------------------------------------------------------------------------------
// Image
// ---------------------------------------------------------------------------------------------

#[test]
fn dockerfile_runs_the_relay_as_non_root_on_its_default_port() {
    // No Docker engine here: check what the image promises against the code it packages.
    let dockerfile = read("deploy/Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let has = |line: &str| instructions.contains(&line);
    assert!(has("FROM rust:1-bookworm AS build"), "builder stage");
    assert!(has("FROM debian:bookworm-slim"), "runtime stage");
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(has("USER 10001:10001"), "non-root user");
    assert!(has("ENTRYPOINT [\"outbox-relay\"]"));
    assert!(has("CMD [\"run\"]"));
    let default_port = Config::default().http.listen.port();
    assert!(
        has(&format!("EXPOSE {default_port}")),
        "EXPOSE the relay's default [http] port {default_port}"
    );
    for probe in ["/healthz", "/readyz"] {
        assert!(
            dockerfile.contains(probe),
            "the probe path {probe} is documented"
        );
    }
    let ignore = read(".dockerignore");
    for entry in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
}
