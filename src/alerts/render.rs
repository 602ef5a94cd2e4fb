//! A notification as an email: subject, text and HTML, from the default templates or a route's own.

use std::collections::BTreeMap;

use minijinja::value::{Serde, Value};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde_json::Map;

use super::payload::{Alert, Notification, is_zero_time, parse_time, sorted_values};
use crate::controller::template::MAX_SUBJECT_CHARS;

/// The default subject template: Alertmanager's default email subject.
pub const DEFAULT_SUBJECT: &str = include_str!("templates/subject.txt");
/// The default plain-text body template.
pub const DEFAULT_TEXT: &str = include_str!("templates/text.txt");
/// The default HTML body template.
pub const DEFAULT_HTML: &str = include_str!("templates/html.html");

/// The default templates of one source.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    /// The subject.
    pub subject: &'static str,
    /// The text body.
    pub text: &'static str,
    /// The HTML body.
    pub html: &'static str,
}

/// Alertmanager's and Grafana's (the same data, Grafana's with a few fields more).
pub const ALERTMANAGER: Defaults = Defaults { subject: DEFAULT_SUBJECT, text: DEFAULT_TEXT, html: DEFAULT_HTML };
/// Flux's events.
pub const FLUX: Defaults = Defaults {
    subject: include_str!("templates/flux/subject.txt"),
    text: include_str!("templates/flux/text.txt"),
    html: include_str!("templates/flux/html.html"),
};
/// Argo CD's notifications.
pub const ARGOCD: Defaults = Defaults {
    subject: include_str!("templates/argocd/subject.txt"),
    text: include_str!("templates/argocd/text.txt"),
    html: include_str!("templates/argocd/html.html"),
};

/// The ConfigMap keys a route's templates live under.
pub const TEMPLATE_KEYS: [&str; 3] = ["subject", "text", "html"];

/// Alerts listed in the body, firing and resolved each; the rest are counted.
pub const MAX_ALERTS_SHOWN: usize = 100;
/// The most the text and HTML bodies may weigh together (the message is stored in etcd).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Encoded in a URL's query: all but RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// Bounds the work of one render, so a looping template cannot hold a request.
const TEMPLATE_FUEL: u64 = 20_000_000;

/// Templates from a route's ConfigMap; a part left out uses the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Templates {
    /// The subject template.
    pub subject: Option<String>,
    /// The plain-text body template.
    pub text: Option<String>,
    /// The HTML body template (HTML-escaped output).
    pub html: Option<String>,
}

impl Templates {
    /// The templates under the keys `subject`, `text` and `html` of a ConfigMap's data.
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Templates {
        Templates {
            subject: data.get("subject").cloned(),
            text: data.get("text").cloned(),
            html: data.get("html").cloned(),
        }
    }

    /// Whether it overrides nothing.
    pub fn is_empty(&self) -> bool {
        self.subject.is_none() && self.text.is_none() && self.html.is_none()
    }
}

/// The parts of the email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedMail {
    /// One line.
    pub subject: String,
    /// Absent when its template renders nothing.
    pub text: Option<String>,
    /// Absent when its template renders nothing.
    pub html: Option<String>,
}

/// Why a notification could not be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// A template did not compile or failed while rendering.
    #[error("the {part} template: {reason}")]
    Template {
        /// subject, text or html.
        part: &'static str,
        /// minijinja's explanation, with the line.
        reason: String,
    },
    /// Both bodies rendered empty.
    #[error("the text and html templates both rendered nothing")]
    EmptyBody,
    /// The bodies are too large to store.
    #[error("the rendered body is {0} bytes, over the limit of 1 MiB; lower the receiver's max_alerts")]
    TooLarge(usize),
}

/// The rendered email, and what went wrong with the route's own templates if they were set aside.
#[derive(Debug)]
pub struct Rendering {
    /// The email.
    pub mail: RenderedMail,
    /// The route's templates failed and the defaults were used instead: why.
    pub template_error: Option<RenderError>,
}

/// Renders a notification with the route's templates, falling back to the defaults when they fail:
/// an alert still goes out when someone breaks a template; the fallback says so in the email.
pub fn render(n: &Notification, route: &RouteName, custom: Option<&Templates>) -> Result<Rendering, RenderError> {
    render_context(alertmanager_context(n, false), &ALERTMANAGER, route, custom)
}

/// Renders any source's template data (a JSON object) with the route's templates or the source's
/// defaults, falling back to the defaults as [`render`] does. The data gains `route` and
/// `templateError`.
pub fn render_context(
    mut ctx: Map<String, serde_json::Value>,
    defaults: &Defaults,
    route: &RouteName,
    custom: Option<&Templates>,
) -> Result<Rendering, RenderError> {
    ctx.insert("route".into(), serde_json::to_value(route).unwrap_or_default());
    ctx.insert("templateError".into(), serde_json::Value::Null);
    if let Some(custom) = custom.filter(|t| !t.is_empty()) {
        match render_with(&ctx, custom, defaults) {
            Ok(mail) => return Ok(Rendering { mail, template_error: None }),
            Err(e @ RenderError::TooLarge(_)) => return Err(e),
            Err(e) => {
                ctx.insert("templateError".into(), serde_json::Value::String(e.to_string()));
                let mail = render_with(&ctx, &Templates::default(), defaults)?;
                return Ok(Rendering { mail, template_error: Some(e) });
            }
        }
    }
    Ok(Rendering { mail: render_with(&ctx, &Templates::default(), defaults)?, template_error: None })
}

/// Alertmanager's (or, with `grafana`, Grafana's) notification as templates see it.
pub fn alertmanager_context(n: &Notification, grafana: bool) -> Map<String, serde_json::Value> {
    match serde_json::to_value(TemplateData::new(n, grafana)) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// The route, as templates see it.
#[derive(Clone, Debug, Serialize)]
pub struct RouteName {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

fn render_with(
    data: &Map<String, serde_json::Value>,
    templates: &Templates,
    defaults: &Defaults,
) -> Result<RenderedMail, RenderError> {
    let env = environment();
    let ctx = Value::from(Serde(data));
    let part = |part: &'static str, custom: &Option<String>, default: &'static str| {
        let source = custom.as_deref().unwrap_or(default);
        let reason = |e: minijinja::Error| RenderError::Template { part, reason: describe(&e) };
        // The name decides the escaping: only the html part is HTML-escaped.
        let tmpl = env.template_from_named_str(part, source).map_err(reason)?;
        tmpl.render(ctx.clone()).map_err(reason)
    };
    let subject = one_line(&part("subject", &templates.subject, defaults.subject)?);
    let text = Some(part("text", &templates.text, defaults.text)?).filter(|s| !s.trim().is_empty());
    let html = Some(part("html", &templates.html, defaults.html)?).filter(|s| !s.trim().is_empty());
    if text.is_none() && html.is_none() {
        return Err(RenderError::EmptyBody);
    }
    let size = text.as_ref().map_or(0, String::len) + html.as_ref().map_or(0, String::len);
    if size > MAX_BODY_BYTES {
        return Err(RenderError::TooLarge(size));
    }
    Ok(RenderedMail { subject, text, html })
}

fn environment<'s>() -> Environment<'s> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_auto_escape_callback(|name| if name == "html" { AutoEscape::Html } else { AutoEscape::None });
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_filter("datetime", datetime);
    env
}

/// The `datetime` filter: an RFC 3339 time as `2025-10-14 08:21:37 UTC`; the zero time as nothing.
fn datetime(value: String) -> String {
    if is_zero_time(&value) {
        return String::new();
    }
    match parse_time(&value) {
        Some(t) => t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
        None => value,
    }
}

/// minijinja's error with its detail and line, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut out = e.kind().to_string();
    if let Some(detail) = e.detail() {
        out = format!("{out}: {detail}");
    }
    if let Some(line) = e.line() {
        out = format!("{out} (line {line})");
    }
    out
}

/// A subject on one line, no longer than an EmailMessage allows.
fn one_line(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.chars().count() <= MAX_SUBJECT_CHARS {
        return joined;
    }
    let mut cut: String = joined.chars().take(MAX_SUBJECT_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// What templates see: Alertmanager's webhook data (the same names), plus ready-made parts.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TemplateData {
    status: String,
    receiver: String,
    group_key: String,
    group_labels: BTreeMap<String, String>,
    common_labels: BTreeMap<String, String>,
    common_annotations: BTreeMap<String, String>,
    #[serde(rename = "externalURL")]
    external_url: String,
    truncated_alerts: u64,
    /// Firing, then resolved, at most MAX_ALERTS_SHOWN of each.
    alerts: Vec<AlertView>,
    firing: Vec<AlertView>,
    resolved: Vec<AlertView>,
    /// How many firing and resolved alerts are in the payload (the lists may be cut).
    firing_count: usize,
    resolved_count: usize,
    /// Alerts in the payload but not in the lists.
    omitted_alerts: usize,
    /// Alertmanager's default email subject.
    default_subject: String,
    /// The group label values, alertname first.
    title: String,
    #[serde(rename = "alertmanagerURL")]
    alertmanager_url: String,
    /// `Alertmanager` or `Grafana`.
    source_name: &'static str,
    /// Grafana's own URL (Grafana only).
    #[serde(rename = "grafanaURL")]
    grafana_url: String,
    /// Grafana only: the organisation, `alerting` or `ok`, and the contact point's message.
    #[serde(skip_serializing_if = "Option::is_none")]
    org_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// One alert, as templates see it.
#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct AlertView {
    status: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    starts_at: String,
    /// Empty while the alert fires (Alertmanager sends the zero time).
    ends_at: String,
    #[serde(rename = "generatorURL")]
    generator_url: String,
    fingerprint: String,
    name: String,
    severity: String,
    summary: String,
    description: String,
    #[serde(rename = "runbookURL")]
    runbook_url: String,
    #[serde(rename = "silenceURL")]
    silence_url: String,
    /// Grafana: the rule's dashboard and panel, a screenshot, and the values.
    #[serde(rename = "dashboardURL")]
    dashboard_url: String,
    #[serde(rename = "panelURL")]
    panel_url: String,
    #[serde(rename = "imageURL")]
    image_url: String,
    values: BTreeMap<String, serde_json::Value>,
    value_string: String,
}

impl TemplateData {
    fn new(n: &Notification, grafana: bool) -> TemplateData {
        let external = web_url(&n.external_url).map(|u| u.trim_end_matches('/').to_string());
        // Grafana sends each alert's silence link; Alertmanager's is built from its URL.
        let silences = if grafana { None } else { external.as_deref() };
        let view = |a: &Alert| AlertView::new(a, silences);
        let firing: Vec<AlertView> = n.firing().take(MAX_ALERTS_SHOWN).map(view).collect();
        let resolved: Vec<AlertView> = n.resolved().take(MAX_ALERTS_SHOWN).map(view).collect();
        let (firing_count, resolved_count) = (n.firing().count(), n.resolved().count());
        let title = match sorted_values(&n.group_labels).join(" ") {
            t if t.is_empty() => n.alertname().unwrap_or("alerts").to_string(),
            t => t,
        };
        let alertmanager_url = external
            .as_deref()
            .filter(|_| !grafana)
            .map(|e| format!("{e}/#/alerts?receiver={}", utf8_percent_encode(&n.receiver, QUERY_VALUE)))
            .unwrap_or_default();
        let grafana_title = n.title.as_deref().map(str::trim).filter(|t| grafana && !t.is_empty());
        TemplateData {
            status: n.status.clone(),
            receiver: n.receiver.clone(),
            group_key: n.group_key.clone(),
            group_labels: n.group_labels.clone(),
            common_labels: n.common_labels.clone(),
            common_annotations: n.common_annotations.clone(),
            external_url: external.clone().unwrap_or_default(),
            truncated_alerts: n.truncated_alerts,
            alerts: firing.iter().chain(resolved.iter()).cloned().collect(),
            omitted_alerts: firing_count + resolved_count - firing.len() - resolved.len(),
            firing,
            resolved,
            firing_count,
            resolved_count,
            default_subject: grafana_title.map(str::to_string).unwrap_or_else(|| n.default_subject()),
            title: grafana_title.map(str::to_string).unwrap_or(title),
            alertmanager_url,
            source_name: if grafana { "Grafana" } else { "Alertmanager" },
            grafana_url: if grafana { external.clone().unwrap_or_default() } else { String::new() },
            org_id: n.org_id,
            state: n.state.clone(),
            message: n.message.clone(),
        }
    }
}

impl AlertView {
    fn new(a: &Alert, external: Option<&str>) -> AlertView {
        let annotation = |k: &str| a.annotations.get(k).cloned().unwrap_or_default();
        AlertView {
            status: a.status.clone(),
            labels: a.labels.clone(),
            annotations: a.annotations.clone(),
            starts_at: a.starts_at.clone(),
            ends_at: if is_zero_time(&a.ends_at) { String::new() } else { a.ends_at.clone() },
            generator_url: web_url(&a.generator_url).unwrap_or_default().to_string(),
            fingerprint: a.fingerprint.clone(),
            name: a.name().to_string(),
            severity: a.severity().unwrap_or_default().to_string(),
            summary: annotation("summary"),
            description: annotation("description"),
            runbook_url: web_url(&annotation("runbook_url")).unwrap_or_default().to_string(),
            silence_url: match external {
                Some(e) => silence_url(e, &a.labels),
                None => link(&a.silence_url),
            },
            dashboard_url: link(&a.dashboard_url),
            panel_url: link(&a.panel_url),
            image_url: link(&a.image_url),
            values: a.values.clone().unwrap_or_default(),
            value_string: a.value_string.clone().unwrap_or_default(),
        }
    }
}

/// An optional link, kept only if it is a web link.
fn link(url: &Option<String>) -> String {
    url.as_deref().and_then(web_url).unwrap_or_default().to_string()
}

/// The URL, if it is a plain http(s) link: nothing else becomes a link in an email.
pub(crate) fn web_url(url: &str) -> Option<&str> {
    let url = url.trim();
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let web = lower.starts_with("http://") || lower.starts_with("https://");
    (web && !url.chars().any(|c| c.is_whitespace() || c.is_control())).then_some(url)
}

/// Alertmanager's "new silence" page, prefilled with matchers for every label of the alert.
pub fn silence_url(external: &str, labels: &BTreeMap<String, String>) -> String {
    let matchers: Vec<String> =
        labels.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    let filter = format!("{{{}}}", matchers.join(", "));
    format!("{external}/#/silences/new?filter={}", utf8_percent_encode(&filter, QUERY_VALUE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::payload::parse;

    const FIRING: &str = include_str!("../../tests/fixtures/alertmanager-firing.json");

    fn firing() -> Notification {
        parse(FIRING.as_bytes()).unwrap()
    }

    fn route() -> RouteName {
        RouteName { namespace: "monitoring".into(), name: "platform".into() }
    }

    fn resolved() -> Notification {
        let mut n = firing();
        n.status = "resolved".into();
        for a in &mut n.alerts {
            a.status = "resolved".into();
            a.ends_at = "2025-10-14T09:02:37.482Z".into();
        }
        n
    }

    #[test]
    fn the_default_text_has_what_an_on_call_needs() {
        let r = render(&firing(), &route(), None).unwrap();
        assert!(r.template_error.is_none());
        assert_eq!(r.mail.subject, "[FIRING:2] KubePodCrashLooping shop (api kube-state-metrics critical)");
        let text = r.mail.text.unwrap();
        for words in [
            "KubePodCrashLooping",
            "critical",
            "Pod is crash looping.",
            "Pod shop/api-7d9f8c6b5-x2x9q (api) is in waiting state (reason: \"CrashLoopBackOff\").",
            "2025-10-14 08:21:37 UTC",
            "pod=api-7d9f8c6b5-q8k2m",
            "http://prometheus-k8s-0:9090/graph?g0.expr=",
            "http://alertmanager-main-0:9093/#/silences/new?filter=%7Balertname%3D%22KubePodCrashLooping%22",
            "https://runbooks.prometheus-operator.dev/runbooks/kubernetes/kubepodcrashlooping",
            "AlertRoute monitoring/platform",
        ] {
            assert!(text.contains(words), "text lacks {words:?}:\n{text}");
        }
        assert!(!text.contains("0001-01-01"), "a firing alert has no end time:\n{text}");
        assert!(!text.contains("&quot;") && !text.contains("&#x2f;"), "the text part is not HTML-escaped:\n{text}");
    }

    #[test]
    fn grafana_notifications_keep_grafanas_title_values_and_links() {
        let g =
            crate::alerts::payload::parse_grafana(include_bytes!("../../tests/fixtures/grafana-firing.json")).unwrap();
        let r = render_context(alertmanager_context(&g, true), &ALERTMANAGER, &route(), None).unwrap();
        assert_eq!(r.mail.subject, "[FIRING:2] Platform (blue)");
        let text = r.mail.text.unwrap();
        for words in [
            "High memory usage",
            "This alert was triggered for zone us-1",
            "B=44.23943737541908",
            "Dashboard:   https://grafana.contoso.com/d/a1b2c3?orgId=1",
            "Panel:       https://grafana.contoso.com/d/a1b2c3?orgId=1&viewPanel=4",
            "Image:       https://grafana.contoso.com/public/img/attachments/8d2a.png",
            "Silence:     https://grafana.contoso.com/alerting/silence/new?alertmanager=grafana",
            "Grafana: https://grafana.contoso.com",
        ] {
            assert!(text.contains(words), "text lacks {words:?}:\n{text}");
        }
        assert!(!text.contains("/#/silences/new"), "no Alertmanager silence link for Grafana:\n{text}");
        let html = r.mail.html.unwrap();
        assert!(html.contains(">Dashboard</a>") && html.contains(">Panel</a>") && html.contains("<img"), "{html}");
    }

    #[test]
    fn the_default_html_is_escaped_and_links_back() {
        let mut n = firing();
        n.alerts[0].annotations.insert("summary".into(), "<script>alert(1)</script> & more".into());
        let html = render(&n, &route(), None).unwrap().mail.html.unwrap();
        assert!(html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt; &amp; more"), "{html}");
        assert!(!html.contains("<script>"));
        assert!(html.contains("FIRING"));
        assert!(
            html.contains("href=\"http:&#x2f;&#x2f;alertmanager-main-0:9093&#x2f;#&#x2f;silences&#x2f;new?filter=")
        );
        assert!(html.contains("2025-10-14 08:21:37 UTC"));
    }

    #[test]
    fn resolved_notifications_say_so_with_the_end_time() {
        let r = render(&resolved(), &route(), None).unwrap();
        assert_eq!(r.mail.subject, "[RESOLVED] KubePodCrashLooping shop (api kube-state-metrics critical)");
        let text = r.mail.text.unwrap();
        assert!(text.contains("RESOLVED"), "{text}");
        assert!(text.contains("2025-10-14 09:02:37 UTC"), "{text}");
    }

    #[test]
    fn only_web_links_become_links() {
        let mut n = firing();
        n.alerts[0].generator_url = "javascript:alert(1)".into();
        n.external_url = "file:///etc/passwd".into();
        let r = render(&n, &route(), None).unwrap();
        let (text, html) = (r.mail.text.unwrap(), r.mail.html.unwrap());
        assert!(!text.contains("javascript:") && !html.contains("javascript:"));
        assert!(!text.contains("silences/new") && !text.contains("file:"));
    }

    #[test]
    fn a_routes_templates_replace_the_parts_they_name() {
        let custom = Templates {
            subject: Some("{{ status|upper }}: {{ commonLabels.alertname }} in {{ groupLabels.namespace }}".into()),
            text: None,
            html: Some(
                "<p>{{ firing|length }} firing: {{ commonAnnotations.summary }} {{ nothing.at.all }}</p>".into(),
            ),
        };
        let r = render(&firing(), &route(), Some(&custom)).unwrap();
        assert!(r.template_error.is_none());
        assert_eq!(r.mail.subject, "FIRING: KubePodCrashLooping in shop");
        assert_eq!(r.mail.html.as_deref(), Some("<p>2 firing: Pod is crash looping. </p>"));
        assert!(r.mail.text.unwrap().contains("Pod is crash looping."), "the text part keeps the default");
    }

    #[test]
    fn a_part_that_renders_nothing_is_left_out_but_not_both() {
        let custom = Templates { html: Some("{# no html #}".into()), ..Default::default() };
        let r = render(&firing(), &route(), Some(&custom)).unwrap();
        assert!(r.mail.html.is_none() && r.mail.text.is_some());
        let empty = Templates { html: Some(" ".into()), text: Some("".into()), subject: None };
        let r = render(&firing(), &route(), Some(&empty)).unwrap();
        assert_eq!(r.template_error, Some(RenderError::EmptyBody));
        assert!(r.mail.text.is_some(), "the defaults stand in");
    }

    #[test]
    fn a_broken_template_falls_back_to_the_defaults_and_says_why() {
        let custom = Templates { subject: Some("{% if status %}unclosed".into()), ..Default::default() };
        let r = render(&firing(), &route(), Some(&custom)).unwrap();
        let err = r.template_error.expect("the error is reported");
        let reason = err.to_string();
        assert!(reason.starts_with("the subject template: syntax error"), "{reason}");
        assert!(reason.contains("line 1"), "{reason}");
        assert_eq!(r.mail.subject, "[FIRING:2] KubePodCrashLooping shop (api kube-state-metrics critical)");
        let text = r.mail.text.unwrap();
        assert!(text.contains("could not be used") && text.contains("syntax error"), "{text}");

        let failing = Templates { text: Some("{{ 1 / 0 }}".into()), ..Default::default() };
        let err = render(&firing(), &route(), Some(&failing)).unwrap().template_error.unwrap();
        assert!(err.to_string().starts_with("the text template:"), "{err}");
    }

    #[test]
    fn a_looping_template_runs_out_of_fuel() {
        let custom = Templates {
            text: Some("{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}".into()),
            ..Default::default()
        };
        let err = render(&firing(), &route(), Some(&custom)).unwrap().template_error.unwrap();
        assert!(err.to_string().contains("fuel"), "{err}");
    }

    #[test]
    fn subjects_are_one_line_and_bounded() {
        assert_eq!(one_line(" a\r\nb\tc  "), "a b c");
        let long = one_line(&"x".repeat(2000));
        assert_eq!(long.chars().count(), MAX_SUBJECT_CHARS);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn many_alerts_are_counted_not_all_listed() {
        let mut n = firing();
        let template = n.alerts[0].clone();
        n.alerts = (0..150)
            .map(|i| {
                let mut a = template.clone();
                a.fingerprint = format!("{i:016x}");
                a
            })
            .collect();
        let text = render(&n, &route(), None).unwrap().mail.text.unwrap();
        assert!(text.contains("50 more alerts are not listed"), "{}", &text[text.len().saturating_sub(600)..]);
    }

    #[test]
    fn the_silence_link_escapes_quotes_in_values() {
        let labels: BTreeMap<String, String> =
            [("alertname", "X"), ("msg", "say \"hi\"")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let url = silence_url("http://am:9093", &labels);
        let filter = url.split("filter=").nth(1).unwrap();
        let decoded = percent_encoding::percent_decode_str(filter).decode_utf8().unwrap();
        assert_eq!(decoded, r#"{alertname="X", msg="say \"hi\""}"#);
    }

    #[test]
    fn datetime_formats_rfc3339_and_hides_the_zero_time() {
        assert_eq!(datetime("2025-10-14T10:21:37.482+02:00".into()), "2025-10-14 08:21:37 UTC");
        assert_eq!(datetime("0001-01-01T00:00:00Z".into()), "");
        assert_eq!(datetime("yesterday".into()), "yesterday");
    }
}
