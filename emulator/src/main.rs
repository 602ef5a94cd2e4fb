//! `m365-emulator`: serves the emulator on loopback HTTPS and writes `ca.pem` and `url` into
//! the state directory once it accepts connections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use m365_emulator::{Cloud, Config, TokenSigner};

/// A stateful emulator of Microsoft Entra ID's token endpoint and Microsoft Graph mail sending.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Loopback address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Also allow a private (RFC 1918) IPv4 address for --listen, such as the one a local
    /// cluster's Pods reach the host on. The admin API has no authentication: never a public one.
    #[arg(long)]
    allow_private: bool,
    /// Directory where `ca.pem` and then `url` are written once listening.
    #[arg(long)]
    state_dir: PathBuf,
    /// Lifetime in seconds of tokens for apps that do not set `tokenLifetimeSeconds`.
    #[arg(long, default_value_t = 3600)]
    default_token_lifetime: u64,
    /// PKCS#8 PEM RSA key to sign tokens with; generated and written there if missing.
    /// Without it a fresh key is generated at every start.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Requests allowed in flight per mailbox before 429 (Graph allows 4).
    #[arg(long, default_value_t = 4)]
    mailbox_concurrency: usize,
    /// `Retry-After` seconds sent with a mailbox concurrency 429.
    #[arg(long, default_value_t = 1)]
    throttle_retry_after: u64,
    /// The Microsoft cloud to play: Public, USGovernment (GCC High), USGovernmentDoD or China
    /// (21Vianet). It decides the Graph and Outlook resources tokens are issued for.
    #[arg(long, default_value_t = Cloud::Public)]
    cloud: Cloud,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("m365-emulator: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("m365-emulator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.state_dir)?;
    let signer = match cli.signing_key.clone() {
        Some(path) => Some(Arc::new(tokio::task::spawn_blocking(move || TokenSigner::load_or_create(&path)).await??)),
        None => None,
    };
    let emulator = m365_emulator::start(Config {
        listen: cli.listen,
        allow_private: cli.allow_private,
        default_token_lifetime: cli.default_token_lifetime,
        signer,
        mailbox_concurrency: cli.mailbox_concurrency,
        throttle_retry_after: cli.throttle_retry_after,
        cloud: cli.cloud,
    })
    .await?;
    // ca.pem first: a reader that sees `url` can rely on the CA being there.
    write_atomically(&cli.state_dir.join("ca.pem"), emulator.ca_pem())?;
    write_atomically(&cli.state_dir.join("url"), emulator.url())?;

    wait_for_signal().await?;
    tracing::info!("shutting down");
    let _ = std::fs::remove_file(cli.state_dir.join("url"));
    emulator.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Writes through a temporary file and a rename, so readers never see partial content.
fn write_atomically(path: &Path, content: &str) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result?,
    }
    Ok(())
}
