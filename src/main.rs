//! The mailroom command line: `run` (the operator), `send` and `profile check` (for people and
//! pipelines; see `mailroom::cli`), `crd` (print the CRDs), `completion` and `man`, `version`.
//! Installed as `kubectl-mailroom`, the same binary is the kubectl plugin `kubectl mailroom`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::sync::Arc;

use mailroom::cli::docs::{self, CompletionShell};
use mailroom::cli::plugin::Invocation;
use mailroom::controller::{self, OperatorConfig};
use mailroom::leader::{self, Election, ElectionConfig};
use mailroom::metrics::Metrics;
use mailroom::server::{self, Health};
use mailroom::tls::{self, TrustRoots};
use tokio::sync::watch;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (`opt.*` in jemalloc(3)): a background thread returns freed pages to the
/// system after about a second, straight away rather than through the lazy `MADV_FREE` state, so
/// an operator that freed what it held (deleted profiles, finished messages) also gives the
/// memory back while it is idle. Without it jemalloc purges only when it is called, and 1,000
/// deleted profiles left about 55 MiB resident above the baseline instead of about 22 MiB.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf = MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// jemalloc's `const char *malloc_conf`: a thin pointer to a static C string.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to a string literal, never written.
unsafe impl Sync for MallocConf {}

/// jemalloc's `stats.allocated` and `stats.resident`, refreshed by advancing its epoch.
fn jemalloc_heap() -> Option<(u64, u64)> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()?;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()?;
    Some((allocated as u64, resident as u64))
}

/// With the `heap-profile` feature, each SIGUSR2 asks jemalloc for a heap profile (`prof.dump`).
#[cfg(feature = "heap-profile")]
fn heap_profile_on_sigusr2() {
    tokio::spawn(async {
        let Ok(mut signals) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) else {
            return;
        };
        while signals.recv().await.is_some() {
            // SAFETY: prof.dump takes a `const char *` file name; null means jemalloc's own name.
            let result = unsafe { tikv_jemalloc_ctl::raw::write(b"prof.dump\0", std::ptr::null::<std::ffi::c_char>()) };
            info!(ok = result.is_ok(), "heap profile requested");
        }
    });
}

/// A Kubernetes operator that sends email from custom resources.
#[derive(Parser)]
#[command(name = "mailroom", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Create an EmailMessage, and with --wait wait for its outcome.
    ///
    /// Exit codes: 0 sent (or created, without --wait), 1 failed, 2 timed out, 3 API error,
    /// 64 bad command line.
    Send(Box<mailroom::cli::send::SendArgs>),
    /// Work with profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Print a shell completion script (bash, zsh or fish).
    ///
    /// bash: `source <(mailroom completion bash)`; zsh: `mailroom completion zsh > "${fpath[1]}/_mailroom"`;
    /// fish: `mailroom completion fish > ~/.config/fish/completions/mailroom.fish`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the man page (roff) of mailroom, or of one of its commands (`mailroom man send`).
    ///
    /// `mailroom man > ~/.local/share/man/man1/mailroom.1`, then `man mailroom`.
    Man {
        /// The command whose page to print, such as `send` or `profile check`; none: mailroom's own.
        #[arg(value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Print the version and git commit.
    Version,
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Check a profile as the operator would: Secrets, token, roles, SMTP server.
    ///
    /// Exit codes: 0 when it checks out, 1 when it does not (or the profile's policy refuses the
    /// --send-test message, which is then not sent), 3 API error, 64 bad command line.
    Check(mailroom::cli::check::CheckArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// PEM roots trusted besides the platform's, for every HTTPS and SMTP TLS endpoint.
    #[arg(long, env = "MAILROOM_CA_BUNDLE")]
    ca_bundle: Option<PathBuf>,
    /// Watch one namespace only (default: all).
    #[arg(long, env = "MAILROOM_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the Prometheus metrics endpoint.
    #[arg(long, env = "MAILROOM_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Address of the /healthz and /readyz endpoints.
    #[arg(long, env = "MAILROOM_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    health_addr: SocketAddr,
    /// Run only while holding the leader Lease (for more than one replica).
    #[arg(long, env = "MAILROOM_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease `mailroom-leader`; it must exist (default: $POD_NAMESPACE, else mailroom-system).
    #[arg(long, env = "MAILROOM_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Seconds a shutdown waits for the sends in flight; keep it below the pod's
    /// terminationGracePeriodSeconds (default 30), so that the Lease is released in time.
    #[arg(long, env = "MAILROOM_SHUTDOWN_TIMEOUT", value_name = "SECONDS", default_value_t = 25)]
    shutdown_timeout: u64,
    /// Log as text or JSON.
    #[arg(long, env = "MAILROOM_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Accept plain http:// Graph and authority endpoints (local testing only).
    #[arg(long, env = "MAILROOM_ALLOW_INSECURE_ENDPOINTS")]
    allow_insecure_endpoints: bool,
    /// Accept authority hosts and Graph endpoints other than Microsoft's clouds' in namespaced
    /// MailProfiles (proxies, tests); ClusterMailProfiles may always name them.
    #[arg(long, env = "MAILROOM_ALLOW_CUSTOM_ENDPOINTS")]
    allow_custom_endpoints: bool,
    /// Address of the notification receiver for Alertmanager, Flux, Argo CD and Grafana
    /// (POST /alerts/{namespace}/{alertroute}); off when unset.
    #[arg(long, env = "MAILROOM_ALERTS_ADDR")]
    alerts_addr: Option<SocketAddr>,
    /// The receiver's URL as senders reach it (e.g. https://mailroom-alerts.mailroom-system.svc:8082),
    /// shown in each AlertRoute's status.url; without it, status.url is the path alone. Its scheme
    /// is the one served: https, or http with --alerts-insecure-http.
    #[arg(long, env = "MAILROOM_ALERTS_URL", value_name = "URL")]
    alerts_url: Option<String>,
    /// The `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) the notification receiver serves
    /// HTTPS with, as NAMESPACE/NAME or NAME (in $POD_NAMESPACE); reloaded when it changes.
    /// --alerts-addr needs it, or --alerts-insecure-http.
    #[arg(long, env = "MAILROOM_ALERTS_TLS_SECRET", value_name = "[NAMESPACE/]NAME")]
    alerts_tls_secret: Option<String>,
    /// Serve the notification receiver over plain HTTP, without TLS: tokens and notifications
    /// cross the network readable (only behind a TLS-terminating proxy, or for local testing).
    #[arg(long, env = "MAILROOM_ALERTS_INSECURE_HTTP")]
    alerts_insecure_http: bool,
    /// Address of the SMTP submission listener with STARTTLS (587 by convention); off when unset.
    /// Each mail a client submits with an SmtpCredential's username and password becomes an
    /// EmailMessage. Needs --smtp-tls-secret.
    #[arg(long, env = "MAILROOM_SMTP_ADDR", requires = "smtp_tls_secret")]
    smtp_addr: Option<SocketAddr>,
    /// Address of the SMTP submission listener with implicit TLS (465 by convention); off when unset.
    #[arg(long, env = "MAILROOM_SMTPS_ADDR", requires = "smtp_tls_secret")]
    smtps_addr: Option<SocketAddr>,
    /// The `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) the SMTP listener presents, as
    /// NAMESPACE/NAME or NAME (in $POD_NAMESPACE); reloaded when it changes.
    #[arg(long, env = "MAILROOM_SMTP_TLS_SECRET", value_name = "[NAMESPACE/]NAME")]
    smtp_tls_secret: Option<String>,
    /// The host name the SMTP listener greets with.
    #[arg(long, env = "MAILROOM_SMTP_HOSTNAME", default_value = "mailroom")]
    smtp_hostname: String,
    /// SMTP connections served at once; more are answered 421.
    #[arg(long, env = "MAILROOM_SMTP_MAX_CONNECTIONS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    smtp_max_connections: u32,
    /// Seconds an SMTP client may stay silent between commands before it is disconnected.
    #[arg(long, env = "MAILROOM_SMTP_IDLE_TIMEOUT", value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    smtp_idle_timeout: u64,
    /// EmailMessages reconciled at once (building, claiming, sending, recording). Messages waiting
    /// for a rate-limit turn do not count: they wait in their mailbox's queue.
    #[arg(long, env = "MAILROOM_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Bytes the messages being built and sent may hold together (attachments as read, their
    /// encoding, request bodies), e.g. 512Mi or 2Gi. A message waits for its share without
    /// holding a reconcile slot; one larger than the budget goes alone.
    #[arg(long, env = "MAILROOM_MEMORY_BUDGET", value_name = "BYTES", default_value = "512Mi", value_parser = mailroom::delivery::footprint::parse_bytes)]
    memory_budget: u64,
    /// Seconds between two sweeps that delete the SendRecords (idempotency keys) whose retention
    /// has passed.
    #[arg(long, env = "MAILROOM_SEND_RECORD_SWEEP_INTERVAL", value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    send_record_sweep_interval: u64,
}

/// The command line's definition, named as it was invoked: `kubectl mailroom` for the plugin.
fn command(invocation: Invocation) -> clap::Command {
    let cmd = Cli::command();
    match invocation.display_command() {
        Some(name) => cmd.bin_name(name).display_name(mailroom::cli::plugin::PLUGIN_EXECUTABLE),
        None => cmd,
    }
}

fn main() -> ExitCode {
    tls::install_crypto_provider();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invocation = Invocation::from_argv0(argv.first().map(|a| a.as_os_str()));
    let parsed = command(invocation).try_get_matches_from(&argv).and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // A bad command line exits 64, not clap's 2, which `send --wait` uses for a timeout.
            return if e.use_stderr() { ExitCode::from(mailroom::cli::exit::USAGE) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Completion { shell } => {
            // Completion scripts are for the executable the shell runs: `mailroom`, or
            // `kubectl-mailroom` (kubectl completes only its plugins' names).
            let bin = match invocation {
                Invocation::KubectlPlugin => mailroom::cli::plugin::PLUGIN_EXECUTABLE,
                Invocation::Binary => "mailroom",
            };
            docs::completion(shell, command(Invocation::Binary), bin, &mut std::io::stdout().lock());
            ExitCode::SUCCESS
        }
        Command::Man { command: path } => match docs::man_page(command(invocation), &path) {
            Ok(page) => match page.render(&mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the man page: {e}");
                    ExitCode::from(mailroom::cli::exit::FAILED)
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Send(args) => block_on(mailroom::cli::send::run(*args)),
        Command::Profile(ProfileCommand::Check(args)) => block_on(mailroom::cli::check::run(args)),
        Command::Crd => match mailroom::api::crd::to_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Version => {
            println!("mailroom {} (commit {})", env!("CARGO_PKG_VERSION"), env!("MAILROOM_GIT_COMMIT"));
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            init_logging(args.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs a command line subcommand to its exit code.
fn block_on(command: impl std::future::Future<Output = u8>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => ExitCode::from(runtime.block_on(command)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(mailroom::cli::exit::API)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    // Installed first, so that a SIGTERM while waiting for the Lease is handled, not fatal.
    let shutdown = Shutdown::install(Duration::from_secs(args.shutdown_timeout));
    let pod_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "mailroom-system".into());
    // Checked before anything is reached: a receiver that cannot be served as asked does not start.
    let receiver_flags = mailroom::alerts::ReceiverFlags {
        addr: args.alerts_addr.is_some(),
        tls_secret: args.alerts_tls_secret.as_deref(),
        insecure_http: args.alerts_insecure_http,
        url: args.alerts_url.as_deref(),
    };
    let receiver_tls = mailroom::alerts::receiver_tls(receiver_flags, &pod_namespace).map_err(|e| e.to_string())?;
    let trust = match &args.ca_bundle {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("--ca-bundle {}: {e}", path.display()))?;
            TrustRoots::from_pem(&pem).map_err(|e| format!("--ca-bundle {}: {e}", path.display()))?
        }
        None => TrustRoots::default(),
    };
    let kubeconfig =
        kube::Config::infer().await.map_err(|e| format!("cannot load the Kubernetes configuration: {e}"))?;
    let client =
        mailroom::kube_client::client(kubeconfig).map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let instance = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("mailroom-{}", std::process::id()));
    let config = OperatorConfig {
        namespace: args.namespace.clone(),
        allow_insecure_endpoints: args.allow_insecure_endpoints,
        allow_custom_endpoints: args.allow_custom_endpoints,
        trust,
        instance,
        concurrency: args.concurrency,
        memory_budget: args.memory_budget,
        send_record_sweep_seconds: args.send_record_sweep_interval,
    };
    let metrics = Arc::new(Metrics::default());
    metrics.set_heap_probe(jemalloc_heap);
    #[cfg(feature = "heap-profile")]
    heap_profile_on_sigusr2();
    let health = Arc::new(Health::default());
    server::serve(args.metrics_addr, args.health_addr, metrics.clone(), health.clone())
        .await
        .map_err(|e| format!("cannot listen on {} / {}: {e}", args.metrics_addr, args.health_addr))?;
    if let (Some(addr), Some(tls)) = (args.alerts_addr, &receiver_tls) {
        // Every replica serves webhooks, leader or not: message names are deterministic, so two
        // replicas receiving the same notification still create one message.
        let alerts = mailroom::alerts::AlertsConfig {
            namespace: args.namespace.clone(),
            instance: config.instance.clone(),
            public_url: args.alerts_url.clone(),
        };
        mailroom::alerts::serve(addr, client.clone(), alerts, tls)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }

    if args.smtp_addr.is_some() || args.smtps_addr.is_some() {
        // Every replica listens, leader or not: message names are derived from what was
        // submitted, so a retried submission to another replica still makes one message.
        let secret = args.smtp_tls_secret.clone().unwrap_or_default();
        let (cert_namespace, cert_name) = mailroom::serving_cert::secret_name(&secret, &pod_namespace)
            .ok_or_else(|| format!("--smtp-tls-secret {secret:?} is not [NAMESPACE/]NAME"))?;
        let limits = mailroom::submission::Limits {
            max_message_bytes: mailroom::cli::send::SECRET_LIMIT - mailroom::api::DEFAULT_RAW_KEY.len(),
            command_timeout: std::time::Duration::from_secs(args.smtp_idle_timeout),
            ..Default::default()
        };
        let submission = mailroom::submission::SubmissionConfig {
            addr: args.smtp_addr,
            implicit_tls_addr: args.smtps_addr,
            hostname: args.smtp_hostname.clone(),
            max_connections: args.smtp_max_connections as usize,
            limits,
        };
        mailroom::submission::serve_kube(client.clone(), submission, args.namespace.clone(), cert_namespace, cert_name)
            .await
            .map_err(|e| format!("cannot listen for SMTP submission: {e}"))?;
    }

    if !args.leader_elect {
        metrics.leader.set(1);
        return drain(controller::run(client, config, metrics, health, shutdown.wait()), &shutdown).await;
    }

    let namespace = leader::election_namespace(
        args.leader_election_namespace.as_deref(),
        std::env::var("POD_NAMESPACE").ok().as_deref(),
    );
    let identity =
        leader::identity(std::env::var("POD_NAME").ok().as_deref(), hostname().as_deref(), std::process::id());
    let election =
        Election::new(client.clone(), ElectionConfig::new(namespace, identity)).map_err(|e| e.to_string())?;
    // A replica waiting for the Lease is healthy: /readyz answers ok so that a Deployment rolls
    // out; `mailroom_leader` tells which replica sends.
    health.set_ready(true);
    let leadership = tokio::select! {
        leadership = election.acquire() => leadership.map_err(|e| e.to_string())?,
        () = shutdown.wait() => {
            info!("stopped before becoming the leader");
            return Ok(());
        }
    };
    metrics.leader.set(1);
    let controllers = controller::run(client, config, metrics.clone(), health, shutdown.wait());
    let drained = tokio::select! {
        drained = drain(controllers, &shutdown) => drained,
        reason = leadership.lost() => {
            // Another replica may take the Lease over from now on and send. Stopping the whole
            // process at once, without waiting for the sends in flight, is the only safe answer:
            // those messages stay Sending and the next leader handles them per
            // delivery.onUncertain. The Deployment restarts this process as a follower.
            error!(%reason, identity = %leadership.identity(), "lost the leader Lease; stopping at once");
            std::process::exit(1);
        }
    };
    metrics.leader.set(0);
    match leadership.release().await {
        Ok(()) => info!("released the leader Lease"),
        Err(e) => warn!(error = %e, "could not release the leader Lease; it expires on its own"),
    }
    drained
}

/// Runs the controllers until they stopped after the shutdown signal. Sends still in flight
/// `--shutdown-timeout` after the signal are abandoned (dropping the controllers aborts them): they
/// stay Sending and the next leader handles them per delivery.onUncertain.
async fn drain(controllers: impl std::future::Future<Output = ()>, shutdown: &Shutdown) -> Result<(), String> {
    let deadline = async {
        shutdown.wait().await;
        tokio::time::sleep(shutdown.timeout).await;
    };
    tokio::select! {
        () = controllers => Ok(()),
        () = deadline => Err(format!(
            "sends still in flight {} s after the shutdown signal were abandoned; they stay Sending and the next leader handles them per delivery.onUncertain",
            shutdown.timeout.as_secs()
        )),
    }
}

/// The host name, for the Lease identity outside a pod.
fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// SIGTERM or Ctrl-C, observed by every part that stops on it.
#[derive(Clone)]
struct Shutdown {
    signalled: watch::Receiver<bool>,
    /// How long the sends in flight may take after the signal.
    timeout: Duration,
}

impl Shutdown {
    fn install(timeout: Duration) -> Shutdown {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutdown signal received");
            tx.send_replace(true);
        });
        Shutdown { signalled: rx, timeout }
    }

    /// Completes once the signal came.
    fn wait(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.signalled.clone();
        async move {
            let _ = rx.wait_for(|signalled| *signalled).await;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
