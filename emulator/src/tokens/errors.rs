//! Entra ID's token endpoint errors: AADSTS codes, OAuth error names, statuses and wording.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::clock;

/// A token request refused, with the reason Entra ID would give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AadError {
    /// A required form parameter is missing.
    MissingParameter(&'static str),
    /// grant_type is not client_credentials.
    UnsupportedGrantType(String),
    /// The tenant in the URL is unknown.
    TenantNotFound(String),
    /// No app with that client id in the tenant.
    ApplicationNotFound {
        /// Client id presented.
        client: String,
        /// Tenant in the URL.
        tenant: String,
    },
    /// Neither a secret nor an assertion.
    MissingCredential,
    /// Malformed or contradictory request.
    InvalidRequest(String),
    /// The secret matches none of the app's secrets.
    InvalidSecret {
        /// Client id.
        client: String,
    },
    /// The assertion is not a readable JWT.
    MalformedAssertion(String),
    /// The assertion's signing algorithm is not accepted.
    UnsupportedAlgorithm(String),
    /// iss/sub of a certificate assertion are not the client id.
    ClientIdMismatch,
    /// The assertion's aud is not this token endpoint.
    AudienceMismatch {
        /// What the assertion said.
        presented: String,
    },
    /// No registered certificate has the presented thumbprint.
    CertificateNotRegistered {
        /// Thumbprint presented (hex), if any.
        thumbprint: Option<String>,
        /// Client id.
        client: String,
    },
    /// The registered certificate is outside its validity period.
    CertificateExpired {
        /// Thumbprint (hex).
        thumbprint: String,
        /// Client id.
        client: String,
    },
    /// The assertion's signature does not verify.
    InvalidSignature {
        /// Thumbprint (hex) of the key tried.
        thumbprint: String,
        /// Client id.
        client: String,
    },
    /// The assertion is expired or not yet valid.
    AssertionTimeRange {
        /// Now.
        now: i64,
        /// nbf (0 if absent).
        nbf: i64,
        /// exp.
        exp: i64,
    },
    /// exp - nbf exceeds 10 minutes.
    AssertionLifetimeTooLong {
        /// Seconds between nbf and exp.
        seconds: i64,
    },
    /// The jti was used before.
    AssertionReplayed,
    /// No federated credential matches iss/sub/aud.
    FederatedNoMatch {
        /// iss.
        issuer: String,
        /// sub.
        subject: String,
        /// aud.
        audience: String,
    },
    /// Scope without `/.default`.
    ScopeNotDefault(String),
    /// Several or unusable scopes.
    InvalidScope(String),
    /// A `/.default` scope for a resource the emulator's cloud does not hold, another cloud's
    /// included: AADSTS500011 InvalidResourceServicePrincipalNotFound
    /// (<https://learn.microsoft.com/entra/identity-platform/reference-error-codes>).
    ResourceNotFound {
        /// The resource.
        resource: String,
        /// The tenant.
        tenant: String,
    },
    /// An injected fault.
    Fault {
        /// Status to answer.
        status: u16,
        /// Retry-After seconds.
        retry_after: Option<u64>,
        /// AADSTS code override.
        code: Option<u32>,
        /// Message override.
        message: Option<String>,
    },
}

const CERT_DOCS: &str =
    "Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials .";

impl AadError {
    /// The AADSTS number.
    pub fn code(&self) -> u32 {
        match self {
            Self::MissingParameter(_) => 900144,
            Self::UnsupportedGrantType(_) => 70003,
            Self::TenantNotFound(_) => 90002,
            Self::ApplicationNotFound { .. } => 700016,
            Self::MissingCredential => 7000216,
            Self::InvalidRequest(_) => 9002313,
            Self::InvalidSecret { .. } => 7000215,
            Self::MalformedAssertion(_) => 50027,
            Self::UnsupportedAlgorithm(_) => 5002738,
            Self::ClientIdMismatch => 700021,
            Self::AudienceMismatch { .. } => 700023,
            Self::CertificateNotRegistered { .. } | Self::CertificateExpired { .. } | Self::InvalidSignature { .. } => {
                700027
            }
            Self::AssertionTimeRange { .. } | Self::AssertionLifetimeTooLong { .. } => 700024,
            Self::AssertionReplayed => 7000277,
            Self::FederatedNoMatch { .. } => 70021,
            Self::ScopeNotDefault(_) => 1002012,
            Self::InvalidScope(_) => 70011,
            Self::ResourceNotFound { .. } => 500011,
            Self::Fault { status, code, .. } => code.unwrap_or(match status {
                429 => 90055,
                _ => 90033,
            }),
        }
    }

    /// The OAuth `error` value.
    pub fn error(&self) -> &'static str {
        match self {
            Self::MissingParameter(_)
            | Self::TenantNotFound(_)
            | Self::InvalidRequest(_)
            | Self::MalformedAssertion(_)
            | Self::FederatedNoMatch { .. } => "invalid_request",
            Self::UnsupportedGrantType(_) => "unsupported_grant_type",
            Self::ApplicationNotFound { .. } => "unauthorized_client",
            Self::ScopeNotDefault(_) | Self::InvalidScope(_) => "invalid_scope",
            Self::ResourceNotFound { .. } => "invalid_resource",
            Self::Fault { status, .. } => match status {
                429 | 503 | 504 => "temporarily_unavailable",
                500..=599 => "server_error",
                _ => "invalid_request",
            },
            _ => "invalid_client",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Fault { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            _ if self.error() == "invalid_client" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The message after `AADSTSnnn: `.
    pub fn message(&self) -> String {
        match self {
            Self::MissingParameter(p) => {
                format!("The request body must contain the following parameter: '{p}'.")
            }
            Self::UnsupportedGrantType(g) => format!(
                "The app requested an unsupported grant type '{g}'. Only 'client_credentials' is supported by this endpoint."
            ),
            Self::TenantNotFound(t) => format!(
                "Tenant '{t}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
            ),
            Self::ApplicationNotFound { client, tenant } => format!(
                "Application with identifier '{client}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
            Self::MissingCredential => {
                "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type."
                    .into()
            }
            Self::InvalidRequest(reason) => {
                format!("Invalid request. Request is malformed or invalid. [Reason - {reason}]")
            }
            Self::InvalidSecret { client } => format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client}'."
            ),
            Self::MalformedAssertion(reason) => {
                format!("JWT token is invalid or malformed. [Reason - {reason}]")
            }
            Self::UnsupportedAlgorithm(alg) => format!(
                "Invalid JWT token. '{alg}' is not a supported signature algorithm. Supported signing algorithms are: 'RS256,RS384,RS512,PS256,PS384,PS512'."
            ),
            Self::ClientIdMismatch => {
                format!("Client assertion application identifier doesn't match 'client_id' parameter. {CERT_DOCS}")
            }
            Self::AudienceMismatch { presented } => format!(
                "Client assertion audience claim does not match Realm issuer. Presented audience: '{presented}'. {CERT_DOCS}"
            ),
            Self::CertificateNotRegistered { thumbprint, client } => {
                let used = thumbprint
                    .as_ref()
                    .map(|t| format!(", Thumbprint of key used by client: '{t}'"))
                    .unwrap_or_default();
                format!(
                    "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found.{used}, Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client}'.]"
                )
            }
            Self::CertificateExpired { thumbprint, client } => format!(
                "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key used is expired., Thumbprint of key used by client: '{thumbprint}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client}'.]"
            ),
            Self::InvalidSignature { thumbprint, client } => format!(
                "Client assertion failed signature validation. [Reason - The provided signature value did not match the expected signature value., Thumbprint of key used by client: '{thumbprint}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client}'.]"
            ),
            Self::AssertionTimeRange { now, nbf, exp } => format!(
                "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}. {CERT_DOCS}",
                clock::rfc3339(*now),
                clock::rfc3339(*nbf),
                clock::rfc3339(*exp)
            ),
            Self::AssertionLifetimeTooLong { seconds } => format!(
                "Client assertion is not within its valid time range. The assertion is valid for {seconds} seconds; at most 600 seconds between 'nbf' and 'exp' are allowed. {CERT_DOCS}"
            ),
            Self::AssertionReplayed => format!(
                "The client assertion was already used. Each client assertion must carry a unique 'jti' claim. {CERT_DOCS}"
            ),
            Self::FederatedNoMatch { issuer, subject, audience } => format!(
                "No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{audience}'. https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
            ),
            Self::ScopeNotDefault(scope) => format!(
                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
            Self::InvalidScope(scope) => format!(
                "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
            ),
            Self::ResourceNotFound { resource, tenant } => format!(
                "The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
            Self::Fault { message, status, .. } => message.clone().unwrap_or_else(|| {
                if *status == 429 {
                    "The request was throttled. Please retry after the interval given in Retry-After.".into()
                } else {
                    "A transient error has occurred. Please try again.".into()
                }
            }),
        }
    }

    /// The label recorded as the outcome of the request.
    pub fn outcome(&self) -> String {
        match self {
            Self::Fault { status, .. } => format!("fault:{status}"),
            _ => format!("AADSTS{}", self.code()),
        }
    }

    /// Renders Entra ID's JSON error body.
    pub fn into_response_with(self, base_url: &str, correlation_id: &str) -> Response {
        let now = clock::now_unix();
        let timestamp = clock::aad_timestamp(now);
        let trace_id = uuid::Uuid::new_v4().to_string();
        let code = self.code();
        let description = format!(
            "AADSTS{code}: {} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}",
            self.message()
        );
        let body = serde_json::json!({
            "error": self.error(),
            "error_description": description,
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("{base_url}/error?code={code}"),
        });
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Self::Fault { retry_after: Some(secs), .. } = self {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_names_follow_entra() {
        let secret = AadError::InvalidSecret { client: "c".into() };
        assert_eq!(secret.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(secret.error(), "invalid_client");
        assert_eq!(secret.outcome(), "AADSTS7000215");
        let tenant = AadError::TenantNotFound("t".into());
        assert_eq!((tenant.status(), tenant.error()), (StatusCode::BAD_REQUEST, "invalid_request"));
        let app = AadError::ApplicationNotFound { client: "c".into(), tenant: "t".into() };
        assert_eq!((app.status(), app.error()), (StatusCode::BAD_REQUEST, "unauthorized_client"));
        let fed = AadError::FederatedNoMatch { issuer: "i".into(), subject: "s".into(), audience: "a".into() };
        assert_eq!((fed.code(), fed.status()), (70021, StatusCode::BAD_REQUEST));
        let scope = AadError::ScopeNotDefault("x".into());
        assert_eq!((scope.code(), scope.error()), (1002012, "invalid_scope"));
    }

    #[test]
    fn faults_map_to_transient_errors() {
        let f = AadError::Fault { status: 503, retry_after: Some(2), code: None, message: None };
        assert_eq!((f.code(), f.error(), f.outcome()), (90033, "temporarily_unavailable", "fault:503".to_string()));
        let r = f.into_response_with("https://x", "c");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("2"));
    }
}
