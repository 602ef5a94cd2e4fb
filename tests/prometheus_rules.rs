//! mailroom's own alerts (deploy/prometheus/mailroom-rules.yaml) with the real promtool: the rules
//! pass `promtool check rules`, their unit tests pass `promtool test rules` and test every alert
//! firing and not firing (and fail when an alert is broken), the kustomize component and the
//! chart install exactly that file as a PrometheusRule the Prometheus Operator's own CRD accepts,
//! and a running operator's `/metrics` passes `promtool check metrics`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::emulator::{Emulator, concat_pems};
use common::{Operator, create_yaml, phase, repo_root};
use kube::Api;
use mailroom::api::{EmailMessage, Phase};
use serde_json::json;
use serde_yaml::Value;

const RULES: &str = "deploy/prometheus/mailroom-rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/mailroom-rules.test.yaml";
const CHART_COPY: &str = "deploy/helm/mailroom/files/prometheus/mailroom-rules.yaml";
const COMPONENT: &str = "deploy/components/prometheus-rule/prometheusrule.yaml";
const WAIT: Duration = Duration::from_secs(60);
/// The Prometheus Operator release whose PrometheusRule CRD judges the manifests (as hack/e2e.sh
/// takes its ServiceMonitor CRD): from the Go module proxy, in the module's example/ tree.
const PROMETHEUS_OPERATOR: &str = "github.com/prometheus-operator/prometheus-operator@v0.85.0";

// --- tools ----------------------------------------------------------------------------------------

/// Runs a command with `input` on stdin and returns its output.
fn run(cmd: &mut Command, input: Option<&str>) -> Output {
    let mut child = cmd
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let Some(input) = input {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("wait for the command")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A binary that a hack/ script builds once per machine and prints the path of: `env`, or the
/// script's last line of output.
fn built_tool(env: &str, script: &str, args: &[&str]) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    let out = run(Command::new("bash").arg(repo_root().join(script)).args(args).stderr(Stdio::inherit()), None);
    assert!(out.status.success(), "{script} {args:?} failed");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    PathBuf::from(stdout.lines().last().expect("the script prints the path").trim())
}

/// promtool: `MAILROOM_PROMTOOL`, or the one hack/prom-tools.sh builds.
fn promtool() -> &'static Path {
    static PROMTOOL: OnceLock<PathBuf> = OnceLock::new();
    PROMTOOL.get_or_init(|| built_tool("MAILROOM_PROMTOOL", "hack/prom-tools.sh", &["promtool"]))
}

fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| built_tool("MAILROOM_HELM", "hack/helm.sh", &[]))
}

fn promtool_in(dir: &Path, args: &[&str], input: Option<&str>) -> Output {
    run(Command::new(promtool()).args(args).current_dir(dir), input)
}

fn kubectl_ok(args: &[&str], input: Option<&str>) -> String {
    let out = run(Command::new("kubectl").args(args), input);
    assert!(out.status.success(), "kubectl {args:?} failed:\n{}", text(&out));
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).expect("YAML")
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .filter(|d| !d.is_null())
        .collect()
}

use serde::Deserialize;

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter().fold(v, |v, k| &v[*k]).as_str().unwrap_or_default()
}

/// The alerts of a rules file (its `groups[].rules[].alert`).
fn alert_names(rules: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            names.extend(rule["alert"].as_str().map(String::from));
        }
    }
    names
}

// --- the rules and their unit tests ----------------------------------------------------------------

#[test]
fn the_rules_pass_promtool_check_rules_and_their_unit_tests() {
    let dir = repo_root().join("deploy/prometheus");
    let out = promtool_in(&dir, &["check", "rules", "mailroom-rules.yaml"], None);
    assert!(out.status.success(), "promtool check rules:\n{}", text(&out));
    let rules = yaml(&read(RULES));
    let names = alert_names(&rules);
    assert!(text(&out).contains(&format!("SUCCESS: {} rules found", names.len())), "{}", text(&out));
    let want: BTreeSet<&str> = [
        "MailroomDeliveriesFailing",
        "MailroomTokenRefreshFailing",
        "MailroomTokenExpiringSoon",
        "MailroomBacklogGrowing",
        "MailroomNoLeader",
    ]
    .into();
    assert_eq!(names.iter().map(String::as_str).collect::<BTreeSet<_>>(), want);

    let out = promtool_in(&dir, &["test", "rules", "mailroom-rules.test.yaml"], None);
    assert!(out.status.success(), "promtool test rules:\n{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

#[test]
fn every_alert_is_tested_firing_and_not_firing() {
    let tests = yaml(&read(RULE_TESTS));
    let (mut firing, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            match case["exp_alerts"].as_sequence() {
                Some(alerts) if !alerts.is_empty() => firing.insert(name),
                _ => silent.insert(name),
            };
        }
    }
    for name in alert_names(&yaml(&read(RULES))) {
        assert!(firing.contains(&name), "{name} is never tested firing");
        assert!(silent.contains(&name), "{name} is never tested not firing");
    }
}

/// An alert whose expression never fires, or always does, fails the unit tests: they check what
/// the alerts do, not only that they parse.
#[test]
fn the_unit_tests_fail_when_an_alert_is_broken() {
    let source = read(RULES);
    let tests = read(RULE_TESTS);
    for name in alert_names(&yaml(&source)) {
        for broken in ["vector(0) > 1", "vector(1)"] {
            let mut rules = yaml(&source);
            for group in rules["groups"].as_sequence_mut().expect("groups") {
                for rule in group["rules"].as_sequence_mut().expect("rules") {
                    if rule["alert"].as_str() == Some(name.as_str()) {
                        rule["expr"] = Value::String(broken.into());
                    }
                }
            }
            let dir = tempfile::tempdir().expect("temp dir");
            std::fs::write(dir.path().join("mailroom-rules.yaml"), serde_yaml::to_string(&rules).unwrap()).unwrap();
            std::fs::write(dir.path().join("mailroom-rules.test.yaml"), &tests).unwrap();
            let out = promtool_in(dir.path(), &["test", "rules", "mailroom-rules.test.yaml"], None);
            assert!(!out.status.success(), "the unit tests pass with {name} as `{broken}`:\n{}", text(&out));
            assert!(text(&out).contains(&name), "the failure names {name}:\n{}", text(&out));
        }
    }
}

// --- the copies the manifests carry ----------------------------------------------------------------

#[test]
fn the_component_and_the_chart_carry_the_rules_file_unchanged() {
    let source = read(RULES);
    assert_eq!(read(CHART_COPY), source, "{CHART_COPY} drifted from {RULES}: run `make prometheus-rule`");
    let component = yaml(&read(COMPONENT));
    assert_eq!(component["spec"], yaml(&source), "{COMPONENT} drifted from {RULES}: run `make prometheus-rule`");
}

/// The PrometheusRule of the kustomize overlay and of the chart, and nothing of it by default.
fn rendered_rules() -> Vec<(&'static str, Value)> {
    let root = repo_root();
    let base = kubectl_ok(&["kustomize", &root.join("deploy/base").display().to_string()], None);
    assert!(!docs(&base).iter().any(|d| d["kind"] == "PrometheusRule"), "the base has no PrometheusRule");
    let overlay = kubectl_ok(&["kustomize", &root.join("deploy/overlays/prometheus-rule").display().to_string()], None);
    let mut from_kustomize: Vec<Value> = docs(&overlay).into_iter().filter(|d| d["kind"] == "PrometheusRule").collect();
    assert_eq!(from_kustomize.len(), 1, "{overlay}");

    let template = |flags: &[&str]| {
        let out = run(
            Command::new(helm())
                .args(["template", "mailroom", "deploy/helm/mailroom", "--namespace", "mailroom-system"])
                .args(flags)
                .current_dir(&root),
            None,
        );
        assert!(out.status.success(), "helm template {flags:?}:\n{}", text(&out));
        docs(&String::from_utf8(out.stdout).expect("UTF-8"))
    };
    assert!(!template(&[]).iter().any(|d| d["kind"] == "PrometheusRule"), "the chart has none by default");
    let mut from_chart: Vec<Value> =
        template(&["--set", "prometheusRule.enabled=true", "--set", "prometheusRule.labels.release=prometheus"])
            .into_iter()
            .filter(|d| d["kind"] == "PrometheusRule")
            .collect();
    assert_eq!(from_chart.len(), 1);
    assert_eq!(str_at(&from_chart[0], &["metadata", "labels", "release"]), "prometheus", "the chart's extra labels");
    assert_eq!(str_at(&from_chart[0], &["metadata", "namespace"]), "mailroom-system");
    assert_eq!(str_at(&from_kustomize[0], &["metadata", "namespace"]), "mailroom-system");
    assert_eq!(str_at(&from_kustomize[0], &["metadata", "labels", "app.kubernetes.io/part-of"]), "mailroom");
    vec![("the kustomize overlay", from_kustomize.remove(0)), ("the chart", from_chart.remove(0))]
}

/// The Prometheus Operator's PrometheusRule CRD: `MAILROOM_PROMETHEUSRULE_CRD`, or the file in
/// the pinned module, which `go mod download` brings into the Go module cache.
fn prometheusrule_crd() -> PathBuf {
    if let Ok(path) = std::env::var("MAILROOM_PROMETHEUSRULE_CRD") {
        return PathBuf::from(path);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut last = String::new();
    for _ in 0..3 {
        let out = run(
            Command::new("go").args(["mod", "download", "-json", PROMETHEUS_OPERATOR]).current_dir(dir.path()),
            None,
        );
        if out.status.success() {
            let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("go mod download -json");
            let module = PathBuf::from(info["Dir"].as_str().expect("Dir"));
            return module.join("example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml");
        }
        last = text(&out);
        std::thread::sleep(Duration::from_secs(5));
    }
    panic!("go mod download {PROMETHEUS_OPERATOR} failed three times: {last}");
}

#[tokio::test]
async fn the_installed_prometheus_rule_is_the_rules_file_and_the_operators_crd_accepts_it() {
    let rendered = rendered_rules();
    let source = yaml(&read(RULES));
    let client = common::client().await;
    let ns = common::namespace(&client, "promrule", &[]).await;
    let crd = prometheusrule_crd();
    kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", &crd.display().to_string()], None);
    kubectl_ok(
        &["wait", "--for=condition=Established", "--timeout=60s", "crd/prometheusrules.monitoring.coreos.com"],
        None,
    );
    for (what, mut rule) in rendered {
        assert_eq!(rule["spec"], source, "{what} installs other rules than {RULES}");
        // What Prometheus loads from it passes promtool too.
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
        let out = promtool_in(dir.path(), &["check", "rules", "rules.yaml"], None);
        assert!(out.status.success(), "{what}: promtool check rules:\n{}", text(&out));
        // The API server judges it by the Prometheus Operator's schema (in a namespace of this test).
        rule["metadata"]["namespace"] = Value::String(ns.clone());
        let manifest = serde_yaml::to_string(&rule).unwrap();
        let out =
            run(Command::new("kubectl").args(["apply", "--dry-run=server", "-o", "name", "-f", "-"]), Some(&manifest));
        assert!(out.status.success(), "{what}: the PrometheusRule CRD refuses it:\n{}", text(&out));
        assert!(text(&out).contains("prometheusrule.monitoring.coreos.com/"), "{}", text(&out));
    }
}

// --- /metrics ------------------------------------------------------------------------------------

const TENANT: &str = "7e3b1c2d-0000-4000-8000-0000000091e0";
const CLIENT: &str = "9a1f0c3e-1111-4111-8111-0000000091e1";

/// The metrics address the operator logged.
async fn metrics_address(op: &Operator) -> String {
    let start = Instant::now();
    loop {
        if let Some(addr) = op.log_text().split("metrics=").nth(1).and_then(|r| r.split_whitespace().next()) {
            return addr.trim_matches('"').to_string();
        }
        assert!(start.elapsed() < WAIT, "the operator never logged its metrics address:\n{}", op.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A scrape that shows every kind of series the alerts read: messages sent and failed, token
/// refreshes and failures, token expiry, the queue, the leader. Then `promtool check metrics`.
#[tokio::test]
async fn a_running_operators_metrics_pass_promtool_check_metrics() {
    let client = common::client().await;
    let ns = common::namespace(&client, "promcheck", &[]).await;
    let emu = Emulator::start("promcheck").await;
    emu.register_app(
        json!({"tenantId": TENANT, "clientId": CLIENT, "secrets": ["promcheck-secret"], "roles": ["Mail.Send"]}),
    )
    .await;
    let bundle = emu.dir.path().join("operator-ca-bundle.pem");
    concat_pems(&bundle, &[emu.ca_pem()]);
    let op =
        Operator::start("promcheck", &ns, &["--ca-bundle", &bundle.display().to_string(), "--allow-custom-endpoints"]);
    let metrics = metrics_address(&op).await;
    let url = emu.url.clone();
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: graph}}
stringData: {{client-secret: promcheck-secret, wrong: not-the-secret}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: graph}}
spec:
  senders: {{default: alerts@contoso.com}}
  graph: {{tenantId: {TENANT}, clientId: {CLIENT}, clientSecretRef: {{name: graph, key: client-secret}}, authorityHost: "{url}", endpoint: "{url}"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: refused}}
spec:
  senders: {{default: alerts@contoso.com}}
  graph: {{tenantId: {TENANT}, clientId: {CLIENT}, clientSecretRef: {{name: graph, key: wrong}}, authorityHost: "{url}", endpoint: "{url}"}}
"#
        ),
    )
    .await;
    let message = |name: &str| {
        format!(
            "apiVersion: mailroom.dev/v1alpha1\nkind: EmailMessage\nmetadata: {{name: {name}}}\nspec:\n  profileRef: {{name: graph}}\n  to: [ops@contoso.com]\n  subject: metrics\n  body: {{text: t}}\n"
        )
    };
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    // Graph refuses the first sendMail (a permanent 403), then accepts.
    emu.fault(json!({"target": "graph", "status": 403, "count": 1})).await;
    create_yaml(&client, &ns, &message("failed")).await;
    common::wait_for(&api, "failed", WAIT, |m| phase(m) == Some(Phase::Failed)).await;
    create_yaml(&client, &ns, &message("sent")).await;
    common::wait_for(&api, "sent", WAIT, |m| phase(m) == Some(Phase::Sent)).await;

    let http = common::http();
    let (graph, refused) = (format!("{ns}/graph"), format!("{ns}/refused"));
    let wanted = [
        format!(r#"mailroom_messages_total{{profile="{graph}",transport="graph",outcome="sent"}} 1"#),
        format!(r#"mailroom_messages_total{{profile="{graph}",transport="graph",outcome="failed"}} 1"#),
        format!(r#"mailroom_token_refreshes_total{{profile="{graph}"}} 1"#),
        format!(r#"mailroom_token_refresh_failures_total{{profile="{refused}"}}"#),
        format!(r#"mailroom_token_expiry_timestamp_seconds{{profile="{graph}"}}"#),
        "mailroom_queue_depth ".to_string(),
        "mailroom_leader 1".to_string(),
        "mailroom_delivery_latency_seconds_bucket".to_string(),
    ];
    // The gauges are written on the controller's beat: poll until a scrape shows them all.
    let start = Instant::now();
    let scrape = loop {
        let scrape = http.get(format!("http://{metrics}/metrics")).send().await.unwrap().text().await.unwrap();
        if wanted.iter().all(|w| scrape.contains(w.as_str())) {
            break scrape;
        }
        assert!(start.elapsed() < WAIT, "a scrape lacks some of {wanted:#?}:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let out = promtool_in(&repo_root(), &["check", "metrics"], Some(&scrape));
    assert!(out.status.success(), "promtool check metrics:\n{}\n--- the scrape:\n{scrape}", text(&out));

    // Without an Accept header (promtool's, curl's) the answer is the Prometheus text format; a
    // scraper asking for OpenMetrics, as Prometheus does, gets OpenMetrics with the same samples.
    let plain = http.get(format!("http://{metrics}/metrics")).send().await.unwrap();
    let content_type = plain.headers()["content-type"].to_str().unwrap().to_string();
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let prometheus_accept = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
    let om = http.get(format!("http://{metrics}/metrics")).header("accept", prometheus_accept).send().await.unwrap();
    let content_type = om.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/openmetrics-text; version=1.0.0"), "{content_type}");
    let om = om.text().await.unwrap();
    assert!(om.ends_with("# EOF\n") && om.contains("# TYPE mailroom_messages counter"), "{om}");
    assert!(scrape.contains("# TYPE mailroom_messages_total counter") && !scrape.contains("# EOF"), "{scrape}");
    for w in &wanted {
        assert!(om.contains(w.as_str()), "the OpenMetrics answer lacks {w}:\n{om}");
    }
    drop(op);
}
