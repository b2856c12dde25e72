//! TLS to Postgres: a throwaway CA signs the server's certificate, Postgres runs with `ssl = on`
//! and a `pg_hba.conf` that admits TCP only over TLS, and the relay connects with `verify-full`
//! (both its connections), or fails clearly with the wrong CA or the wrong host name.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use testkit::*;

/// TCP only over TLS: a plain connection finds no matching line and is refused.
const HBA_TLS_ONLY: &str = "\
local     all         all                trust
local     replication all                trust
hostssl   all         all  127.0.0.1/32  trust
hostssl   replication all  127.0.0.1/32  trust
hostssl   all         all  ::1/128       trust
hostssl   replication all  ::1/128       trust
";

/// Certificates made with the `openssl` command line in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

/// A server certificate and its key.
struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("tls-test-")
            .tempdir()
            .expect("tempdir");
        // The server (the `postgres` user when we are root) reads its files from here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod pki dir");
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl (install the openssl package)");
        assert_success(&format!("openssl {}", args.join(" ")), &output);
    }

    /// A self-signed CA called `name`; returns its certificate (`<name>.pem`).
    fn ca(&self, name: &str) -> PathBuf {
        let cnf = self.path(&format!("{name}.cnf"));
        std::fs::write(
            &cnf,
            format!(
                "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3_ca\n\
                 [dn]\nCN = outbox-relay test {name}\n\
                 [v3_ca]\nbasicConstraints = critical, CA:TRUE\n\
                 keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n"
            ),
        )
        .unwrap();
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-days",
            "3",
            "-config",
            &format!("{name}.cnf"),
            "-keyout",
            &key,
            "-out",
            &pem,
        ]);
        self.path(&pem)
    }

    /// A server certificate `name` for `sans` (like `DNS:localhost,IP:127.0.0.1`) signed by
    /// the CA `ca`, its key readable only by the server's OS user.
    fn server(&self, name: &str, ca: &str, sans: &str) -> ServerCert {
        std::fs::write(
            self.path(&format!("{name}.cnf")),
            format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {name}\n\
                 [ext]\nbasicConstraints = critical, CA:FALSE\n\
                 keyUsage = critical, digitalSignature, keyEncipherment\n\
                 extendedKeyUsage = serverAuth\nsubjectAltName = {sans}\n\
                 subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
            ),
        )
        .unwrap();
        let cnf = format!("{name}.cnf");
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-config",
            &cnf,
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "3",
            "-extfile",
            &cnf,
            "-extensions",
            "ext",
            "-out",
            &pem,
        ]);
        let key = self.path(&key);
        // Postgres refuses a key that others can read, or that another user owns.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some(user) = server_os_user() {
            let output = Command::new("chown")
                .arg(format!("{user}:{user}"))
                .arg(&key)
                .output()
                .expect("run chown");
            assert_success("chown", &output);
        }
        ServerCert {
            cert: self.path(&pem),
            key,
        }
    }
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A cluster with TLS on, using `cert`, that refuses unencrypted TCP; the outbox schema applied.
fn tls_postgres(cert: &ServerCert) -> ThrowawayPostgres {
    let opts = PostgresOptions::default()
        .setting("ssl", "on")
        .setting("ssl_cert_file", cert.cert.to_str().unwrap())
        .setting("ssl_key_file", cert.key.to_str().unwrap())
        .hba(HBA_TLS_ONLY);
    let pg = ThrowawayPostgres::start_with(&opts).expect("postgres with ssl = on starts");
    // The key must stay private to the server: it would refuse to start otherwise.
    assert_eq!(
        std::fs::metadata(&cert.key).unwrap().mode() & 0o077,
        0,
        "key file mode"
    );
    pg.psql("postgres", include_str!("../sql/outbox.sql"))
        .expect("schema applies");
    pg
}

/// `postgres.url` for `host` with the given TLS query parameters.
fn url(pg: &ThrowawayPostgres, host: &str, params: &str) -> String {
    format!("postgres://postgres@{host}:{}/postgres?{params}", pg.port())
}

fn verify(mode: &str, ca: &Path) -> String {
    format!("sslmode={mode}&sslrootcert={}", ca.display())
}

fn check(config: &str) -> (bool, String) {
    let output = relay_cli(&["check"], config, &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn verify_full_relays_over_tls_on_both_connections() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let cert = pki.server("server", "ca", "DNS:localhost,IP:127.0.0.1");
    let world = World {
        pg: tls_postgres(&cert),
        kafka: Kafka::start(),
        proxy: None,
    };
    let brokers = world.kafka.brokers();
    let config_for =
        |url: &str, http: u16| relay_config(url, &brokers, "outbox_relay", "outbox_relay", http);

    // The server really refuses plain TCP, so everything below is encrypted.
    let (ok, text) = check(&config_for(
        &url(&world.pg, "localhost", "sslmode=disable"),
        0,
    ));
    assert!(!ok, "a plain connection was admitted:\n{text}");
    assert!(text.contains("no encryption"), "{text}");
    // verify-full by name and by address (the certificate lists both).
    for host in ["localhost", "127.0.0.1"] {
        let (ok, text) = check(&config_for(
            &url(&world.pg, host, &verify("verify-full", &ca)),
            0,
        ));
        assert!(ok, "check via {host} failed:\n{text}");
    }

    let http = http_port();
    let config = config_for(
        &url(&world.pg, "localhost", &verify("verify-full", &ca)),
        http,
    );
    let mut relay = Relay::start(&config, &[]);
    relay.wait_ready(http, Duration::from_secs(60));
    world.wait_streaming();
    world.write(200, 20, 7, &["Order"]);
    let records = consume_n(&world, &topics(&["Order"]), 200, Duration::from_secs(60));
    let (distinct, _) = check_records(&records);
    assert_eq!(distinct, 200, "relay log:\n{}", relay.log_tail());

    // Both connections are encrypted: the walsender of the stream and the pool's backends.
    let rows = world.psql(
        "SELECT a.backend_type, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.pid <> pg_backend_pid() AND a.client_addr IS NOT NULL \
           AND a.backend_type IN ('walsender', 'client backend') ORDER BY 1",
    );
    let rows: Vec<(&str, &str)> = rows
        .lines()
        .map(|l| l.split_once('|').expect("two columns"))
        .collect();
    assert!(
        rows.iter().any(|r| r.0 == "walsender"),
        "no walsender: {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.0 == "client backend"),
        "no pool connection: {rows:?}"
    );
    assert!(rows.iter().all(|r| r.1 == "t"), "unencrypted: {rows:?}");
    assert!(relay.is_running());
}

#[test]
fn wrong_ca_fails_with_a_clear_error_and_run_reports_it() {
    let pki = Pki::new();
    let right = pki.ca("right-ca");
    let wrong = pki.ca("wrong-ca");
    let cert = pki.server("server", "right-ca", "DNS:localhost,IP:127.0.0.1");
    let pg = tls_postgres(&cert);
    let kafka = Kafka::start();
    let config_with = |ca: &Path, http: u16| {
        relay_config(
            &url(&pg, "localhost", &verify("verify-full", ca)),
            &kafka.brokers(),
            "outbox_relay",
            "outbox_relay",
            http,
        )
    };

    // The same setup with the right CA passes: only the CA differs below.
    let (ok, text) = check(&config_with(&right, 0));
    assert!(ok, "check with the right CA failed:\n{text}");

    let (ok, text) = check(&config_with(&wrong, 0));
    assert!(!ok, "check passed with the wrong CA:\n{text}");
    assert!(
        text.contains("certificate could not be verified")
            && text.contains("sslrootcert")
            && text.contains(&wrong.display().to_string()),
        "{text}"
    );

    let http = http_port();
    let mut relay = Relay::start(&config_with(&wrong, http), &[]);
    let mut status = String::new();
    wait_until(Duration::from_secs(60), "/status names the CA", || {
        status = http_get(http, "/status").map(|r| r.1).unwrap_or_default();
        status.contains("certificate could not be verified")
    });
    assert!(status.contains("sslrootcert"), "{status}");
    assert!(relay.is_running(), "relay exited:\n{}", relay.log_tail());
    assert_ne!(http_get(http, "/readyz").map(|r| r.0).ok(), Some(200));
    assert!(
        relay.log().contains("certificate could not be verified"),
        "{}",
        relay.log_tail()
    );
}

#[test]
fn verify_full_rejects_a_certificate_for_another_name() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    // Only a DNS name: connecting by address does not match it.
    let cert = pki.server("server", "ca", "DNS:localhost");
    let pg = tls_postgres(&cert);
    let kafka = Kafka::start();
    let config_with = |params: &str| {
        relay_config(
            &url(&pg, "127.0.0.1", params),
            &kafka.brokers(),
            "outbox_relay",
            "outbox_relay",
            0,
        )
    };

    let (ok, text) = check(&config_with(&verify("verify-full", &ca)));
    assert!(
        !ok,
        "verify-full accepted a certificate for another name:\n{text}"
    );
    assert!(
        text.contains("not valid for host 127.0.0.1") && text.contains("sslmode=verify-full"),
        "{text}"
    );
    // The chain itself is fine: verify-ca, which does not compare names, passes.
    let (ok, text) = check(&config_with(&verify("verify-ca", &ca)));
    assert!(ok, "verify-ca failed:\n{text}");
}

/// What `verify-ca` promises on the replication stream too. pgwire-replication 0.5 only forgives
/// rustls' old `NotValidForName` error, not the `NotValidForNameContext` that rustls 0.23.2x
/// returns, so its verify-ca still checks the name and this test fails; the pool (our own
/// verifier) passes. Run it with `--run-ignored all` after upgrading pgwire-replication.
#[test]
#[ignore = "pgwire-replication 0.5 compares names in verify-ca too (README, TLS)"]
fn verify_ca_streams_from_a_server_whose_certificate_names_another_host() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let cert = pki.server("server", "ca", "DNS:localhost");
    let world = World {
        pg: tls_postgres(&cert),
        kafka: Kafka::start(),
        proxy: None,
    };
    let http = http_port();
    let config = relay_config(
        &url(&world.pg, "127.0.0.1", &verify("verify-ca", &ca)),
        &world.kafka.brokers(),
        "outbox_relay",
        "outbox_relay",
        http,
    );
    let relay = Relay::start(&config, &[]);
    world.wait_streaming();
    world.write(50, 10, 5, &["Order"]);
    let records = consume_n(&world, &topics(&["Order"]), 50, Duration::from_secs(60));
    assert_eq!(check_records(&records).0, 50, "{}", relay.log_tail());
}

/// Kafka's TLS comes from librdkafka built with OpenSSL (rdkafka's `ssl` feature): without it,
/// librdkafka refuses `security.protocol` SSL and SASL_SSL ("OpenSSL not available at build
/// time") and SCRAM. The relay's own producer and admin settings are used, as `run` builds them.
#[test]
fn kafka_clients_accept_ssl_and_sasl_scram() {
    use outbox_relay::sink::kafka;
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;

    for (protocol, mechanism) in [
        ("SSL", None),
        ("SASL_SSL", Some("SCRAM-SHA-512")),
        ("SASL_SSL", Some("SCRAM-SHA-256")),
        ("SASL_SSL", Some("PLAIN")),
    ] {
        let mut text = format!(
            "[kafka]\nbrokers = \"127.0.0.1:1\"\n[kafka.properties]\n\
             \"security.protocol\" = \"{protocol}\"\n"
        );
        if let Some(mechanism) = mechanism {
            text.push_str(&format!(
                "\"sasl.mechanisms\" = \"{mechanism}\"\n\"sasl.username\" = \"relay\"\n\
                 \"sasl.password\" = \"secret\"\n"
            ));
        }
        let config = outbox_relay::config::Config::from_parts(Some(&text), Vec::new())
            .expect("config loads");
        let producer = kafka::client_config(&config.kafka).create::<BaseProducer>();
        assert!(
            producer.is_ok(),
            "{protocol} {mechanism:?}: {:?}",
            producer.err()
        );
        let admin = kafka::admin_config(&config.kafka).create::<BaseConsumer>();
        assert!(admin.is_ok(), "{protocol} {mechanism:?}: {:?}", admin.err());
    }
}
