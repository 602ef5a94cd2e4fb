//! The mailroom command line: `run` (the operator), `crd` (print the CRDs), `version`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use std::sync::Arc;

use mailroom::controller::{self, OperatorConfig};
use mailroom::metrics::Metrics;
use mailroom::server::{self, Health};
use mailroom::tls::{self, TrustRoots};
use tracing_subscriber::EnvFilter;

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
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Print the version and git commit.
    Version,
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
    /// Log as text or JSON.
    #[arg(long, env = "MAILROOM_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Accept plain http:// Graph and authority endpoints (local testing only).
    #[arg(long, env = "MAILROOM_ALLOW_INSECURE_ENDPOINTS")]
    allow_insecure_endpoints: bool,
    /// Address of the Alertmanager webhook receiver (POST /alerts/{namespace}/{alertroute}); off when unset.
    #[arg(long, env = "MAILROOM_ALERTS_ADDR")]
    alerts_addr: Option<SocketAddr>,
}

fn main() -> ExitCode {
    tls::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
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
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
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
    let trust = match &args.ca_bundle {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("--ca-bundle {}: {e}", path.display()))?;
            TrustRoots::from_pem(&pem).map_err(|e| format!("--ca-bundle {}: {e}", path.display()))?
        }
        None => TrustRoots::default(),
    };
    let client = kube::Client::try_default().await.map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let instance = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("mailroom-{}", std::process::id()));
    let config = OperatorConfig {
        namespace: args.namespace.clone(),
        allow_insecure_endpoints: args.allow_insecure_endpoints,
        trust,
        instance,
    };
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    server::serve(args.metrics_addr, args.health_addr, metrics.clone(), health.clone())
        .await
        .map_err(|e| format!("cannot listen on {} / {}: {e}", args.metrics_addr, args.health_addr))?;
    if let Some(addr) = args.alerts_addr {
        // Every replica serves webhooks, leader or not: message names are deterministic, so two
        // replicas receiving the same notification still create one message.
        let alerts =
            mailroom::alerts::AlertsConfig { namespace: args.namespace.clone(), instance: config.instance.clone() };
        mailroom::alerts::serve(addr, client.clone(), alerts)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    let _ = args.leader_elect;
    controller::run(client, config, metrics, health, shutdown_signal()).await;
    Ok(())
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
