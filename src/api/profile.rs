//! `MailProfile` and `ClusterMailProfile`: how to send.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::cloud::{Cloud, default_scope};
use super::common::{SecretKeySelector, SecretReference};

/// Exchange Online's sending limit per mailbox.
pub const DEFAULT_MESSAGES_PER_MINUTE: u32 = 30;
/// Graph's concurrency limit per mailbox: the default but for SMTP with AUTH.
pub const DEFAULT_MAX_CONCURRENT: u32 = crate::transport::graph::MAILBOX_CONCURRENCY;
/// Exchange Online's limit of concurrent SMTP AUTH connections per mailbox, past which each gets
/// `432 4.3.2 Concurrent connections limit exceeded` ([Message storage and concurrent connection
/// throttling for SMTP Authenticated
/// Submission](https://learn.microsoft.com/exchange/troubleshoot/send-emails/smtp-submission-improvements)):
/// the default for SMTP with `auth` (a password or XOAUTH2).
pub const SMTP_AUTH_MAX_CONCURRENT: u32 = 3;

/// How to send: exactly one transport, its credentials, its limits and policy.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "MailProfile",
    namespaced,
    status = "MailProfileStatus",
    shortname = "mp",
    category = "mailroom",
    printcolumn = r#"{"name":"Transport","type":"string","jsonPath":".status.transport"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Token Expires","type":"string","jsonPath":".status.token.expiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.graph) != has(self.smtp)").message("a profile needs exactly one transport: set either graph or smtp"))]
pub struct MailProfileSpec {
    /// Who may appear as the sender.
    pub senders: Senders,
    /// Send through Microsoft Graph `sendMail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<GraphTransport>,
    /// Send through an SMTP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpTransport>,
    /// Sending limits per sender mailbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// When set, every recipient's domain must be one of these (or a subdomain of one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub recipient_domains: Option<Vec<String>>,
    /// PEM roots trusted, besides the operator's, for this profile's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// How long a sent idempotency key of this profile's messages stays taken, in seconds;
    /// default 30 days. A message's `idempotencyRetentionSeconds` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_622_400))]
    pub idempotency_retention_seconds: Option<u64>,
}

/// A profile shared by the namespaces that `allowedNamespaces` admits.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "ClusterMailProfile",
    status = "MailProfileStatus",
    shortname = "cmp",
    category = "mailroom",
    printcolumn = r#"{"name":"Transport","type":"string","jsonPath":".status.transport"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Token Expires","type":"string","jsonPath":".status.token.expiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMailProfileSpec {
    /// Namespaces whose messages may use this profile; absent admits none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<LabelSelector>,
    /// The sending settings, the same fields as a MailProfile's.
    #[serde(flatten)]
    pub profile: MailProfileSpec,
}

impl ClusterMailProfileSpec {
    /// The sending settings, shaped as a namespaced profile's.
    pub fn settings(&self) -> MailProfileSpec {
        self.profile.clone()
    }
}

/// The senders a profile allows.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Senders {
    /// The sender of messages that name none.
    #[schemars(length(min = 3, max = 320))]
    pub default: String,
    /// Addresses (or `*@domain` patterns) a message may name as `from`; default: only `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub allowed: Option<Vec<String>>,
}

/// An app registration in Microsoft Entra ID and the credential it authenticates with.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.clientSecretRef), has(self.certificateRef), has(self.workloadIdentity)].filter(x, x).size() == 1").message("set exactly one credential: clientSecretRef, certificateRef or workloadIdentity"))]
pub struct EntraCredentials {
    /// Directory (tenant) ID.
    #[schemars(length(min = 1, max = 128))]
    pub tenant_id: String,
    /// Application (client) ID.
    #[schemars(length(min = 1, max = 128))]
    pub client_id: String,
    /// A client secret in a Secret key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretKeySelector>,
    /// A `kubernetes.io/tls` Secret whose certificate is registered with the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_ref: Option<SecretReference>,
    /// Workload identity federation: a projected service account token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentity>,
    /// The Microsoft cloud: Public (default), USGovernment, USGovernmentDoD or China. It sets
    /// the authority host, the Graph endpoint and the token scope, and for XOAUTH2 the Outlook
    /// scope and the default SMTP host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<Cloud>,
    /// The Entra ID authority; default: the cloud's. Other than Microsoft's own, only in a
    /// ClusterMailProfile or with the operator's `--allow-custom-endpoints` (proxies, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_host: Option<String>,
    /// The scope tokens are requested for; default: `<Graph endpoint>/.default` (Graph) or the
    /// cloud's Outlook scope (XOAUTH2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub token_scope: Option<String>,
}

impl EntraCredentials {
    /// The cloud, defaulted.
    pub fn cloud(&self) -> Cloud {
        self.cloud.unwrap_or_default()
    }

    /// The authority host: explicit, else the cloud's.
    pub fn authority_host(&self) -> &str {
        self.authority_host.as_deref().unwrap_or(self.cloud().endpoints().authority_host)
    }
}

/// Workload identity federation settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentity {
    /// The federated token file; default: `$AZURE_FEDERATED_TOKEN_FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

/// Microsoft Graph `sendMail` with an app-only token.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GraphTransport {
    /// The app and its credential.
    #[serde(flatten)]
    pub credentials: EntraCredentials,
    /// Keep a copy in the sender's Sent Items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_to_sent_items: Option<bool>,
    /// The Graph endpoint (sovereign clouds, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl GraphTransport {
    /// The Graph endpoint: explicit, else the cloud's.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or(self.credentials.cloud().endpoints().graph_endpoint)
    }

    /// The scope of Graph tokens: explicit; else that of the endpoint actually used when it is
    /// one of Microsoft's (so `endpoint: https://graph.microsoft.us` asks for the US scope);
    /// else the cloud's (a proxy in front of the cloud's Graph).
    pub fn token_scope(&self) -> String {
        if let Some(scope) = &self.credentials.token_scope {
            return scope.trim().to_string();
        }
        match Cloud::of_graph_endpoint(self.endpoint()) {
            Some(_) => default_scope(self.endpoint()),
            None => self.credentials.cloud().graph_scope(),
        }
    }
}

/// How an SMTP connection is secured.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TlsMode {
    /// Plain connection upgraded with STARTTLS (required).
    #[default]
    StartTLS,
    /// TLS from the first byte (port 465).
    Implicit,
    /// No TLS at all (local relays only).
    None,
}

/// An SMTP server.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.host) || (has(self.auth) && has(self.auth.oauth2))").message("smtp.host is required unless smtp.auth.oauth2 is set (then it defaults to the cloud's SMTP AUTH host)"))]
pub struct SmtpTransport {
    /// Host name of the server; with `auth.oauth2` it defaults to the cloud's SMTP AUTH host
    /// (`smtp.office365.com` for Public).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,
    /// Port; default 25 for a relay, 587 with authentication, 465 with implicit TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// StartTLS (default), Implicit or None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsMode>,
    /// Authentication; absent for an IP-authenticated relay connector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<SmtpAuth>,
}

impl SmtpTransport {
    /// The server: explicit, else (XOAUTH2) the cloud's SMTP AUTH host, if Microsoft publishes one.
    pub fn server(&self) -> Option<&str> {
        match &self.host {
            Some(host) => Some(host.as_str()),
            None => self.oauth2().and_then(|o| o.cloud().endpoints().smtp_host),
        }
    }

    /// The XOAUTH2 credentials, when the server is logged in to with OAuth 2.0.
    pub fn oauth2(&self) -> Option<&EntraCredentials> {
        self.auth.as_ref().and_then(|a| a.oauth2.as_ref())
    }

    /// The scope of XOAUTH2 tokens: explicit; else the Outlook scope of the cloud whose SMTP
    /// host the server is (`smtp.office365.us` asks for the US scope); else the cloud's.
    pub fn token_scope(&self) -> Option<String> {
        let oauth2 = self.oauth2()?;
        if let Some(scope) = &oauth2.token_scope {
            return Some(scope.trim().to_string());
        }
        let cloud = self.host.as_deref().and_then(Cloud::of_smtp_host).unwrap_or(oauth2.cloud());
        Some(cloud.outlook_scope())
    }

    /// The TLS mode, defaulted.
    pub fn tls(&self) -> TlsMode {
        self.tls.unwrap_or_default()
    }

    /// The port, defaulted from the TLS mode and authentication.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match (self.tls(), &self.auth) {
            (TlsMode::Implicit, _) => 465,
            (_, Some(_)) => 587,
            (_, None) => 25,
        })
    }
}

/// SMTP authentication: a password or OAuth 2.0 (XOAUTH2).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.password) != has(self.oauth2)").message("smtp.auth needs exactly one of password or oauth2"))]
pub struct SmtpAuth {
    /// A user name and password (keys `username` and `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<PasswordAuth>,
    /// SASL XOAUTH2 with an Entra ID token for Exchange Online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<EntraCredentials>,
}

/// A Secret with `username` and `password` keys.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PasswordAuth {
    /// The Secret holding the login.
    pub secret_ref: SecretReference,
}

/// Sending limits per sender mailbox.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Messages per minute (token bucket); default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub messages_per_minute: Option<u32>,
    /// Sends in flight at once per sender mailbox; default 4 (Graph's limit), 3 for SMTP with
    /// `auth` (Exchange Online's limit on concurrent SMTP AUTH connections per mailbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent: Option<u32>,
}

impl MailProfileSpec {
    /// Messages per minute per mailbox, defaulted.
    pub fn messages_per_minute(&self) -> u32 {
        self.limits.as_ref().and_then(|l| l.messages_per_minute).unwrap_or(DEFAULT_MESSAGES_PER_MINUTE)
    }

    /// Concurrent sends per mailbox, defaulted by transport.
    pub fn max_concurrent(&self) -> u32 {
        let default = match &self.smtp {
            Some(SmtpTransport { auth: Some(_), .. }) => SMTP_AUTH_MAX_CONCURRENT,
            _ => DEFAULT_MAX_CONCURRENT,
        };
        self.limits.as_ref().and_then(|l| l.max_concurrent).unwrap_or(default)
    }

    /// A short name of the transport, as the status and metrics show it.
    pub fn transport_name(&self) -> &'static str {
        match (&self.graph, &self.smtp) {
            (Some(_), _) => "graph",
            (None, Some(s)) => match &s.auth {
                Some(SmtpAuth { oauth2: Some(_), .. }) => "smtp-oauth2",
                Some(_) => "smtp-password",
                None => "smtp-relay",
            },
            (None, None) => "none",
        }
    }
}

/// Observed state of a profile.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailProfileStatus {
    /// `Ready`, with the reason when it is not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The transport in use: graph, smtp-relay, smtp-password, smtp-oauth2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The OAuth token's lifetime (never the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenStatus>,
}

/// What is known of the cached token.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// When the current token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the token was last obtained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    /// The application roles the token carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(transport: serde_json::Value) -> MailProfileSpec {
        let mut spec = serde_json::json!({"senders": {"default": "alerts@contoso.com"}});
        spec.as_object_mut().expect("an object").extend(transport.as_object().expect("an object").clone());
        serde_json::from_value(spec).expect("MailProfileSpec")
    }

    #[test]
    fn concurrency_defaults_to_the_providers_limit_per_mailbox() {
        let graph = spec(serde_json::json!({"graph": {"tenantId": "t", "clientId": "c"}}));
        let relay = spec(serde_json::json!({"smtp": {"host": "relay.contoso.com"}}));
        let password = spec(serde_json::json!({
            "smtp": {"host": "smtp.office365.com", "auth": {"password": {"secretRef": {"name": "login"}}}},
        }));
        let xoauth2 = spec(serde_json::json!({
            "smtp": {"host": "smtp.office365.com", "auth": {"oauth2": {"tenantId": "t", "clientId": "c"}}},
        }));
        assert_eq!(graph.max_concurrent(), 4, "Graph: 4 requests per mailbox");
        assert_eq!(relay.max_concurrent(), 4, "a relay connector has no per-mailbox connection limit");
        assert_eq!(password.max_concurrent(), 3, "SMTP AUTH: 3 connections per mailbox");
        assert_eq!(xoauth2.max_concurrent(), 3);
        let mut chosen = xoauth2.clone();
        chosen.limits = Some(Limits { max_concurrent: Some(8), ..Limits::default() });
        assert_eq!(chosen.max_concurrent(), 8, "what the profile says wins");
    }
}
