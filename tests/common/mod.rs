//! Shared by the integration tests: the API server from `make test`, namespaces, the operator
//! process, and waiting on status.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

pub mod alertmanager;
pub mod api_proxy;
pub mod audited;
pub mod emulator;
pub mod flux;
pub mod receiver;
pub mod smtp_peer;

/// A plain HTTP client for the test peers' control APIs.
pub fn http() -> reqwest::Client {
    mailroom::tls::install_crypto_provider();
    reqwest::Client::new()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An environment variable that `make test` sets; integration tests never run without it.
pub fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: integration tests run through `make test`, which starts the local control plane")
    })
}

/// A client for the test API server.
pub async fn client() -> Client {
    mailroom::tls::install_crypto_provider();
    required_env("KUBECONFIG");
    Client::try_default().await.expect("a client for the test API server")
}

/// A fresh namespace named after the test, with the given labels.
pub async fn namespace(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> String {
    let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    name
}

/// Runs kubectl (from the control plane's cache, on PATH in `make test`) and returns its output.
pub fn kubectl(args: &[&str]) -> std::process::Output {
    Command::new("kubectl").args(args).output().expect("kubectl on PATH (make test puts it there)")
}

/// Polls `get` until `done` holds, failing after `timeout` with the last value seen.
pub async fn wait_for<K, F>(api: &Api<K>, name: &str, timeout: Duration, done: F) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    F: Fn(&K) -> bool,
{
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        if let Ok(Some(obj)) = api.get_opt(name).await {
            if done(&obj) {
                return obj;
            }
            last = Some(obj);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {timeout:?} waiting for {name}; last seen: {last:#?}");
}

/// The operator as a child process, its log in target/test-logs.
pub struct Operator {
    child: Child,
    /// Its combined output.
    pub log: PathBuf,
}

impl Operator {
    /// Starts `mailroom run` watching one namespace.
    pub fn start(test: &str, namespace: &str, extra: &[&str]) -> Operator {
        Operator::start_with_env(test, namespace, extra, &[])
    }

    /// Starts `mailroom run` with exactly these flags (besides loopback metrics and health
    /// addresses), logging to target/test-logs/{log_name}.log.
    pub fn start_with_args(log_name: &str, args: &[&str]) -> Operator {
        Operator::spawn(log_name, args, &[])
    }

    /// Starts the operator binary with `run`, loopback metrics and health addresses, and `args`.
    fn spawn(log_name: &str, args: &[&str], env: &[(&str, &str)]) -> Operator {
        let bin = std::env::var("MAILROOM_BIN")
            .unwrap_or_else(|_| repo_root().join("target/debug/mailroom").display().to_string());
        let dir = repo_root().join("target/test-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        let log = dir.join(format!("{log_name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(bin)
            .args(["run", "--metrics-addr", "127.0.0.1:0", "--health-addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info,mailroom=debug,kube=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the operator");
        Operator { child, log }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks it to stop (SIGTERM), as Kubernetes does before it deletes a pod.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }

    /// Waits for it to exit; None if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its exit status, if it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a file that another process writes atomically, waiting for it to appear.
pub fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.is_empty()
        {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} did not appear within {timeout:?}", path.display());
}

/// Creates every document of a YAML stream in `namespace` (cluster-scoped kinds ignore it).
pub async fn create_yaml(client: &Client, namespace: &str, yaml: &str) {
    use kube::api::{ApiResource, DynamicObject};
    use kube::discovery::Scope;
    for doc in yaml.split("\n---").filter(|d| d.contains("kind:")) {
        let obj: DynamicObject = serde_yaml::from_str(doc).unwrap_or_else(|e| panic!("bad test YAML: {e}\n{doc}"));
        let types = obj.types.clone().expect("apiVersion and kind");
        let gvk = kube::core::GroupVersionKind::try_from(&types).expect("gvk");
        let (ar, caps): (ApiResource, _) = kube::discovery::pinned_kind(client, &gvk).await.expect("kind served");
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &ar),
            Scope::Cluster => Api::all_with(client.clone(), &ar),
        };
        api.create(&PostParams::default(), &obj).await.unwrap_or_else(|e| panic!("create failed: {e}\n{doc}"));
    }
}

/// A MailProfile sending through the SMTP test server on `port` (plain, no authentication) as
/// alerts@contoso.com; `extra` is more of its spec, indented by two spaces.
pub fn relay_profile(name: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: {name}}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
{extra}"#
    )
}

/// The phase of a message, if it has one.
pub fn phase(m: &mailroom::api::EmailMessage) -> Option<mailroom::api::Phase> {
    m.phase()
}

/// A condition of a message.
pub fn message_condition(
    m: &mailroom::api::EmailMessage,
    type_: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    m.status.as_ref().and_then(|s| mailroom::api::find_condition(&s.conditions, type_).cloned())
}

/// The Events recorded for an object, as (reason, note).
pub async fn events_for(client: &Client, namespace: &str, name: &str) -> Vec<(String, String)> {
    use k8s_openapi::api::events::v1::Event;
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&Default::default()).await.expect("list events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// The Events recorded for an object once one of them, as (reason, note), satisfies `want`; all
/// of them, matching or not, after 30 s. The operator writes an Event after the status it
/// accompanies, so a test that has just seen the status may not see the Event yet.
pub async fn events_until(
    client: &Client,
    namespace: &str,
    name: &str,
    want: impl Fn(&str, &str) -> bool,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = events_for(client, namespace, name).await;
        if events.iter().any(|(r, n)| want(r, n)) || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (30 s at most) for an Event on the object that satisfies `want`; panics with the ones
/// there are otherwise.
pub async fn expect_event(client: &Client, namespace: &str, name: &str, want: impl Fn(&str, &str) -> bool) {
    let events = events_until(client, namespace, name, &want).await;
    assert!(events.iter().any(|(r, n)| want(r, n)), "no such Event on {namespace}/{name}; saw {events:?}");
}

impl Operator {
    /// Starts `mailroom run` watching one namespace, with extra environment variables (for
    /// example a KUBECONFIG with another identity).
    pub fn start_with_env(test: &str, namespace: &str, extra: &[&str], env: &[(&str, &str)]) -> Operator {
        let mut args = vec!["--namespace", namespace];
        args.extend_from_slice(extra);
        Operator::spawn(&format!("{test}-{namespace}"), &args, env)
    }
}

impl Operator {
    /// Starts `mailroom run` over all namespaces with exactly these flags and extra environment
    /// variables (for example a KUBECONFIG with another identity).
    pub fn start_all_with_env(log_name: &str, args: &[&str], env: &[(&str, &str)]) -> Operator {
        Operator::spawn(log_name, args, env)
    }
}
