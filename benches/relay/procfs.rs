//! What the bench reads from `/proc`: CPU time of a process, of the machine and of the bench's
//! own processes, peak memory; and the wall clock.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

/// CPU seconds of this process so far (all threads).
pub fn own_cpu_secs() -> f64 {
    static CLK_TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let tck = *CLK_TCK.get_or_init(clock_ticks);
    proc_cpu_ticks(std::process::id()).map_or(f64::NAN, |t| t as f64 / tck)
}

/// Machine-wide CPU time from `/proc/stat`, in clock ticks.
pub struct HostCpu {
    pub busy: u64,
    pub total: u64,
}

/// CPU time of the machine and of the bench's own processes (the bench, the given children,
/// and the Postgres cluster: the postmaster and its children).
pub struct CpuSnapshot {
    pub host: HostCpu,
    pub own: BTreeMap<u32, u64>,
}

impl CpuSnapshot {
    pub fn take(pids: &[u32], postmaster: Option<u32>) -> CpuSnapshot {
        let mut own = BTreeMap::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some((ppid, ticks)) = proc_stat(pid) else {
                continue;
            };
            let ours = pids.contains(&pid) || postmaster.is_some_and(|pm| pm == pid || pm == ppid);
            if ours {
                own.insert(pid, ticks);
            }
        }
        CpuSnapshot {
            host: HostCpu::sample(),
            own,
        }
    }

    /// (cores busy machine-wide, cores busy outside the bench's processes) since `earlier`.
    /// A process of ours that exited in between counts as outside.
    pub fn since(&self, earlier: &CpuSnapshot) -> (f64, f64) {
        let own: u64 = self
            .own
            .iter()
            .map(|(pid, ticks)| ticks.saturating_sub(earlier.own.get(pid).copied().unwrap_or(0)))
            .sum();
        let host = self.host.cores_since(&earlier.host);
        let total = self.host.total.saturating_sub(earlier.host.total);
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get()) as f64;
        let own_cores = if total == 0 {
            f64::NAN
        } else {
            own as f64 / total as f64 * cores
        };
        (host, (host - own_cores).max(0.0))
    }
}

impl HostCpu {
    pub fn sample() -> HostCpu {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        HostCpu {
            busy: total - idle,
            total,
        }
    }

    /// Cores busy on average since `earlier`.
    pub fn cores_since(&self, earlier: &HostCpu) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get()) as f64;
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return f64::NAN;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64 * cores
    }
}

/// utime + stime of `pid`, in clock ticks.
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, ticks)| ticks)
}

/// The parent pid and utime + stime (clock ticks) of `pid`.
pub fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, from field 3 (state) on.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid: u32 = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// The state letter of `pid` (`Z` once it has exited and is not yet reaped: its CPU times are
/// then final).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// A `kB` line of `/proc/PID/status` (`VmHWM`, `VmRSS`).
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
