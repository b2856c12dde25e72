//! Where the PostgreSQL server binaries are, and which OS user runs them.
//!
//! The binaries (`initdb`, `pg_ctl`, `psql`, ...) are found by [`postgres_bin_dir`]. They refuse
//! to run as root, so when this process is root (CI containers) the cluster belongs to the
//! `postgres` OS user and every server binary runs through `runuser -u postgres`.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Environment variable naming the directory holding `initdb`, `pg_ctl`, `psql`, ...
pub const PG_BIN_ENV: &str = "OUTBOX_RELAY_PG_BIN";

/// Debian/Ubuntu install locations probed after `pg_config`, newest first.
const DEBIAN_VERSIONS: [u32; 6] = [18, 17, 16, 15, 14, 13];

/// The OS user that owns the cluster when this process runs as root.
pub(super) const POSTGRES_OS_USER: &str = "postgres";

/// The OS user the server runs as when it is not this process's user: `postgres` when this
/// process is root. Files the server must own (an `ssl_key_file`) are handed to it.
pub fn server_os_user() -> Option<&'static str> {
    running_as_root().then_some(POSTGRES_OS_USER)
}

/// Finds the Postgres binaries: env `OUTBOX_RELAY_PG_BIN`, else `pg_config --bindir` when it
/// holds `initdb`, else the newest `/usr/lib/postgresql/<version>/bin`.
pub fn postgres_bin_dir() -> io::Result<PathBuf> {
    let from_env = std::env::var_os(PG_BIN_ENV).filter(|v| !v.is_empty());
    let from_pg_config = || {
        Command::new("pg_config")
            .arg("--bindir")
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    choose_bin_dir(from_env, from_pg_config, |dir| dir.join("initdb").is_file())
        .map_err(|msg| io::Error::new(io::ErrorKind::NotFound, msg))
}

/// The lookup order of [`postgres_bin_dir`], with the environment abstracted for tests.
fn choose_bin_dir(
    from_env: Option<OsString>,
    from_pg_config: impl FnOnce() -> Option<PathBuf>,
    has_initdb: impl Fn(&Path) -> bool,
) -> Result<PathBuf, String> {
    if let Some(dir) = from_env {
        let dir = PathBuf::from(dir);
        // An explicit choice is never second-guessed by falling back to another install.
        return if has_initdb(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "{PG_BIN_ENV}={} has no initdb: point it at the bin directory of a \
                 PostgreSQL server install",
                dir.display()
            ))
        };
    }
    if let Some(dir) = from_pg_config().filter(|dir| has_initdb(dir)) {
        return Ok(dir);
    }
    DEBIAN_VERSIONS
        .iter()
        .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
        .find(|dir| has_initdb(dir))
        .ok_or_else(|| {
            "no PostgreSQL server binaries (initdb) found: install postgresql (Debian: \
             apt-get install postgresql), or set OUTBOX_RELAY_PG_BIN to the directory \
             holding initdb, pg_ctl and psql"
                .to_string()
        })
}

/// Whether the effective user is root: the server binaries refuse to run as root.
pub(super) fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let from_proc = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| effective_uid(&status));
        let euid = from_proc.or_else(|| {
            let out = Command::new("id").arg("-u").output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        });
        euid == Some(0)
    })
}

/// The effective uid from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(dirs: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |dir| dirs.iter().any(|d| Path::new(d) == dir)
    }

    #[test]
    fn env_var_wins_over_everything() {
        let dir = choose_bin_dir(
            Some("/opt/pg/bin".into()),
            || Some("/usr/lib/postgresql/17/bin".into()),
            only(&["/opt/pg/bin", "/usr/lib/postgresql/17/bin"]),
        );
        assert_eq!(dir, Ok(PathBuf::from("/opt/pg/bin")));
    }

    #[test]
    fn env_var_without_initdb_is_an_error_not_a_fallback() {
        let err = choose_bin_dir(
            Some("/opt/empty".into()),
            || None,
            only(&["/usr/lib/postgresql/15/bin"]),
        )
        .unwrap_err();
        assert!(err.contains("OUTBOX_RELAY_PG_BIN=/opt/empty"), "{err}");
    }

    #[test]
    fn pg_config_is_used_when_it_has_initdb() {
        let dir = choose_bin_dir(
            None,
            || Some("/usr/local/pgsql/bin".into()),
            only(&["/usr/local/pgsql/bin", "/usr/lib/postgresql/15/bin"]),
        );
        assert_eq!(dir, Ok(PathBuf::from("/usr/local/pgsql/bin")));
    }

    #[test]
    fn client_only_pg_config_falls_back_to_newest_debian_server() {
        let dir = choose_bin_dir(
            None,
            || Some("/usr/lib/postgresql/17/bin".into()),
            only(&["/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin"]),
        );
        assert_eq!(dir, Ok(PathBuf::from("/usr/lib/postgresql/16/bin")));
    }

    #[test]
    fn nothing_found_names_the_fix() {
        let err = choose_bin_dir(None, || None, |_| false).unwrap_err();
        assert!(err.contains("install postgresql"), "{err}");
        assert!(err.contains(PG_BIN_ENV), "{err}");
    }

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tcargo\nUid:\t1000\t0\t1000\t1000\nGid:\t100\t100\t100\t100\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }
}
