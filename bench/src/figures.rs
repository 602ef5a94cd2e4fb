//! Pure arithmetic on what a run observed: percentiles, counter deltas, duplicates, /proc fields.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// One kube-apiserver request counter: (group, resource, subresource, verb).
pub type RequestKey = (String, String, String, String);

/// Sums `apiserver_request_total` from a Prometheus text exposition by group, resource,
/// subresource and verb (over codes, scopes and versions).
pub fn request_totals(exposition: &str) -> HashMap<RequestKey, f64> {
    let mut out = HashMap::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let labels = parse_labels(labels);
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        *out.entry((get("group"), get("resource"), get("subresource"), get("verb"))).or_insert(0.0) += value;
    }
    out
}

/// `a="x",b="y"` into a map (label values here never contain quotes or commas).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.split("\",")
        .filter_map(|pair| {
            let (k, v) = pair.split_once("=\"")?;
            Some((k.trim().to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect()
}

/// How much a counter grew between two snapshots.
pub fn delta(
    before: &HashMap<RequestKey, f64>,
    after: &HashMap<RequestKey, f64>,
    key: (&str, &str, &str, &str),
) -> f64 {
    let k = (key.0.to_string(), key.1.to_string(), key.2.to_string(), key.3.to_string());
    after.get(&k).copied().unwrap_or(0.0) - before.get(&k).copied().unwrap_or(0.0)
}

/// The value at quantile `q` (0..=1) of `samples`, nearest rank; None when empty.
pub fn percentile(samples: &[Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.saturating_sub(1).min(sorted.len() - 1)])
}

/// Deliveries of ids: (distinct ids, ids delivered more than once, extra deliveries).
pub fn duplicates<'a>(ids: impl IntoIterator<Item = &'a str>) -> (usize, usize, usize) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in ids {
        *counts.entry(id).or_insert(0) += 1;
    }
    let twice = counts.values().filter(|&&c| c > 1).count();
    let extra = counts.values().map(|&c| c.saturating_sub(1)).sum();
    (counts.len(), twice, extra)
}

/// A `kB` field (`VmHWM`, `VmRSS`) of /proc/PID/status, in bytes.
pub fn status_kb(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kb: u64 = line[field.len() + 1..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime (clock ticks) from /proc/PID/stat; the command name may contain spaces.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3 of the man page, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The least-squares line through (seconds, value) points: its slope per hour and the slope's
/// standard error per hour; None with fewer than three points or no spread in time.
pub fn slope_per_hour(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let (mt, mv) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - mv)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let residuals: f64 = points.iter().map(|p| (p.1 - mv - slope * (p.0 - mt)).powi(2)).sum();
    let error = (residuals / (n - 2.0) / sxx).sqrt();
    Some((slope * 3600.0, error * 3600.0))
}

/// One message on the harness's clock: the create request sent and answered, the watch seeing it
/// appear, `Sending` and `Sent`.
#[derive(Debug, Clone, Copy)]
pub struct Timeline {
    /// The create request was sent.
    pub create_sent: Instant,
    /// The API server answered it.
    pub create_answered: Instant,
    /// The watch saw the new message.
    pub added: Instant,
    /// The watch saw it claimed (`Sending`).
    pub sending: Instant,
    /// The watch saw it `Sent`.
    pub sent: Instant,
}

/// Where a message's create-to-Sent time went: the create request; the watch delivering the new
/// object (from the create's answer to the watch event; the operator's watch waits as long); the
/// claim (the operator's queue, the mailbox's rate-limit turn, the claim patch and its watch
/// event); the send (the provider, the outcome patch and its watch event). The four add up to the
/// whole; a watch event that came before the create's answer counts as no watch time.
pub fn phases(t: &Timeline) -> [Duration; 4] {
    let create = t.create_answered.saturating_duration_since(t.create_sent);
    let seen = t.added.max(t.create_answered).min(t.sending.max(t.create_answered));
    let watch = seen.saturating_duration_since(t.create_answered);
    let claim = t.sending.saturating_duration_since(seen);
    let send = t.sent.saturating_duration_since(t.sending.max(seen));
    [create, watch, claim, send]
}

/// How many messages an open-loop run of `seconds` at `rate` per second creates (at least one),
/// and when the i-th is due after the start.
pub fn open_loop_schedule(rate: f64, seconds: f64) -> (usize, impl Fn(usize) -> Duration) {
    let rate = if rate.is_finite() && rate > 0.0 { rate } else { 1.0 };
    let count = ((rate * seconds.max(0.0)).ceil() as usize).max(1);
    (count, move |i: usize| Duration::from_secs_f64(i as f64 / rate))
}

/// (messages/s per API-server core in a run) / (the same in the ceiling's run): 1 when a message
/// costs the API server as much with the operator as with the minimal client. None without the
/// API server's CPU in either.
pub fn per_core_ratio(mps: f64, apiserver_cores: f64, ceiling: f64, ceiling_apiserver_cores: f64) -> Option<f64> {
    (apiserver_cores > 0.0 && ceiling_apiserver_cores > 0.0 && ceiling > 0.0)
        .then(|| (mps / apiserver_cores) / (ceiling / ceiling_apiserver_cores))
}

/// The least-squares exponent b of value ≈ a·size^b over (size, value) points: 1 is linear
/// growth, below 1 better than linear; None with fewer than two distinct positive sizes.
pub fn growth_exponent(points: &[(f64, f64)]) -> Option<f64> {
    let logs: Vec<(f64, f64)> =
        points.iter().filter(|(x, y)| *x > 0.0 && *y > 0.0).map(|(x, y)| (x.ln(), y.ln())).collect();
    if logs.len() < 2 {
        return None;
    }
    let n = logs.len() as f64;
    let (mx, my) = (logs.iter().map(|p| p.0).sum::<f64>() / n, logs.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = logs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    Some(logs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_are_per_hour_and_need_three_points() {
        // 1 unit a minute is 60 an hour, whatever the offset and the noise around the line.
        let line: Vec<(f64, f64)> = (0..30).map(|i| (i as f64 * 60.0, 100.0 + i as f64 + [0.5, -0.5][i % 2])).collect();
        let (slope, error) = slope_per_hour(&line).expect("a slope");
        assert!((slope - 60.0).abs() < 1.0, "{slope}");
        assert!(error > 0.0 && error < 1.0, "the noise is small against the trend: {error}");
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 7.0)).collect();
        assert_eq!(slope_per_hour(&flat), Some((0.0, 0.0)));
        // Noise alone: a slope within a few standard errors of zero.
        let noise: Vec<(f64, f64)> = (0..40).map(|i| (i as f64 * 10.0, 22.0 + [0.0, 1.0, 0.0, 2.0][i % 4])).collect();
        let (slope, error) = slope_per_hour(&noise).expect("a slope");
        assert!(slope.abs() < 3.0 * error, "{slope} ± {error}");
        assert_eq!(slope_per_hour(&[(0.0, 1.0), (1.0, 2.0)]), None);
        assert_eq!(slope_per_hour(&[(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)]), None);
    }

    #[test]
    fn sums_request_counters_over_codes() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="200",component="apiserver",dry_run="",group="mailroom.dev",resource="emailmessages",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 10
apiserver_request_total{code="409",component="apiserver",dry_run="",group="mailroom.dev",resource="emailmessages",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 2
apiserver_request_total{code="201",component="apiserver",dry_run="",group="events.k8s.io",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 5
apiserver_request_duration_seconds_bucket{le="1"} 3
"#;
        let totals = request_totals(text);
        let empty = HashMap::new();
        assert_eq!(delta(&empty, &totals, ("mailroom.dev", "emailmessages", "status", "PATCH")), 12.0);
        assert_eq!(delta(&empty, &totals, ("events.k8s.io", "events", "", "POST")), 5.0);
        assert_eq!(delta(&totals, &totals, ("events.k8s.io", "events", "", "POST")), 0.0);
        assert_eq!(delta(&empty, &totals, ("", "pods", "", "GET")), 0.0);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&samples, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&samples, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn counts_duplicates() {
        assert_eq!(duplicates(["a", "b", "a", "c", "a"]), (3, 1, 2));
        assert_eq!(duplicates(["a", "b"]), (2, 0, 0));
    }

    #[test]
    fn reads_proc_fields() {
        let status = "Name:\tmailroom\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kb(status, "VmHWM"), Some(20480 * 1024));
        assert_eq!(status_kb(status, "VmRSS"), Some(10240 * 1024));
        assert_eq!(status_kb(status, "VmPeak"), None);
        let stat = "1234 (mail room) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 2 3";
        assert_eq!(cpu_ticks(stat), Some(300));
    }

    #[test]
    fn phases_add_up_to_create_to_sent() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let t = Timeline { create_sent: at(0), create_answered: at(10), added: at(14), sending: at(30), sent: at(45) };
        let p = phases(&t);
        assert_eq!(p, [10, 4, 16, 15].map(Duration::from_millis));
        assert_eq!(p.iter().sum::<Duration>(), t.sent - t.create_sent);
        // The watch event before the create's answer: no watch time, and still the whole.
        let early = Timeline { added: at(8), ..t };
        let p = phases(&early);
        assert_eq!(p, [10, 0, 20, 15].map(Duration::from_millis));
        assert_eq!(p.iter().sum::<Duration>(), t.sent - t.create_sent);
        // Sending seen before the create's answer (a fast claim): all of it is the send.
        let fast = Timeline { added: at(8), sending: at(9), ..t };
        assert_eq!(phases(&fast).iter().sum::<Duration>(), t.sent - t.create_sent);
    }

    #[test]
    fn open_loop_schedules_at_the_rate() {
        let (n, due) = open_loop_schedule(50.0, 120.0);
        assert_eq!(n, 6000);
        assert_eq!(due(0), Duration::ZERO);
        assert_eq!(due(50), Duration::from_secs(1));
        assert_eq!(due(5999), Duration::from_secs_f64(119.98));
        assert_eq!(open_loop_schedule(0.0, 10.0).0, 10, "a rate of nothing falls back to 1/s");
        assert_eq!(open_loop_schedule(3.0, 0.0).0, 1);
    }

    #[test]
    fn per_core_ratios() {
        // 100 msg/s on 1.5 API-server cores against a ceiling of 120 on 1.8: the same per core.
        assert!((per_core_ratio(100.0, 1.5, 120.0, 1.8).unwrap() - 1.0).abs() < 1e-9);
        assert!((per_core_ratio(50.0, 1.5, 120.0, 1.8).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(per_core_ratio(100.0, 0.0, 120.0, 1.8), None);
        assert_eq!(per_core_ratio(100.0, 1.5, 120.0, 0.0), None);
    }

    #[test]
    fn growth_exponents() {
        let linear: Vec<(f64, f64)> = [1e3, 1e4, 1e5].iter().map(|&x| (x, 3.0 * x)).collect();
        assert!((growth_exponent(&linear).unwrap() - 1.0).abs() < 1e-9);
        let flat = [(1e3, 40.0), (1e4, 40.0), (1e5, 40.0)];
        assert!(growth_exponent(&flat).unwrap().abs() < 1e-9);
        let square: Vec<(f64, f64)> = [1e3, 1e4].iter().map(|&x| (x, x * x)).collect();
        assert!((growth_exponent(&square).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(growth_exponent(&[(1e3, 1.0)]), None);
        assert_eq!(growth_exponent(&[(1e3, 1.0), (1e3, 2.0)]), None);
    }
}
