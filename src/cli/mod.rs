//! The command line for people and pipelines: `mailroom send` and `mailroom profile check`, their
//! completions and man pages, and the kubectl plugin they also make up.
//!
//! Both commands talk to the API server with the user's kubeconfig, as kubectl does. Their exit codes are
//! part of their interface (a CI step branches on them): see [`exit`].

pub mod check;
pub mod docs;
pub mod plugin;
pub mod send;

use std::time::Duration;

use kube::Client;

/// Exit codes of `mailroom send` and `mailroom profile check`.
pub mod exit {
    /// Sent (or created, without `--wait`); the profile checks out.
    pub const OK: u8 = 0;
    /// The message Failed; the profile is not ready, its server refused, or its policy refused the test message.
    pub const FAILED: u8 = 1;
    /// `--wait` ran out of time before the message was Sent or Failed.
    pub const TIMEOUT: u8 = 2;
    /// The API server could not be reached or refused a request.
    pub const API: u8 = 3;
    /// A bad command line: a flag, an address, a file (EX_USAGE of sysexits.h).
    pub const USAGE: u8 = 64;
}

/// Why a command stopped before it had an outcome.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong; nothing was sent to the API server.
    #[error("{0}")]
    Usage(String),
    /// The API server could not be reached or refused a request.
    #[error("{0}")]
    Api(String),
}

impl CliError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Api(_) => exit::API,
        }
    }
}

/// A client from the kubeconfig (or the in-cluster config), and the namespace to use: `explicit`,
/// else the current context's, else `default`.
pub async fn connect(explicit: Option<&str>) -> Result<(Client, String), CliError> {
    crate::tls::install_crypto_provider();
    let config = kube::Config::infer().await.map_err(|e| CliError::Api(format!("cannot load a kubeconfig: {e}")))?;
    let namespace = explicit.map(str::to_string).unwrap_or_else(|| config.default_namespace.clone());
    let client =
        Client::try_from(config).map_err(|e| CliError::Api(format!("cannot build a Kubernetes client: {e}")))?;
    Ok((client, namespace))
}

/// Parses `90`, `90s`, `5m`, `2h` or `1d` into a duration (a plain number is seconds).
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{input:?} is not a duration such as 90s, 5m, 2h or 1d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{input:?} has an unknown unit; use s, m, h or d")),
    };
    n.checked_mul(scale).map(Duration::from_secs).ok_or_else(|| format!("{input:?} is too long"))
}

/// A duration as people read it: `1h 5m`, `42s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m {sec}s"),
        (h, m, _) => format!("{h}h {m}m"),
    }
}

/// Text from a server or the API made safe for a terminal: control characters (an escape
/// sequence, a line break that could fake an output line) become `?`.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text() {
        assert_eq!(printable("550 5.7.1 denied"), "550 5.7.1 denied");
        assert_eq!(printable("bad\x1b[2J\r\nphase: Sent"), "bad?[2J??phase: Sent");
        assert_eq!(printable("Zoë ✅"), "Zoë ✅");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(human_duration(Duration::from_secs(3599)), "59m 59s");
        assert_eq!(human_duration(Duration::from_secs(3900)), "1h 5m");
        assert_eq!(human_duration(Duration::from_secs(7)), "7s");
    }

    #[test]
    fn exit_codes_are_distinct() {
        let all = [exit::OK, exit::FAILED, exit::TIMEOUT, exit::API, exit::USAGE];
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        assert_eq!(CliError::Usage(String::new()).exit_code(), exit::USAGE);
        assert_eq!(CliError::Api(String::new()).exit_code(), exit::API);
    }
}
