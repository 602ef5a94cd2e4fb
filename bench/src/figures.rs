//! Pure arithmetic on what a run observed: percentiles, counter deltas, duplicates, /proc fields.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

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
}
