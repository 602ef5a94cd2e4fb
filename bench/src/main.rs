//! `make bench`: the operator (release build) against a local control plane, sending N
//! EmailMessages through the Microsoft 365 emulator and through the SMTP test server.
//!
//! For every size and transport: the ceiling (N messages exist, then a minimal client lists and
//! watches them and makes only the claim and outcome patches, with the operator's concurrency);
//! the backlog run (N messages exist, then the operator starts and sends them: throughput against
//! the ceiling, kube-apiserver writes per message from its own counters, token requests, the
//! operator's peak RSS and CPU); a restart over the finished messages (peak RSS); the latency run
//! (N messages created while the operator runs: created-to-Sent latency as this process observes
//! both); duplicates at the receiving end. Then the profile lifecycle (N profiles created and
//! deleted twice: the operator's memory, what its gauges still hold, token requests afterwards)
//! and, when asked for, the waiting run (N messages waiting for their mailbox's turn through a
//! ClusterMailProfile: kube-apiserver requests per minute). Figures are printed and written as
//! JSON; nothing here asserts a speed.

mod cpu;
mod figures;
mod history;
mod lifecycle;
mod openloop;
mod peers;
mod run;
mod soak;

use std::path::PathBuf;

use clap::Parser;

/// What stops a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A process did not start or exited early.
    #[error("{0}")]
    Start(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The API server refused or failed a request.
    #[error("API server: {0}")]
    Kube(#[from] kube::Error),
    /// A peer's control API failed.
    #[error("peer control API: {0}")]
    Http(#[from] reqwest::Error),
    /// A peer answered something unexpected.
    #[error("{0}")]
    Peer(String),
    /// The messages did not all finish in time.
    #[error("{0}")]
    Timeout(String),
}

impl BenchError {
    fn io(path: &std::path::Path, source: std::io::Error) -> BenchError {
        BenchError::Io { path: path.to_path_buf(), source }
    }
}

/// Transports a run can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Microsoft Graph (the emulator), client-secret tokens.
    Graph,
    /// An SMTP relay (the SMTP test server), no authentication.
    Smtp,
}

/// Command line.
#[derive(Parser, Debug, Clone)]
#[command(name = "mailroom-bench", about = "End-to-end benchmark of the mailroom operator (make bench)")]
pub struct Args {
    /// Message counts, one run per count and transport (e.g. 1000,2000,5000).
    #[arg(long, value_delimiter = ',', default_value = "2000", env = "BENCH_SIZES")]
    pub sizes: Vec<usize>,
    /// Transports to run.
    #[arg(long, value_delimiter = ',', default_value = "graph,smtp", env = "BENCH_TRANSPORTS")]
    pub transports: Vec<Transport>,
    /// Sender mailboxes the messages are spread over (the limits are per mailbox).
    #[arg(long, default_value_t = 8)]
    pub mailboxes: usize,
    /// The profile's maxConcurrent (per mailbox); Graph allows 4 per mailbox.
    #[arg(long, default_value_t = 4)]
    pub max_concurrent: u32,
    /// The profile's messagesPerMinute (per mailbox), high so that it is not the limit.
    #[arg(long, default_value_t = 100_000)]
    pub messages_per_minute: u32,
    /// The operator's --concurrency (EmailMessages reconciled at once); the ceiling's minimal
    /// client makes its writes with the same concurrency.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Concurrent creates by this client.
    #[arg(long, default_value_t = 16)]
    pub create_concurrency: usize,
    /// Size of each message's text body in bytes.
    #[arg(long, default_value_t = 4096)]
    pub body_bytes: usize,
    /// Size of each message's inline attachment (spec.attachments[].data) in bytes; 0 for none.
    #[arg(long, default_value_t = 8192)]
    pub attachment_bytes: usize,
    /// Also measure the ceiling with the outcome's Event published per message, as the operator
    /// does (`--ceiling-with-events false` skips it).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ceiling_with_events: bool,
    /// After each backlog run, the latency run (N messages created while the operator runs);
    /// `--latency-run false` skips it (the cost-growth series at 100,000).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub latency_run: bool,
    /// Skip the API-server ceiling measurement.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Seconds one run may take once its messages are created.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// The operator binary (release build).
    #[arg(long, env = "MAILROOM_BIN")]
    pub operator_bin: PathBuf,
    /// The emulator binary.
    #[arg(long, env = "MAILROOM_EMULATOR_BIN")]
    pub emulator_bin: PathBuf,
    /// The Python that runs the SMTP test server (hack/pyenv.sh).
    #[arg(long, env = "MAILROOM_PYTHON")]
    pub python: PathBuf,
    /// Where results.json, logs and peer state go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// A label for this operator build in the results (e.g. before/after a change).
    #[arg(long, default_value = "current")]
    pub label: String,
    /// Skip the throughput runs (ceiling, backlog, restart, latency) of each size and transport.
    #[arg(long)]
    pub no_throughput: bool,
    /// Profiles the lifecycle run creates and deletes (twice); 0 skips it.
    #[arg(long, default_value_t = 1000, env = "BENCH_PROFILES")]
    pub profiles: usize,
    /// Messages the waiting run keeps waiting for their mailbox's turn; 0 (the default) skips it.
    #[arg(long, default_value_t = 0, env = "BENCH_WAITING")]
    pub waiting: usize,
    /// How long the waiting run counts kube-apiserver requests; the default is one profile resync.
    #[arg(long, default_value_t = 300)]
    pub waiting_window_secs: u64,
    /// How long the waiting run lets the operator settle after the last message is created.
    #[arg(long, default_value_t = 30)]
    pub waiting_settle_secs: u64,
    /// Seconds of the open-loop run (messages created at a fixed rate below the ceiling while
    /// the operator runs), once per transport after the first size; 0 skips it.
    #[arg(long, default_value_t = 120, env = "BENCH_OPEN_LOOP_SECONDS")]
    pub open_loop_secs: u64,
    /// The open-loop rate as a fraction of the first size's ceiling.
    #[arg(long, default_value_t = 0.5)]
    pub open_loop_fraction: f64,
    /// The open-loop rate in messages per second, instead of a fraction of the ceiling.
    #[arg(long)]
    pub open_loop_rate: Option<f64>,
    /// Finished messages the retained-history run creates (with a Sent status, nothing sent)
    /// before the operator starts over them, through the first transport; 0 skips it.
    #[arg(long, default_value_t = 0, env = "BENCH_HISTORY")]
    pub history: usize,
    /// Run the soak (`make soak`) for this many minutes instead of the benchmark.
    #[arg(long, env = "SOAK_MINUTES")]
    pub soak_minutes: Option<u64>,
    /// The soak's message rate (messages per second, half Graph and half SMTP).
    #[arg(long, default_value_t = 2.0, env = "SOAK_RATE")]
    pub soak_rate: f64,
    /// The soak's ttlSecondsAfterFinished on every message.
    #[arg(long, default_value_t = 30, env = "SOAK_TTL_SECONDS")]
    pub soak_ttl_secs: u64,
    /// Seconds between two samples of the soak.
    #[arg(long, default_value_t = 10, env = "SOAK_SAMPLE_SECONDS")]
    pub soak_sample_secs: u64,
    /// Minutes of the soak left out of the slopes (caches filling, allocator settling).
    #[arg(long, default_value_t = 5, env = "SOAK_WARMUP_MINUTES")]
    pub soak_warmup_minutes: u64,
}

fn main() -> std::process::ExitCode {
    mailroom::tls::install_crypto_provider();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let work = async {
        match args.soak_minutes {
            Some(minutes) => soak::run(args, minutes).await,
            None => run::all(args).await,
        }
    };
    match runtime.block_on(work) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
