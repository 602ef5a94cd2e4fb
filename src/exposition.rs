//! The two text formats `/metrics` speaks. prometheus-client writes OpenMetrics 1.0, which
//! Prometheus asks for in its scrapes' `Accept` header; every other client (promtool, curl, an
//! older scraper) gets the Prometheus text format 0.0.4, which `promtool check metrics` and
//! the Prometheus text parsers read: a counter's HELP and TYPE name the `_total` series, there is
//! no `# UNIT` or `# EOF` line, and OpenMetrics-only types become their nearest text types.
//! Formats: <https://prometheus.io/docs/instrumenting/exposition_formats/>,
//! <https://github.com/prometheus/OpenMetrics/blob/main/specification/OpenMetrics.md>.

use std::collections::HashSet;

/// The content type of OpenMetrics 1.0 text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header asks for OpenMetrics (with a q-value above 0).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.into_iter().flat_map(|a| a.split(',')).any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let refused = parts.any(|p| p.strip_prefix("q=").is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0)));
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// OpenMetrics text as the Prometheus text format 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    // Counter families: OpenMetrics names the family `x`, its sample `x_total`.
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, kind)| kind.trim() == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = family_name(name, &counters);
            // OpenMetrics escapes `"` in HELP; the text format knows only `\\` and `\n`.
            out.push_str(&format!("# HELP {name} {}\n", help.replace("\\\"", "\"")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = match kind.trim() {
                "counter" | "gauge" | "histogram" | "summary" => kind.trim(),
                "info" | "stateset" => "gauge",
                "gaugehistogram" => "histogram",
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {} {kind}\n", family_name(name, &counters)));
        } else if is_counter_created(line, &counters) {
            // `_created` is OpenMetrics' own series; the text format has none.
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn family_name(name: &str, counters: &HashSet<&str>) -> String {
    if counters.contains(name) { format!("{name}_total") } else { name.to_string() }
}

fn is_counter_created(line: &str, counters: &HashSet<&str>) -> bool {
    let name = line.split(['{', ' ']).next().unwrap_or_default();
    name.strip_suffix("_created").is_some_and(|family| counters.contains(family))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENMETRICS_TEXT: &str = r#"# HELP mailroom_messages Messages by outcome (sent, "failed").
# TYPE mailroom_messages counter
mailroom_messages_total{profile="a/b",outcome="sent"} 2
mailroom_messages_created{profile="a/b",outcome="sent"} 1700000000.0
# HELP mailroom_queue_depth EmailMessages not yet Sent or Failed.
# TYPE mailroom_queue_depth gauge
mailroom_queue_depth 3
# HELP mailroom_delivery_latency_seconds Seconds to Sent.
# TYPE mailroom_delivery_latency_seconds histogram
# UNIT mailroom_delivery_latency_seconds seconds
mailroom_delivery_latency_seconds_sum 0.5
mailroom_delivery_latency_seconds_count 1
mailroom_delivery_latency_seconds_bucket{le="+Inf"} 1
# TYPE mailroom_mystery unknown
mailroom_mystery 1
# EOF
"#;

    #[test]
    fn counters_are_named_after_their_total_series_and_openmetrics_lines_go() {
        let text = to_prometheus_text(OPENMETRICS_TEXT);
        assert_eq!(
            text,
            r#"# HELP mailroom_messages_total Messages by outcome (sent, "failed").
# TYPE mailroom_messages_total counter
mailroom_messages_total{profile="a/b",outcome="sent"} 2
# HELP mailroom_queue_depth EmailMessages not yet Sent or Failed.
# TYPE mailroom_queue_depth gauge
mailroom_queue_depth 3
# HELP mailroom_delivery_latency_seconds Seconds to Sent.
# TYPE mailroom_delivery_latency_seconds histogram
mailroom_delivery_latency_seconds_sum 0.5
mailroom_delivery_latency_seconds_count 1
mailroom_delivery_latency_seconds_bucket{le="+Inf"} 1
# TYPE mailroom_mystery untyped
mailroom_mystery 1
"#
        );
    }

    #[test]
    fn a_gauge_named_like_a_counters_created_series_stays() {
        let text = to_prometheus_text("# TYPE x_created gauge\nx_created 1\n# EOF\n");
        assert_eq!(text, "# TYPE x_created gauge\nx_created 1\n");
    }

    #[test]
    fn openmetrics_only_for_those_who_ask_for_it() {
        // Prometheus 3's default scrape Accept header.
        let prometheus = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("Application/OpenMetrics-Text")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0, text/plain")));
    }

    #[test]
    fn the_operators_own_metrics_convert() {
        let metrics = crate::metrics::Metrics::default();
        metrics.outcome("a/b", "graph", "sent");
        let profile = crate::metrics::ProfileLabels { profile: "a/b".into() };
        metrics.token_failures.get_or_create(&profile).inc();
        let text = to_prometheus_text(&metrics.encode());
        assert!(text.contains("# TYPE mailroom_messages_total counter\n"), "{text}");
        assert!(text.contains("# TYPE mailroom_token_refresh_failures_total counter\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# TYPE mailroom_messages counter"), "{text}");
    }
}
