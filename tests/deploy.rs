//! The install manifests: the kustomize base and the Helm chart are accepted by the real API server,
//! the RBAC they grant is enough for the operator and no more, and their CRDs are crds/.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, phase, repo_root, required_env};
use kube::Api;
use mailroom::api::{ClusterMailProfile, EmailMessage, MailProfile, Phase, find_condition};
use serde::Deserialize;
use serde_yaml::Value;

const WAIT: Duration = Duration::from_secs(60);
/// The namespace the manifests install into.
const SYSTEM_NS: &str = "mailroom-system";
/// The ServiceAccount they create there.
const SERVICE_ACCOUNT: &str = "mailroom";
/// The generated CRDs and the copies the manifests carry.
const CRDS: &str = "crds/mailroom.dev.yaml";
const CRD_COPIES: [&str; 2] =
    ["deploy/base/crds/mailroom.dev.yaml", "deploy/helm/mailroom/files/crds/mailroom.dev.yaml"];
const CHART: &str = "deploy/helm/mailroom";

// --- processes ------------------------------------------------------------------------------------

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

/// Runs kubectl (on PATH in `make test`) with `input` on stdin.
fn kubectl(args: &[&str], input: Option<&str>) -> Output {
    run(Command::new("kubectl").args(args), input)
}

/// Runs kubectl and returns its stdout, failing the test when it fails.
fn kubectl_ok(args: &[&str], input: Option<&str>) -> String {
    let out = kubectl(args, input);
    assert!(out.status.success(), "kubectl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}

/// The helm binary: `MAILROOM_HELM`, or the one hack/helm.sh builds once per machine.
fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        if let Ok(path) = std::env::var("MAILROOM_HELM") {
            return PathBuf::from(path);
        }
        // Its progress goes to stderr as it happens; only the path comes back on stdout.
        let out = Command::new("bash")
            .arg(repo_root().join("hack/helm.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run hack/helm.sh");
        assert!(out.status.success(), "hack/helm.sh could not build helm");
        let stdout = String::from_utf8(out.stdout).expect("UTF-8");
        PathBuf::from(stdout.lines().last().expect("hack/helm.sh prints the path").trim())
    })
}

/// `helm template` of the chart as release `mailroom` in mailroom-system, with extra flags.
fn helm_template(flags: &[&str]) -> Result<String, String> {
    let out = run(
        Command::new(helm())
            .current_dir(repo_root())
            .args(["template", "mailroom", CHART, "--namespace", SYSTEM_NS])
            .args(flags),
        None,
    );
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn render_chart(flags: &[&str]) -> String {
    helm_template(flags).unwrap_or_else(|e| panic!("helm template {flags:?} failed:\n{e}"))
}

/// `kubectl kustomize deploy/base`.
fn kustomize_base() -> String {
    kubectl_ok(&["kustomize", &repo_root().join("deploy/base").display().to_string()], None)
}

// --- YAML -----------------------------------------------------------------------------------------

/// The documents of a YAML stream, empty ones left out.
fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("bad YAML: {e}\n{yaml}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn to_stream(docs: &[&Value]) -> String {
    docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("YAML"))).collect()
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    at(v, path).as_str().unwrap_or("")
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| v.get(*k).unwrap_or(&Value::Null))
}

fn kind_name(doc: &Value) -> (String, String) {
    (str_at(doc, &["kind"]).to_string(), str_at(doc, &["metadata", "name"]).to_string())
}

fn kinds(docs: &[Value]) -> BTreeSet<(String, String)> {
    docs.iter().map(kind_name).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind_name(d) == (kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(docs)))
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items.iter().map(|(k, n)| (k.to_string(), n.to_string())).collect()
}

/// Every CRD the operator defines, as (kind, name), from the Rust types.
fn crd_names() -> Vec<(&'static str, &'static str)> {
    mailroom::api::crd::all()
        .into_iter()
        .map(|c| ("CustomResourceDefinition", &*String::leak(c.metadata.name.unwrap_or_default())))
        .collect()
}

// --- the API server ---------------------------------------------------------------------------------

/// Installs the base's Namespace (restricted Pod Security enforced), ServiceAccount and RBAC for
/// real, once per test process: namespaced objects can then be dry-run into mailroom-system, and
/// no dry run races with the real creation of the same object.
fn install_identity() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let base = docs(&kustomize_base());
        let identity: Vec<&Value> = base
            .iter()
            .filter(|d| {
                matches!(
                    str_at(d, &["kind"]),
                    "Namespace" | "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
                )
            })
            .collect();
        kubectl_ok(&["apply", "-f", "-"], Some(&to_stream(&identity)));
    });
}

/// Applies the documents with a server-side dry run: every one must be accepted.
fn server_dry_run(what: &str, docs: &[&Value]) {
    let out = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&to_stream(docs)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: the API server refused a manifest:\n{stderr}\n{stdout}");
    let accepted = stdout.lines().filter(|l| l.ends_with("(server dry run)")).count();
    assert_eq!(accepted, docs.len(), "{what}: not every manifest was applied:\n{stdout}\n{stderr}");
}

/// Dry-runs a Pod with the Deployment's Pod template into mailroom-system, where the restricted
/// Pod Security Standard is enforced: the API server refuses a Pod that does not meet it.
fn assert_pod_meets_restricted(what: &str, deployment: &Value) {
    let pod = |spec: &Value| {
        let mut pod = serde_yaml::Mapping::new();
        pod.insert("apiVersion".into(), "v1".into());
        pod.insert("kind".into(), "Pod".into());
        let mut meta = serde_yaml::Mapping::new();
        meta.insert("name".into(), "restricted-check".into());
        meta.insert("namespace".into(), SYSTEM_NS.into());
        pod.insert("metadata".into(), Value::Mapping(meta));
        pod.insert("spec".into(), spec.clone());
        serde_yaml::to_string(&Value::Mapping(pod)).expect("YAML")
    };
    let spec = at(deployment, &["spec", "template", "spec"]);
    let out = kubectl(&["create", "--dry-run=server", "-f", "-"], Some(&pod(spec)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: the operator's Pod is refused in {SYSTEM_NS}:\n{stderr}");
    assert!(!stderr.contains("PodSecurity"), "{what}: {stderr}");

    // The check itself works: without its security context the same Pod is refused.
    let mut loose = spec.clone();
    if let Some(m) = loose.as_mapping_mut() {
        m.remove("securityContext");
    }
    if let Some(c) = loose.get_mut("containers").and_then(|c| c.get_mut(0)).and_then(|c| c.as_mapping_mut()) {
        c.remove("securityContext");
    }
    let out = kubectl(&["create", "--dry-run=server", "-f", "-"], Some(&pod(&loose)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("violates PodSecurity"), "{what}: {stderr}");
}

/// What the base and the chart's defaults both promise about the operator's Deployment.
fn check_deployment(what: &str, d: &Value, service_account: &str) {
    let spec = at(d, &["spec", "template", "spec"]);
    assert_eq!(at(d, &["spec", "replicas"]).as_u64(), Some(1), "{what}");
    assert_eq!(str_at(spec, &["serviceAccountName"]), service_account, "{what}");
    let c = at(spec, &["containers"]).get(0).unwrap_or_else(|| panic!("{what}: no container"));
    assert_eq!(str_at(c, &["image"]), "ghcr.io/mailroom-dev/mailroom:0.1.0", "{what}");
    let args: Vec<&str> = at(c, &["args"]).as_sequence().expect("args").iter().filter_map(Value::as_str).collect();
    assert_eq!(args.first(), Some(&"run"), "{what}: {args:?}");
    assert!(args.contains(&"--leader-elect"), "{what}: {args:?}");
    let env = at(c, &["env"]).as_sequence().expect("env");
    let pod_name = env.iter().find(|e| str_at(e, &["name"]) == "POD_NAME").expect("POD_NAME");
    assert_eq!(str_at(pod_name, &["valueFrom", "fieldRef", "fieldPath"]), "metadata.name", "{what}");
    let ports: BTreeSet<(String, u64)> = at(c, &["ports"])
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| (str_at(p, &["name"]).to_string(), at(p, &["containerPort"]).as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(ports, BTreeSet::from([("metrics".to_string(), 8080), ("health".to_string(), 8081)]), "{what}");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(str_at(c, &[probe, "httpGet", "path"]), path, "{what}");
        assert_eq!(str_at(c, &[probe, "httpGet", "port"]), "health", "{what}");
    }
    assert_eq!(str_at(c, &["resources", "requests", "cpu"]), "50m", "{what}");
    assert_eq!(str_at(c, &["resources", "requests", "memory"]), "64Mi", "{what}");
    assert_eq!(str_at(c, &["resources", "limits", "memory"]), "256Mi", "{what}");
    let psc = at(spec, &["securityContext"]);
    assert_eq!(at(psc, &["runAsNonRoot"]).as_bool(), Some(true), "{what}");
    assert_eq!(at(psc, &["runAsUser"]).as_u64(), Some(65532), "{what}");
    assert_eq!(str_at(psc, &["seccompProfile", "type"]), "RuntimeDefault", "{what}");
    let sc = at(c, &["securityContext"]);
    assert_eq!(at(sc, &["readOnlyRootFilesystem"]).as_bool(), Some(true), "{what}");
    assert_eq!(at(sc, &["allowPrivilegeEscalation"]).as_bool(), Some(false), "{what}");
    assert_eq!(at(sc, &["capabilities", "drop"]), &Value::from(vec!["ALL"]), "{what}");
}

/// The metrics Service selects the operator's Pods and exposes the metrics port.
fn check_metrics_service(what: &str, service: &Value, deployment: &Value) {
    let selector = at(service, &["spec", "selector"]).as_mapping().expect("selector");
    let pod_labels = at(deployment, &["spec", "template", "metadata", "labels"]).as_mapping().expect("labels");
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "{what}: the Service selects {k:?}={v:?}, the Pods lack it");
    }
    let port = at(service, &["spec", "ports"]).get(0).expect("a port");
    assert_eq!((str_at(port, &["name"]), str_at(port, &["targetPort"])), ("metrics", "metrics"), "{what}");
    assert_eq!(at(port, &["port"]).as_u64(), Some(8080), "{what}");
}

// --- tests ------------------------------------------------------------------------------------------

#[test]
fn crd_copies_equal_the_generated_crds() {
    let root = repo_root();
    let generated = std::fs::read_to_string(root.join(CRDS)).expect("crds/mailroom.dev.yaml");
    for copy in CRD_COPIES {
        let text = std::fs::read_to_string(root.join(copy)).unwrap_or_else(|e| panic!("{copy}: {e}"));
        assert!(text == generated, "{copy} differs from {CRDS}: copy it again (`make crds` does)");
    }
}

#[test]
fn kustomize_base_is_accepted_by_the_api_server() {
    required_env("KUBECONFIG");
    install_identity();
    let base = docs(&kustomize_base());
    let mut want = set(&[
        ("Namespace", SYSTEM_NS),
        ("ServiceAccount", SERVICE_ACCOUNT),
        ("ClusterRole", "mailroom"),
        ("ClusterRoleBinding", "mailroom"),
        ("Role", "mailroom-leader-election"),
        ("RoleBinding", "mailroom-leader-election"),
        ("ClusterRole", "mailroom-edit"),
        ("ClusterRole", "mailroom-view"),
        ("Deployment", "mailroom"),
        ("Service", "mailroom-metrics"),
    ]);
    want.extend(set(&crd_names()));
    assert_eq!(kinds(&base), want);
    for doc in &base {
        let kind = str_at(doc, &["kind"]);
        let namespaced =
            !matches!(kind, "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding");
        if namespaced {
            assert_eq!(str_at(doc, &["metadata", "namespace"]), SYSTEM_NS, "{:?}", kind_name(doc));
        }
    }
    server_dry_run("deploy/base", &base.iter().collect::<Vec<_>>());

    let deployment = find(&base, "Deployment", "mailroom");
    check_deployment("deploy/base", deployment, SERVICE_ACCOUNT);
    check_metrics_service("deploy/base", find(&base, "Service", "mailroom-metrics"), deployment);
    assert_pod_meets_restricted("deploy/base", deployment);
    let binding = find(&base, "ClusterRoleBinding", "mailroom");
    let subject = at(binding, &["subjects"]).get(0).expect("a subject");
    assert_eq!(
        (str_at(subject, &["kind"]), str_at(subject, &["name"]), str_at(subject, &["namespace"])),
        ("ServiceAccount", SERVICE_ACCOUNT, SYSTEM_NS)
    );
}

#[test]
fn helm_chart_renders_what_the_api_server_accepts() {
    required_env("KUBECONFIG");
    install_identity();
    let lint = run(Command::new(helm()).current_dir(repo_root()).args(["lint", "--strict", CHART]), None);
    assert!(
        lint.status.success(),
        "helm lint:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // Default values: the same operator as the base, the CRDs included.
    let defaults = docs(&render_chart(&[]));
    let mut want = set(&[
        ("ServiceAccount", "mailroom"),
        ("ClusterRole", "mailroom"),
        ("ClusterRoleBinding", "mailroom"),
        ("Role", "mailroom-leader-election"),
        ("RoleBinding", "mailroom-leader-election"),
        ("ClusterRole", "mailroom-edit"),
        ("ClusterRole", "mailroom-view"),
        ("Deployment", "mailroom"),
        ("Service", "mailroom-metrics"),
    ]);
    want.extend(set(&crd_names()));
    assert_eq!(kinds(&defaults), want);
    server_dry_run("chart defaults", &defaults.iter().collect::<Vec<_>>());
    let deployment = find(&defaults, "Deployment", "mailroom");
    check_deployment("chart defaults", deployment, "mailroom");
    check_metrics_service("chart defaults", find(&defaults, "Service", "mailroom-metrics"), deployment);
    assert_pod_meets_restricted("chart defaults", deployment);

    // The rules are the base's, so the RBAC test below covers the chart too.
    let base = docs(&kustomize_base());
    for (kind, name) in
        [("ClusterRole", "mailroom"), ("Role", "mailroom-leader-election"), ("ClusterRole", "mailroom-edit")]
    {
        assert_eq!(
            at(find(&defaults, kind, name), &["rules"]),
            at(find(&base, kind, name), &["rules"]),
            "{kind} {name}: the chart and the base grant different rules"
        );
    }

    // The rendered CRDs are crds/ plus the chart's labels and the keep policy.
    let generated = docs(&std::fs::read_to_string(repo_root().join(CRDS)).expect("crds"));
    for crd in &generated {
        let (_, name) = kind_name(crd);
        let mut rendered = find(&defaults, "CustomResourceDefinition", &name).clone();
        assert_eq!(
            str_at(&rendered, &["metadata", "annotations", "helm.sh/resource-policy"]),
            "keep",
            "{name}: uninstalling the chart must not delete every EmailMessage"
        );
        let meta = rendered.get_mut("metadata").and_then(Value::as_mapping_mut).expect("metadata");
        meta.remove("labels");
        meta.remove("annotations");
        assert!(&rendered == crd, "{name}: the chart renders a CRD that differs from {CRDS}");
    }

    // The ServiceMonitor, when asked for (its CRD is not installed here, so it is not dry-run).
    let monitored = docs(&render_chart(&["--set", "metrics.serviceMonitor.enabled=true"]));
    let monitor = find(&monitored, "ServiceMonitor", "mailroom");
    assert_eq!(str_at(monitor, &["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(str_at(at(monitor, &["spec", "endpoints"]).get(0).expect("endpoint"), &["port"]), "metrics");
    let service = find(&monitored, "Service", "mailroom-metrics");
    for (k, v) in at(monitor, &["spec", "selector", "matchLabels"]).as_mapping().expect("matchLabels") {
        assert_eq!(at(service, &["metadata", "labels"]).get(k), Some(v), "the ServiceMonitor misses the Service");
    }
    let without_monitor: Vec<&Value> = monitored.iter().filter(|d| str_at(d, &["kind"]) != "ServiceMonitor").collect();
    assert_eq!(without_monitor.len(), defaults.len());
    server_dry_run("chart with a ServiceMonitor", &without_monitor);

    // One namespace watched, and extra CA roots given inline.
    let pem = admin_ca_pem();
    let pem_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(pem_file.path(), &pem).expect("write PEM");
    let pem_arg = format!("caBundle.pem={}", pem_file.path().display());
    let scoped = docs(&render_chart(&["--set", "watchNamespace=team-a", "--set-file", &pem_arg]));
    server_dry_run("chart with watchNamespace and caBundle.pem", &scoped.iter().collect::<Vec<_>>());
    let d = find(&scoped, "Deployment", "mailroom");
    let args = container_args(d);
    assert!(args.contains(&"--namespace=team-a".to_string()), "{args:?}");
    assert!(args.contains(&"--ca-bundle=/etc/mailroom/ca/ca-bundle.pem".to_string()), "{args:?}");
    assert_ca_volume(d, "mailroom-ca-bundle", "ca.crt");
    let cm = find(&scoped, "ConfigMap", "mailroom-ca-bundle");
    assert_eq!(str_at(cm, &["data", "ca.crt"]).trim(), pem.trim());
    assert_pod_meets_restricted("chart with watchNamespace and caBundle.pem", d);
    let install = run(
        Command::new(helm()).current_dir(repo_root()).args([
            "install",
            "mailroom",
            CHART,
            "--namespace",
            SYSTEM_NS,
            "--dry-run=client",
            "--set",
            "watchNamespace=team-a",
        ]),
        None,
    );
    let notes = String::from_utf8_lossy(&install.stdout);
    assert!(install.status.success(), "{}", String::from_utf8_lossy(&install.stderr));
    assert!(notes.contains("in namespace team-a only") && notes.contains("a Role in team-a"), "NOTES: {notes}");

    // Extra CA roots from an existing ConfigMap; no CRDs.
    let existing = docs(&render_chart(&[
        "--set",
        "caBundle.configMap.name=corporate-roots",
        "--set",
        "caBundle.configMap.key=roots.pem",
        "--set",
        "installCRDs=false",
    ]));
    server_dry_run("chart with caBundle.configMap", &existing.iter().collect::<Vec<_>>());
    assert!(!existing.iter().any(|d| str_at(d, &["kind"]) == "CustomResourceDefinition"));
    assert!(!existing.iter().any(|d| str_at(d, &["kind"]) == "ConfigMap"));
    assert_ca_volume(find(&existing, "Deployment", "mailroom"), "corporate-roots", "roots.pem");

    // Two operators without a Lease would both send: the chart refuses to render that.
    let refused = helm_template(&["--set", "replicas=2", "--set", "leaderElection.enabled=false"]);
    assert!(refused.as_ref().is_err_and(|e| e.contains("leaderElection")), "{refused:?}");
    let standby = docs(&render_chart(&["--set", "replicas=2"]));
    assert_eq!(at(find(&standby, "Deployment", "mailroom"), &["spec", "replicas"]).as_u64(), Some(2));
}

/// The alerts Service selects the operator's Pods, and its target port is the one `--alerts-addr`
/// listens on; the receiver serves HTTPS with the Secret `tls_secret`, or plain HTTP (said with
/// `--alerts-insecure-http`) when it is `None`, and `--alerts-url` is the Service's URL in that
/// scheme.
fn check_alerts_service(what: &str, docs: &[Value], service_name: &str, tls_secret: Option<&str>) {
    let deployment = find(docs, "Deployment", "mailroom");
    let service = find(docs, "Service", service_name);
    let selector = at(service, &["spec", "selector"]).as_mapping().expect("selector");
    let pod_labels = at(deployment, &["spec", "template", "metadata", "labels"]).as_mapping().expect("labels");
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "{what}: the alerts Service selects {k:?}={v:?}, the Pods lack it");
    }
    let port = at(service, &["spec", "ports"]).get(0).expect("a port");
    assert_eq!(str_at(port, &["targetPort"]), "alerts", "{what}");
    let container = at(deployment, &["spec", "template", "spec", "containers"]).get(0).expect("container");
    let container_port = at(container, &["ports"])
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| str_at(p, &["name"]) == "alerts")
        .unwrap_or_else(|| panic!("{what}: no container port named alerts"));
    let args = container_args(deployment);
    let flag = |name: &str| args.iter().find_map(|a| a.strip_prefix(name).map(str::to_string));
    let listen =
        flag("--alerts-addr=").unwrap_or_else(|| panic!("{what}: the operator is not started with --alerts-addr"));
    let listen_port: u64 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in --alerts-addr");
    assert_eq!(at(container_port, &["containerPort"]).as_u64(), Some(listen_port), "{what}");
    assert_eq!(at(port, &["port"]).as_u64(), Some(listen_port), "{what}");
    // TLS is on with a Secret, or off only by name.
    assert_eq!(flag("--alerts-tls-secret=").as_deref(), tls_secret, "{what}: {args:?}");
    let insecure = args.iter().any(|a| a == "--alerts-insecure-http");
    assert_eq!(insecure, tls_secret.is_none(), "{what}: {args:?}");
    // The URL the routes' status shows is the Service's, in the scheme served.
    let namespace = str_at(service, &["metadata", "namespace"]);
    let scheme = if tls_secret.is_some() { "https" } else { "http" };
    assert_eq!(
        flag("--alerts-url="),
        Some(format!("{scheme}://{service_name}.{namespace}.svc:{listen_port}")),
        "{what}"
    );
}

/// A cert-manager Certificate for the receiver: it writes the Secret the receiver serves, in the
/// operator's namespace, for the host name of `--alerts-url`, as a server certificate.
fn check_alerts_certificate(what: &str, certificate: &Value, deployment: &Value) {
    assert_eq!(str_at(certificate, &["apiVersion"]), "cert-manager.io/v1", "{what}");
    assert_eq!(str_at(certificate, &["kind"]), "Certificate", "{what}");
    let args = container_args(deployment);
    let flag = |name: &str| args.iter().find_map(|a| a.strip_prefix(name).map(str::to_string));
    let secret = flag("--alerts-tls-secret=").unwrap_or_else(|| panic!("{what}: no --alerts-tls-secret"));
    assert_eq!(str_at(certificate, &["spec", "secretName"]), secret, "{what}");
    assert_eq!(
        str_at(certificate, &["metadata", "namespace"]),
        str_at(deployment, &["metadata", "namespace"]),
        "{what}: the Secret must be in the operator's namespace (--alerts-tls-secret names no other)"
    );
    let url = flag("--alerts-url=").unwrap_or_else(|| panic!("{what}: no --alerts-url"));
    let host = url.strip_prefix("https://").and_then(|rest| rest.split(':').next()).expect("an https URL");
    let names: Vec<&str> = at(certificate, &["spec", "dnsNames"])
        .as_sequence()
        .expect("dnsNames")
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(names.contains(&host), "{what}: the certificate does not name {host}: {names:?}");
    let usages = at(certificate, &["spec", "usages"]).as_sequence().expect("usages");
    assert!(usages.iter().any(|u| u.as_str() == Some("server auth")), "{what}: {usages:?}");
    assert!(!str_at(certificate, &["spec", "issuerRef", "name"]).is_empty(), "{what}: no issuer");
}

#[test]
fn alerts_receiver_is_exposed_by_the_overlay_and_the_chart() {
    required_env("KUBECONFIG");
    install_identity();
    let base = docs(&kustomize_base());
    assert!(!container_args(find(&base, "Deployment", "mailroom")).iter().any(|a| a.starts_with("--alerts-addr")));
    let overlay =
        docs(&kubectl_ok(&["kustomize", &repo_root().join("deploy/overlays/alerts").display().to_string()], None));
    let mut want = kinds(&base);
    want.insert(("Service".into(), "mailroom-alerts".into()));
    assert_eq!(kinds(&overlay), want);
    check_alerts_service("deploy/overlays/alerts", &overlay, "mailroom-alerts", Some("mailroom-alerts-tls"));
    server_dry_run("deploy/overlays/alerts", &overlay.iter().collect::<Vec<_>>());
    assert_pod_meets_restricted("deploy/overlays/alerts", find(&overlay, "Deployment", "mailroom"));
    // The example Certificate beside the component fits the overlay's receiver.
    let example = std::fs::read_to_string(repo_root().join("deploy/components/alerts/certificate.yaml"))
        .expect("deploy/components/alerts/certificate.yaml");
    let example = docs(&example);
    assert_eq!(example.len(), 1);
    check_alerts_certificate("certificate.yaml", &example[0], find(&overlay, "Deployment", "mailroom"));

    let defaults = docs(&render_chart(&[]));
    assert!(!kinds(&defaults).contains(&("Service".into(), "mailroom-alerts".into())));
    let chart = docs(&render_chart(&["--set", "alerts.enabled=true", "--set", "alerts.port=9095"]));
    check_alerts_service("chart with alerts.enabled", &chart, "mailroom-alerts", Some("mailroom-alerts-tls"));
    assert!(!chart.iter().any(|d| str_at(d, &["kind"]) == "Certificate"), "no Certificate unless asked for");
    server_dry_run("chart with alerts.enabled", &chart.iter().collect::<Vec<_>>());

    // The chart's own Certificate, and a Secret of another name.
    let flags = [
        "--set",
        "alerts.enabled=true",
        "--set",
        "alerts.tls.secretName=receiver-cert",
        "--set",
        "alerts.tls.certManager.enabled=true",
        "--set",
        "alerts.tls.certManager.issuerRef.name=internal-ca",
    ];
    let chart = docs(&render_chart(&flags));
    check_alerts_service("chart with alerts.tls.certManager", &chart, "mailroom-alerts", Some("receiver-cert"));
    let deployment = find(&chart, "Deployment", "mailroom");
    let certificate = find(&chart, "Certificate", "mailroom-alerts");
    check_alerts_certificate("chart with alerts.tls.certManager", certificate, deployment);
    assert_eq!(str_at(certificate, &["spec", "issuerRef", "name"]), "internal-ca");
    // The test API server has no cert-manager CRDs: the rest is dry-run.
    let rest: Vec<&Value> = chart.iter().filter(|d| str_at(d, &["kind"]) != "Certificate").collect();
    server_dry_run("chart with alerts.tls.certManager", &rest);
    let refused = helm_template(&["--set", "alerts.enabled=true", "--set", "alerts.tls.certManager.enabled=true"]);
    assert!(refused.as_ref().is_err_and(|e| e.contains("issuerRef.name is required")), "{refused:?}");

    // The explicit opt-out: plain HTTP, said as such.
    let chart = docs(&render_chart(&["--set", "alerts.enabled=true", "--set", "alerts.tls.enabled=false"]));
    check_alerts_service("chart with alerts.tls.enabled=false", &chart, "mailroom-alerts", None);
    server_dry_run("chart with alerts.tls.enabled=false", &chart.iter().collect::<Vec<_>>());
}

fn container_args(d: &Value) -> Vec<String> {
    at(d, &["spec", "template", "spec", "containers"])
        .get(0)
        .and_then(|c| c.get("args"))
        .and_then(Value::as_sequence)
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

fn assert_ca_volume(d: &Value, config_map: &str, key: &str) {
    let spec = at(d, &["spec", "template", "spec"]);
    let volume = at(spec, &["volumes"])
        .as_sequence()
        .and_then(|v| v.iter().find(|v| str_at(v, &["name"]) == "ca-bundle"))
        .expect("a ca-bundle volume");
    assert_eq!(str_at(volume, &["configMap", "name"]), config_map);
    let item = at(volume, &["configMap", "items"]).get(0).expect("an item");
    assert_eq!((str_at(item, &["key"]), str_at(item, &["path"])), (key, "ca-bundle.pem"));
    let mount = at(spec, &["containers"])
        .get(0)
        .and_then(|c| c.get("volumeMounts"))
        .and_then(Value::as_sequence)
        .and_then(|m| m.iter().find(|m| str_at(m, &["name"]) == "ca-bundle"))
        .expect("a ca-bundle mount");
    assert_eq!(str_at(mount, &["mountPath"]), "/etc/mailroom/ca");
    assert_eq!(at(mount, &["readOnly"]).as_bool(), Some(true));
}

// --- RBAC -------------------------------------------------------------------------------------------

/// The admin kubeconfig's server URL and CA (base64 PEM).
fn admin_cluster() -> (String, String) {
    let text = std::fs::read_to_string(required_env("KUBECONFIG")).expect("read KUBECONFIG");
    let config: Value = serde_yaml::from_str(&text).expect("KUBECONFIG is YAML");
    let cluster = at(&config, &["clusters"]).get(0).map(|c| at(c, &["cluster"])).expect("a cluster");
    (str_at(cluster, &["server"]).to_string(), str_at(cluster, &["certificate-authority-data"]).to_string())
}

fn admin_ca_pem() -> String {
    let (_, ca) = admin_cluster();
    let pem = base64::engine::general_purpose::STANDARD.decode(ca).expect("certificate-authority-data is base64");
    String::from_utf8(pem).expect("PEM")
}

/// A kubeconfig that authenticates as the ServiceAccount with a token the API server issues.
fn service_account_kubeconfig(dir: &Path) -> PathBuf {
    let token = kubectl_ok(&["create", "token", SERVICE_ACCOUNT, "-n", SYSTEM_NS, "--duration=1h"], None);
    let (server, ca) = admin_cluster();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token.trim()}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": SERVICE_ACCOUNT}}],
        "current-context": "operator",
    });
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).expect("YAML")).expect("write kubeconfig");
    path
}

/// Asks the API server whether the kubeconfig's identity may do something.
fn can_i(kubeconfig: &Path, args: &[&str]) -> bool {
    let kc = format!("--kubeconfig={}", kubeconfig.display());
    let out = kubectl(&[&kc, "auth", "can-i"].iter().chain(args).copied().collect::<Vec<_>>(), None);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {args:?}: {other}\n{}", String::from_utf8_lossy(&out.stderr)),
    }
}

async fn poll<F, Fut>(what: &str, timeout: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn ready(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    find_condition(conditions, "Ready").is_some_and(|c| c.status == "True")
}

#[tokio::test]
async fn rbac_is_enough_for_the_operator_and_no_more() {
    let client = common::client().await;
    // The base's ServiceAccount and RBAC, installed for real.
    install_identity();
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = service_account_kubeconfig(dir.path());
    let kc = format!("--kubeconfig={}", kubeconfig.display());
    let whoami = kubectl_ok(&[&kc, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"], None);
    assert_eq!(whoami.trim(), format!("system:serviceaccount:{SYSTEM_NS}:{SERVICE_ACCOUNT}"));

    let ns = common::namespace(&client, "deploy-rbac", &[("mailroom-deploy-test", "allowed")]).await;
    let n = ns.as_str();
    for (args, want) in [
        (vec!["list", "emailmessages.mailroom.dev", "--all-namespaces"], true),
        (vec!["watch", "emailmessages.mailroom.dev", "--all-namespaces"], true),
        (vec!["patch", "emailmessages.mailroom.dev", "--subresource=status", "-n", n], true),
        (vec!["delete", "emailmessages.mailroom.dev", "-n", n], true),
        (vec!["watch", "clustermailprofiles.mailroom.dev"], true),
        (vec!["patch", "mailprofiles.mailroom.dev", "--subresource=status", "-n", n], true),
        (vec!["get", "secrets", "-n", n], true),
        (vec!["watch", "secrets", "--all-namespaces"], true),
        (vec!["get", "configmaps", "-n", n], true),
        (vec!["get", "namespaces"], true),
        (vec!["list", "namespaces"], true),
        (vec!["watch", "namespaces"], true),
        (vec!["create", "events.events.k8s.io", "-n", n], true),
        (vec!["create", "sendrecords.mailroom.dev", "-n", n], true),
        (vec!["update", "sendrecords.mailroom.dev", "-n", n], true),
        (vec!["delete", "sendrecords.mailroom.dev", "-n", n], true),
        (vec!["list", "sendrecords.mailroom.dev", "--all-namespaces"], true),
        (vec!["patch", "sendrecords.mailroom.dev", "-n", n], false),
        (vec!["watch", "sendrecords.mailroom.dev", "--all-namespaces"], false),
        (vec!["update", "leases.coordination.k8s.io", "-n", SYSTEM_NS], true),
        // Credentials are read, never written.
        (vec!["create", "secrets", "-n", n], false),
        (vec!["update", "secrets", "-n", n], false),
        (vec!["patch", "secrets", "-n", n], false),
        (vec!["delete", "secrets", "-n", n], false),
        (vec!["create", "pods", "-n", n], false),
        (vec!["create", "pods", "-n", SYSTEM_NS], false),
        (vec!["create", "emailmessages.mailroom.dev", "-n", n], true),
        (vec!["get", "alertroutes.mailroom.dev", "-n", n], true),
        (vec!["list", "alertroutes.mailroom.dev", "--all-namespaces"], true),
        (vec!["patch", "alertroutes.mailroom.dev", "--subresource=status", "-n", n], true),
        (vec!["patch", "alertroutes.mailroom.dev", "-n", n], false),
        (vec!["get", "emailtemplates.mailroom.dev", "-n", n], true),
        (vec!["list", "emailtemplates.mailroom.dev", "-n", n], false),
        (vec!["update", "emailtemplates.mailroom.dev", "-n", n], false),
        (vec!["update", "emailmessages.mailroom.dev", "-n", n], false),
        (vec!["patch", "mailprofiles.mailroom.dev", "-n", n], false),
        (vec!["list", "configmaps", "-n", n], false),
        (vec!["create", "namespaces"], false),
        (vec!["patch", "namespaces"], false),
        (vec!["update", "leases.coordination.k8s.io", "-n", n], false),
        (vec!["create", "customresourcedefinitions.apiextensions.k8s.io"], false),
    ] {
        assert_eq!(can_i(&kubeconfig, &args), want, "can-i {args:?}");
    }

    // The operator, as the ServiceAccount, does everything a delivery needs.
    let peer = SmtpPeer::start(&[]);
    let kubeconfig_env = kubeconfig.display().to_string();
    let op = Operator::start_with_env("deploy-rbac", n, &[], &[("KUBECONFIG", &kubeconfig_env)]);
    let cluster_profile = format!("cmp-{n}");
    create_yaml(
        &client,
        n,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: report}}
stringData: {{report.csv: "a,b\n1,2\n"}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: notes}}
data: {{notes.txt: "release notes"}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: alerts@contoso.com}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
---
apiVersion: mailroom.dev/v1alpha1
kind: ClusterMailProfile
metadata: {{name: {cluster_profile}}}
spec:
  allowedNamespaces: {{matchLabels: {{mailroom-deploy-test: allowed}}}}
  senders: {{default: noreply@contoso.com}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: attachments}}
spec:
  profileRef: {{name: relay}}
  to: [ops@contoso.com]
  subject: from a Secret and a ConfigMap
  body: {{text: attached}}
  attachments:
  - {{name: report.csv, secretRef: {{name: report, key: report.csv}}}}
  - {{name: notes.txt, configMapRef: {{name: notes, key: notes.txt}}}}
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: shared-profile}}
spec:
  profileRef: {{kind: ClusterMailProfile, name: {cluster_profile}}}
  to: [ops@contoso.com]
  subject: through a ClusterMailProfile
  body: {{text: shared}}
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: short-lived}}
spec:
  profileRef: {{name: relay}}
  to: [ops@contoso.com]
  subject: deleted once sent
  body: {{text: gone}}
  ttlSecondsAfterFinished: 0
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailTemplate
metadata: {{name: greeting}}
spec:
  subject: "hello {{{{ who }}}}"
  text: "rendered for {{{{ who }}}}"
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: templated}}
spec:
  profileRef: {{name: relay}}
  to: [ops@contoso.com]
  templateRef: {{name: greeting}}
  values: {{who: ops}}
"#,
            port = peer.smtp_port
        ),
    )
    .await;

    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), n);
    for name in ["attachments", "shared-profile", "templated"] {
        let m =
            common::wait_for(&messages, name, WAIT, |m| matches!(phase(m), Some(Phase::Sent | Phase::Failed))).await;
        assert_eq!(phase(&m), Some(Phase::Sent), "{name}: {:?}\noperator log:\n{}", m.status, op.log_text());
    }
    // Status written on both kinds of profile.
    let profiles: Api<MailProfile> = Api::namespaced(client.clone(), n);
    common::wait_for(&profiles, "relay", WAIT, |p| p.status.as_ref().is_some_and(|s| ready(&s.conditions))).await;
    let cluster_profiles: Api<ClusterMailProfile> = Api::all(client.clone());
    common::wait_for(&cluster_profiles, &cluster_profile, WAIT, |p| {
        p.status.as_ref().is_some_and(|s| ready(&s.conditions))
    })
    .await;
    // Deleted after ttlSecondsAfterFinished, once it was delivered.
    poll("short-lived to be delivered and deleted", WAIT, || {
        let messages = messages.clone();
        async move { matches!(messages.get_opt("short-lived").await, Ok(None)) }
    })
    .await;
    assert_eq!(peer.wait_messages(4, WAIT).await.len(), 4);
    // Events published.
    poll("a Sent Event on attachments", WAIT, || {
        let client = client.clone();
        async move { common::events_for(&client, n, "attachments").await.iter().any(|(reason, _)| reason == "Sent") }
    })
    .await;

    let log = op.log_text();
    assert!(!log.to_lowercase().contains("forbidden"), "the operator was denied something:\n{log}");
    let _ = cluster_profiles.delete(&cluster_profile, &Default::default()).await;
}

/// The SMTP Service selects the operator's Pods and sends 587 and 465 to the container ports that
/// `--smtp-addr` and `--smtps-addr` listen on; the listener has its certificate Secret named and
/// the ClusterRole lets it read SmtpCredentials and store Secrets.
fn check_smtp(what: &str, docs: &[Value], service_name: &str) {
    let deployment = find(docs, "Deployment", "mailroom");
    let service = find(docs, "Service", service_name);
    let selector = at(service, &["spec", "selector"]).as_mapping().expect("selector");
    let pod_labels = at(deployment, &["spec", "template", "metadata", "labels"]).as_mapping().expect("labels");
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "{what}: the SMTP Service selects {k:?}={v:?}, the Pods lack it");
    }
    let container = at(deployment, &["spec", "template", "spec", "containers"]).get(0).expect("container");
    let args = container_args(deployment);
    for (service_port, target, flag) in [(587, "smtp", "--smtp-addr="), (465, "smtps", "--smtps-addr=")] {
        let port = at(service, &["spec", "ports"])
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| at(p, &["port"]).as_u64() == Some(service_port))
            .unwrap_or_else(|| panic!("{what}: the Service has no port {service_port}"));
        assert_eq!(str_at(port, &["targetPort"]), target, "{what}");
        let container_port = at(container, &["ports"])
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| str_at(p, &["name"]) == target)
            .unwrap_or_else(|| panic!("{what}: no container port named {target}"));
        let listen = args
            .iter()
            .find_map(|a| a.strip_prefix(flag).map(str::to_string))
            .unwrap_or_else(|| panic!("{what}: the operator is not started with {flag}"));
        let listen_port: u64 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
        assert!(listen_port >= 1024, "{what}: a restricted Pod cannot bind {listen_port}");
        assert_eq!(at(container_port, &["containerPort"]).as_u64(), Some(listen_port), "{what}");
    }
    assert!(args.iter().any(|a| a == "--smtp-tls-secret=mailroom-smtp-tls"), "{what}: {args:?}");
    let rules: Vec<Value> = docs
        .iter()
        .filter(|d| {
            str_at(d, &["kind"]) == "ClusterRole"
                && !str_at(d, &["metadata", "name"]).ends_with("-edit")
                && !str_at(d, &["metadata", "name"]).ends_with("-view")
        })
        .flat_map(|d| at(d, &["rules"]).as_sequence().cloned().unwrap_or_default())
        .collect();
    let allows = |resource: &str, verb: &str| {
        rules.iter().any(|r| {
            let has =
                |k: &str, v: &str| at(r, &[k]).as_sequence().is_some_and(|s| s.iter().any(|x| x.as_str() == Some(v)));
            has("resources", resource) && has("verbs", verb)
        })
    };
    for (resource, verb) in
        [("smtpcredentials", "list"), ("secrets", "create"), ("secrets", "patch"), ("emailmessages", "create")]
    {
        assert!(allows(resource, verb), "{what}: the operator may not {verb} {resource}");
    }
}

#[test]
fn smtp_listener_is_exposed_by_the_overlay_and_the_chart_and_absent_by_default() {
    required_env("KUBECONFIG");
    install_identity();
    let base = docs(&kustomize_base());
    assert!(!container_args(find(&base, "Deployment", "mailroom")).iter().any(|a| a.starts_with("--smtp")));
    let overlay = docs(&kubectl_ok(
        &["kustomize", &repo_root().join("deploy/overlays/smtp-submission").display().to_string()],
        None,
    ));
    check_smtp("deploy/overlays/smtp-submission", &overlay, "mailroom-smtp");
    server_dry_run("deploy/overlays/smtp-submission", &overlay.iter().collect::<Vec<_>>());
    assert_pod_meets_restricted("deploy/overlays/smtp-submission", find(&overlay, "Deployment", "mailroom"));

    let defaults = docs(&render_chart(&[]));
    assert!(!kinds(&defaults).contains(&("Service".into(), "mailroom-smtp".into())));
    let chart = docs(&render_chart(&["--set", "smtp.enabled=true"]));
    check_smtp("chart with smtp.enabled", &chart, "mailroom-smtp");
    server_dry_run("chart with smtp.enabled", &chart.iter().collect::<Vec<_>>());
}
