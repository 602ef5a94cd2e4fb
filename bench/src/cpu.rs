//! Where the machine's CPU went during a run: each process's CPU seconds per second of the run
//! (cores in use on average), the machine's busy cores, and what is left idle. On a machine whose
//! cores are all busy, the operator and the peers take their share from the API server and etcd,
//! which bounds the throughput against a ceiling measured without them.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::figures;

/// The processes a run watches, by name, with their pids.
#[derive(Debug, Clone, Default)]
pub struct Watched(Vec<(String, u32)>);

impl Watched {
    /// kube-apiserver and etcd of the control plane in `MAILROOM_TESTENV_DIR`, and this process
    /// (the harness: creates, watches, the ceiling's client).
    pub fn control_plane() -> Watched {
        let mut watched = Watched::default();
        if let Ok(dir) = std::env::var("MAILROOM_TESTENV_DIR") {
            for name in ["kube-apiserver", "etcd"] {
                let pid = std::fs::read_to_string(format!("{dir}/{name}.pid")).ok();
                if let Some(pid) = pid.and_then(|p| p.trim().parse().ok()) {
                    watched.add(name, pid);
                }
            }
        }
        watched.add("harness", std::process::id());
        watched
    }

    /// Also watches `pid` as `name`.
    pub fn add(&mut self, name: &str, pid: u32) {
        self.0.push((name.to_string(), pid));
    }

    /// A copy that also watches `pid` as `name`.
    pub fn with(&self, name: &str, pid: u32) -> Watched {
        let mut watched = self.clone();
        watched.add(name, pid);
        watched
    }

    /// Every watched process's CPU ticks and the machine's busy and total ticks, now.
    pub fn snapshot(&self) -> Snapshot {
        let ticks = self
            .0
            .iter()
            .filter_map(|(name, pid)| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                Some((name.clone(), figures::cpu_ticks(&stat)?))
            })
            .collect();
        let machine = std::fs::read_to_string("/proc/stat").ok().and_then(|s| machine_ticks(&s));
        Snapshot { at: Instant::now(), ticks, machine }
    }
}

/// CPU ticks (1/100 s) at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    ticks: BTreeMap<String, u64>,
    /// The machine's (busy, all) ticks summed over its CPUs.
    machine: Option<(u64, u64)>,
}

impl Snapshot {
    /// Cores in use on average between `self` and `later`, by process, with `machine busy` and
    /// `machine idle` (in cores) when /proc/stat was readable.
    pub fn cores_until(&self, later: &Snapshot) -> BTreeMap<String, f64> {
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        let mut cores = cores(&self.ticks, &later.ticks, seconds);
        if let (Some((busy0, all0)), Some((busy1, all1))) = (self.machine, later.machine) {
            cores.insert("machine busy".into(), per_second(busy1.saturating_sub(busy0), seconds));
            let idle = all1.saturating_sub(all0).saturating_sub(busy1.saturating_sub(busy0));
            cores.insert("machine idle".into(), per_second(idle, seconds));
        }
        cores
    }
}

fn per_second(ticks: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 { 0.0 } else { ticks as f64 / 100.0 / seconds }
}

/// Cores in use by each process present in both snapshots over `seconds`.
pub fn cores(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, seconds: f64) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(name, t1)| {
            let t0 = before.get(name)?;
            Some((name.clone(), per_second(t1.saturating_sub(*t0), seconds)))
        })
        .collect()
}

/// The `cpu` line of /proc/stat: (busy, all) ticks, where busy is everything but idle and iowait.
pub fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest and guest_nice are inside user).
    let all: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((all - idle, all))
}

/// The cores the machine was busy with beyond the watched processes: other work on the machine
/// (a build beside the benchmark, say) and the kernel's own (interrupts not charged to a process),
/// which takes its share from the API server and makes the
/// run's figures not an idle machine's. None without the machine's figures.
pub fn others(cores: &BTreeMap<String, f64>) -> Option<f64> {
    let watched: f64 = cores.iter().filter(|(n, _)| !n.starts_with("machine ")).map(|(_, c)| c).sum();
    cores.get("machine busy").map(|busy| (busy - watched).max(0.0))
}

/// One line: each process's cores, the largest first, then everything else the machine ran and
/// its busy and idle cores.
pub fn describe(cores: &BTreeMap<String, f64>) -> String {
    let mut processes: Vec<(&String, &f64)> = cores.iter().filter(|(n, _)| !n.starts_with("machine ")).collect();
    processes.sort_by(|a, b| b.1.total_cmp(a.1));
    let mut parts: Vec<String> = processes.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
    if let (Some(busy), Some(idle), Some(others)) =
        (cores.get("machine busy"), cores.get("machine idle"), others(cores))
    {
        parts.push(format!("everything else {others:.2}"));
        parts.push(format!("machine busy {busy:.2}, idle {idle:.2}"));
    }
    format!("cores: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_ticks_per_second_of_the_processes_in_both_snapshots() {
        let before = BTreeMap::from([("etcd".to_string(), 100), ("operator".to_string(), 50)]);
        let after =
            BTreeMap::from([("etcd".to_string(), 300), ("operator".to_string(), 150), ("peer".to_string(), 999)]);
        let cores = cores(&before, &after, 2.0);
        assert_eq!(cores.len(), 2, "a process missing before is not counted: {cores:?}");
        assert!((cores["etcd"] - 1.0).abs() < 1e-9);
        assert!((cores["operator"] - 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_machine_line_counts_idle_and_iowait_as_not_busy() {
        let stat = "cpu  100 10 40 800 50 0 0 0 0 0\ncpu0 50 5 20 400 25 0 0 0 0 0\n";
        assert_eq!(machine_ticks(stat), Some((150, 1000)));
        assert_eq!(machine_ticks("intr 1 2 3\n"), None);
    }

    #[test]
    fn the_description_puts_the_largest_first_and_the_machine_last() {
        let cores = BTreeMap::from([
            ("etcd".to_string(), 0.4),
            ("kube-apiserver".to_string(), 0.9),
            ("machine busy".to_string(), 1.9),
            ("machine idle".to_string(), 0.1),
        ]);
        assert_eq!(
            describe(&cores),
            "cores: kube-apiserver 0.90, etcd 0.40, everything else 0.60, machine busy 1.90, idle 0.10"
        );
    }

    #[test]
    fn everything_else_is_the_busy_cores_nothing_watched_used() {
        let cores = BTreeMap::from([
            ("kube-apiserver".to_string(), 1.3),
            ("etcd".to_string(), 0.1),
            ("machine busy".to_string(), 2.0),
            ("machine idle".to_string(), 0.0),
        ]);
        assert!((others(&cores).unwrap() - 0.6).abs() < 1e-9);
        // Rounding of the ticks can make the processes add up to a little more than the machine.
        let over = BTreeMap::from([("etcd".to_string(), 1.01), ("machine busy".to_string(), 1.0)]);
        assert_eq!(others(&over), Some(0.0));
        assert_eq!(others(&BTreeMap::from([("etcd".to_string(), 1.0)])), None);
    }
}
