//! The operator's error type.

/// Errors that stop a reconcile; the controller retries them with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A resource had no namespace or name where one was required.
    #[error("{0}")]
    Invalid(String),
    /// TLS trust could not be set up.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Invalid(_) => "invalid",
            Error::Tls(_) => "tls",
        }
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
