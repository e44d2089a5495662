//! CPU time and memory of every process of the stack, read from /proc.
//!
//! The stack's processes are this process's descendants (the control plane runs under
//! `scripts/control-plane.sh run`, a child; the gateways under the local node): they are found by
//! walking /proc's parent links from here and named by what they run.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// One process of the stack.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StackProcess {
    /// `router`, `gateway-0`, `redis`, `kube-apiserver`, `etcd`, `controller`,
    /// `kube-controller-manager`, `loadtest`.
    pub role: String,
    /// Its pid.
    pub pid: u32,
}

/// CPU seconds and memory of one process at one moment.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size, bytes.
    pub rss_peak_bytes: u64,
}

/// Ticks per second of /proc/PID/stat's times.
fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// `(ppid, utime + stime ticks)` from /proc/PID/stat (the command may hold spaces and parens:
/// fields are counted after its closing paren).
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ppid(1) ... utime(11) stime(12).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn status_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Usage of `pid` now; None when it is gone.
pub fn usage(pid: u32) -> Option<Usage> {
    let (_, ticks) = stat(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Usage {
        cpu_seconds: ticks as f64 / clock_ticks(),
        rss_bytes: status_kib(&status, "VmRSS:") * 1024,
        rss_peak_bytes: status_kib(&status, "VmHWM:") * 1024,
    })
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The pod name a gateway process was started for (`apollo-gateway-2` -> `gateway-2`).
fn gateway_role(pid: u32) -> String {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("APOLLO_POD_NAME="))
        .and_then(|pod| pod.rsplit_once('-'))
        .map_or_else(
            || format!("gateway-pid{pid}"),
            |(_, n)| format!("gateway-{n}"),
        )
}

/// What a process is, by the program it runs (`/proc/PID/comm`, at most 15 bytes); None for the
/// shells and supervisors in between.
fn role(pid: u32) -> Option<String> {
    let c = comm(pid);
    let role = match c.as_str() {
        "apollo-router" => "router".to_owned(),
        "apollo-gateway" => gateway_role(pid),
        "apollo-controll" => "controller".to_owned(),
        "redis-server" => "redis".to_owned(),
        "kube-apiserver" => "kube-apiserver".to_owned(),
        "etcd" => "etcd".to_owned(),
        "kube-controller" => "kube-controller-manager".to_owned(),
        _ => return None,
    };
    Some(role)
}

/// This process (`loadtest`) and every descendant that is part of the stack.
pub fn stack_processes() -> Vec<StackProcess> {
    let me = std::process::id();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((ppid, _)) = stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![StackProcess {
        role: "loadtest".into(),
        pid: me,
    }];
    let mut todo = vec![me];
    while let Some(pid) = todo.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if let Some(role) = role(child) {
                out.push(StackProcess { role, pid: child });
            }
            todo.push(child);
        }
    }
    // Two of one role (a restarted supervisor's child): number them apart.
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for p in &mut out {
        let n = seen.entry(p.role.clone()).or_default();
        *n += 1;
        if *n > 1 {
            p.role = format!("{}#{}", p.role, n);
        }
    }
    out.sort();
    out
}

/// Usage of every stack process at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When it was taken.
    pub at: Instant,
    /// Per role.
    pub usage: BTreeMap<String, Usage>,
}

/// Takes a snapshot of every process of the stack.
pub fn snapshot() -> Snapshot {
    let at = Instant::now();
    let usage = stack_processes()
        .into_iter()
        .filter_map(|p| usage(p.pid).map(|u| (p.role, u)))
        .collect();
    Snapshot { at, usage }
}

/// What one process spent between two snapshots.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessUsage {
    /// Role (see [`StackProcess::role`]).
    pub role: String,
    /// Mean CPU over the window, percent of one core.
    pub cpu_percent: f64,
    /// RSS at the end, MiB.
    pub rss_mib: f64,
    /// Peak RSS (whole life), MiB.
    pub rss_peak_mib: f64,
}

/// Per role: CPU between `before` and `after`, memory at `after`.
pub fn between(before: &Snapshot, after: &Snapshot) -> Vec<ProcessUsage> {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    after
        .usage
        .iter()
        .map(|(role, a)| {
            // A process started in between spent all its CPU in the window.
            let cpu = before
                .usage
                .get(role)
                .map_or(a.cpu_seconds, |b| a.cpu_seconds - b.cpu_seconds);
            ProcessUsage {
                role: role.clone(),
                cpu_percent: 100.0 * cpu / secs,
                rss_mib: a.rss_bytes as f64 / (1024.0 * 1024.0),
                rss_peak_mib: a.rss_peak_bytes as f64 / (1024.0 * 1024.0),
            }
        })
        .collect()
}

/// RSS growth per agent between two snapshots, per role (bytes).
pub fn rss_growth_per_agent(
    before: &Snapshot,
    after: &Snapshot,
    agents: usize,
) -> BTreeMap<String, f64> {
    after
        .usage
        .iter()
        .filter_map(|(role, a)| {
            let b = before.usage.get(role)?;
            Some((
                role.clone(),
                (a.rss_bytes as f64 - b.rss_bytes as f64) / agents.max(1) as f64,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_found_and_measured() {
        let procs = stack_processes();
        assert_eq!(procs.iter().filter(|p| p.role == "loadtest").count(), 1);
        let u = usage(std::process::id()).expect("own usage");
        assert!(u.rss_bytes > 0 && u.rss_peak_bytes >= u.rss_bytes);
        let s = snapshot();
        assert!(s.usage.contains_key("loadtest"));
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let text = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(text, "VmRSS:"), 1024);
        assert_eq!(status_kib(text, "VmHWM:"), 2048);
        assert_eq!(status_kib(text, "VmSwap:"), 0);
    }
}
