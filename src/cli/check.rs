//! `mailroom profile check`: does a profile work, seen from the user's kubeconfig?
//!
//! It takes the operator's own steps (validate, read the Secrets, build the transport, get a
//! token, judge readiness) and says what fails in the words of the profile's Ready condition.
//! For SMTP it also talks to the server (greeting, AUTH mechanisms, login), and `--send-test`
//! sends one message through the transport directly, without the operator, once the profile's
//! sender and recipient-domain policy (the operator's own checks) allow it.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};

use super::{exit, parse_duration, printable};
use crate::api::{ClusterMailProfile, MailProfile, MailProfileSpec};
use crate::auth::{
    AuthorizationPath, PermissionVerdict, SendEvidence, TokenCacheConfig, TokenCaches, TokenSource, TokenState,
    entra_remedy, verify_permissions,
};
use crate::controller::reason::Reason;
use crate::controller::steps::{
    self, Built, EndpointPolicy, NotReady, ProfileKey, judge, message_id, required_role, transport_inputs,
};
use crate::delivery::policy;
use crate::tls::TrustRoots;
use crate::transport::smtp::SmtpTransport;
use crate::transport::smtp::probe::SmtpProbe;
use crate::transport::{Address, OutgoingMessage, parse_mailbox};

/// Flags of `mailroom profile check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// The profile's name.
    pub name: String,
    /// The namespace of the MailProfile (default: the kubeconfig context's, else `default`).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The profile is a ClusterMailProfile.
    #[arg(long)]
    pub cluster: bool,
    /// PEM roots trusted besides the platform's (as the operator's --ca-bundle); the profile's caBundle is added.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// Accept plain http:// Graph and authority endpoints (local testing only), as the operator's flag.
    #[arg(long)]
    pub allow_insecure_endpoints: bool,
    /// Accept authority hosts and Graph endpoints other than Microsoft's in a MailProfile, as the operator's flag.
    #[arg(long)]
    pub allow_custom_endpoints: bool,
    /// Also send a test message to this mailbox through the profile's transport, if the profile's
    /// recipientDomains allow it.
    #[arg(long, value_name = "MAILBOX")]
    pub send_test: Option<String>,
    /// The sender of the --send-test message, if the profile's senders allow it (default: the
    /// profile's default sender).
    #[arg(long, value_name = "MAILBOX", requires = "send_test")]
    pub from: Option<String>,
    /// How long to wait for the token and the server.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
    pub timeout: Duration,
}

/// Runs `mailroom profile check`; returns the exit code.
pub async fn run(args: CheckArgs) -> u8 {
    let test_to = match args.send_test.as_deref().map(parse_mailbox).transpose() {
        Ok(to) => to,
        Err(e) => {
            eprintln!("error: --send-test: {e}");
            return exit::USAGE;
        }
    };
    let test_from = match args.from.as_deref().map(parse_mailbox).transpose() {
        Ok(from) => from,
        Err(e) => {
            eprintln!("error: --from: {e}");
            return exit::USAGE;
        }
    };
    let test = test_to.map(|to| TestSend { from: test_from, to });
    let trust = match &args.ca_bundle {
        None => TrustRoots::default(),
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|pem| TrustRoots::from_pem(&pem).map_err(|e| e.to_string()))
        {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: --ca-bundle {}: {e}", path.display());
                return exit::USAGE;
            }
        },
    };
    let (client, namespace) = match super::connect(args.namespace.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return e.exit_code();
        }
    };
    let key = if args.cluster {
        ProfileKey::Cluster { name: args.name.clone() }
    } else {
        ProfileKey::Namespaced { namespace, name: args.name.clone() }
    };
    let policy =
        EndpointPolicy { allow_insecure: args.allow_insecure_endpoints, allow_custom: args.allow_custom_endpoints };
    let check = Check { client, key, trust, policy, timeout: args.timeout };
    match check.run(test).await {
        Ok(()) => exit::OK,
        Err(Failure::NotReady(nr)) => {
            println!("not ready: {}: {}", printable(&nr.reason), printable(&nr.message));
            exit::FAILED
        }
        Err(Failure::Refused { reason, message }) => {
            println!("test message refused: {reason}: {}; nothing was sent", printable(&message));
            exit::FAILED
        }
        Err(Failure::Api(message)) => {
            eprintln!("error: {}", printable(&message));
            exit::API
        }
    }
}

/// The message `--send-test` asks for: its recipient, and its sender unless the default.
#[derive(Clone, Debug)]
pub struct TestSend {
    /// `--from`; None: the profile's default sender.
    pub from: Option<Address>,
    /// `--send-test`.
    pub to: Address,
}

/// Why a check did not end well.
#[derive(Debug)]
enum Failure {
    /// The profile cannot send (the words of its Ready condition), or its server refused.
    NotReady(NotReady),
    /// The profile's policy refuses the test message; it was not sent.
    Refused {
        /// The operator's reason for the same refusal of an EmailMessage.
        reason: Reason,
        /// What is not allowed.
        message: String,
    },
    /// The API server could not be reached or refused a request.
    Api(String),
}

impl From<NotReady> for Failure {
    fn from(nr: NotReady) -> Failure {
        Failure::NotReady(nr)
    }
}

/// The test message's sender, checked as the operator checks an EmailMessage before it sends
/// (`decide::check_policy`): the sender against the profile's senders, the recipient against its
/// recipientDomains. Errors carry the operator's reason.
pub fn test_policy(key: &ProfileKey, settings: &MailProfileSpec, test: &TestSend) -> Result<Address, (Reason, String)> {
    let profile = key.to_string();
    let from = match &test.from {
        Some(from) => from.clone(),
        None => parse_mailbox(&settings.senders.default)
            .map_err(|e| (Reason::InvalidAddress, format!("senders.default: {e}")))?,
    };
    policy::check_sender(&profile, &settings.senders, &from.email)
        .map_err(|e| (Reason::SenderNotAllowed, e.to_string()))?;
    policy::check_recipients(&profile, settings.recipient_domains.as_deref(), [test.to.email.as_str()])
        .map_err(|e| (Reason::RecipientDomainNotAllowed, e.to_string()))?;
    Ok(from)
}

/// One check of one profile.
struct Check {
    client: Client,
    key: ProfileKey,
    trust: TrustRoots,
    policy: EndpointPolicy,
    timeout: Duration,
}

impl Check {
    async fn run(&self, test: Option<TestSend>) -> Result<(), Failure> {
        let settings = self.settings().await?;
        println!("profile: {} ({})", self.key, settings.transport_name());
        // A test message the operator would refuse is refused before any Secret is read or any
        // token requested.
        let test = match test {
            Some(test) => match test_policy(&self.key, &settings, &test) {
                Ok(from) => Some((from, test.to)),
                Err((reason, message)) => return Err(Failure::Refused { reason, message }),
            },
            None => None,
        };
        let inputs = transport_inputs(&self.client, &self.key, &settings, &self.trust, self.policy)
            .await
            .map_err(api_error)??;
        let caches = TokenCaches::new(TokenCacheConfig::default());
        let smtp = match &settings.smtp {
            Some(smtp) => Some(steps::smtp_config(&inputs, &caches, smtp)?.0),
            None => None,
        };
        let Built { transport, tokens } = steps::build_transport(inputs, &caches).await?;
        let token = match &tokens {
            Some(cache) => {
                // The outcome is in the cache's state either way; judge reads it from there.
                let _ = tokio::time::timeout(self.timeout, cache.token()).await;
                let state = cache.snapshot();
                if state.expires_at.is_none() && state.last_error.is_none() {
                    return Err(NotReady {
                        reason: "TokenPending".into(),
                        message: format!(
                            "no answer from Microsoft Entra ID within {}",
                            super::human_duration(self.timeout)
                        ),
                    }
                    .into());
                }
                Some(state)
            }
            None => None,
        };
        if let Some(state) = &token {
            print!("{}", describe_token(state, Timestamp::now()));
        }
        let role = required_role(&settings);
        let judged = judge(Ok(transport), token.clone(), role, None, Timestamp::now());
        let ready = judged.condition?;
        if let (Some(role), Some(verdict)) = (role, &judged.permissions) {
            print!("{}", describe_authorization(role, verdict));
        }
        let sender = parse_mailbox(&settings.senders.default)
            .map_err(|e| NotReady { reason: "InvalidSettings".into(), message: format!("senders.default: {e}") })?;
        if let Some(config) = smtp {
            let probe = tokio::time::timeout(self.timeout, SmtpTransport::probe(config, &sender.email))
                .await
                .map_err(|_| smtp_failed(format!("no answer within {}", super::human_duration(self.timeout))))?
                .map_err(|e| smtp_failed(e.to_string()))?;
            print!("{}", describe_probe(&probe));
        }
        println!("ready: {ready}");
        let Some((from, to)) = test else {
            return Ok(());
        };
        let transport = judged.state?;
        let message = test_message(&self.key, from, to);
        let delivered = tokio::time::timeout(self.timeout, transport.send(&message))
            .await
            .map_err(|_| send_failed(format!("no answer within {}", super::human_duration(self.timeout))))?
            .map_err(|e| send_failed(e.to_string()))?;
        println!("test message: accepted: {}", printable(&delivered.response));
        if let (Some(role), Some(state)) = (role, &token) {
            let accepted = SendEvidence::Accepted { sender: message.from.email.clone(), at: Timestamp::now() };
            print!("{}", describe_authorization(role, &verify_permissions(role, &state.roles, Some(&accepted))));
        }
        if let Some(id) = delivered.request_id {
            println!("  request-id: {}", printable(&id));
        }
        println!("  messageId: {}", message.message_id);
        for (rcpt, reply) in delivered.rejected {
            println!("  rejected: {}: {}", printable(&rcpt), printable(&reply));
        }
        Ok(())
    }

    /// The profile's settings, or ProfileNotFound.
    async fn settings(&self) -> Result<MailProfileSpec, Failure> {
        let found = match &self.key {
            ProfileKey::Namespaced { namespace, name } => {
                let api: Api<MailProfile> = Api::namespaced(self.client.clone(), namespace);
                api.get_opt(name).await.map_err(|e| api_error(e.into()))?.map(|p| p.spec)
            }
            ProfileKey::Cluster { name } => {
                let api: Api<ClusterMailProfile> = Api::all(self.client.clone());
                api.get_opt(name).await.map_err(|e| api_error(e.into()))?.map(|p| p.spec.settings())
            }
        };
        found.ok_or_else(|| {
            NotReady { reason: "ProfileNotFound".into(), message: format!("{} not found", self.key) }.into()
        })
    }
}

fn api_error(e: crate::Error) -> Failure {
    Failure::Api(e.to_string())
}

fn smtp_failed(message: String) -> NotReady {
    NotReady { reason: "SmtpCheckFailed".into(), message }
}

fn send_failed(message: String) -> NotReady {
    NotReady { reason: "SendFailed".into(), message }
}

/// The token's expiry and roles; never the token.
pub fn describe_token(state: &TokenState, now: Timestamp) -> String {
    let mut out = String::new();
    if let Some(expires) = state.expires_at {
        let left = Duration::try_from(expires.duration_since(now)).unwrap_or_default();
        out.push_str(&format!("token: expires {expires} (in {})\n", super::human_duration(left)));
        let roles = if state.roles.is_empty() { "none".to_string() } else { state.roles.join(", ") };
        out.push_str(&format!("roles: {roles}\n"));
    }
    out
}

/// Which of Microsoft 365's two ways of authorising an app the check sees.
pub fn describe_authorization(role: &str, verdict: &PermissionVerdict) -> String {
    let line = match verdict.path {
        AuthorizationPath::EntraPermission => {
            format!("Microsoft Entra application permission {role} (in the token; tenant-wide)")
        }
        AuthorizationPath::ExchangeRbac => format!(
            "Exchange Online RBAC for Applications (the token carries no {role} role, and the message was accepted)"
        ),
        AuthorizationPath::Unknown => format!(
            "no {role} role in the token: Exchange Online RBAC for Applications decides per mailbox, if the app has a role assignment (--send-test MAILBOX proves it); otherwise {}",
            entra_remedy(role)
        ),
    };
    format!("authorisation: {line}\n")
}

/// What the SMTP server showed.
pub fn describe_probe(probe: &SmtpProbe) -> String {
    let mechanisms =
        if probe.auth_mechanisms.is_empty() { "none".to_string() } else { printable(&probe.auth_mechanisms.join(" ")) };
    let tls = if probe.encrypted { "encrypted" } else { "not encrypted" };
    let mut out = format!("greeting: {}\nauth mechanisms ({tls}): {mechanisms}\n", printable(&probe.greeting));
    if let Some(who) = &probe.authenticated_as {
        out.push_str(&format!("login: accepted for {who}\n"));
    }
    out
}

/// The test message `--send-test` sends.
pub fn test_message(key: &ProfileKey, from: Address, to: Address) -> OutgoingMessage {
    let id = message_id(&uuid::Uuid::new_v4().to_string(), &from.email);
    OutgoingMessage {
        from,
        to: vec![to],
        cc: Vec::new(),
        bcc: Vec::new(),
        reply_to: Vec::new(),
        subject: format!("mailroom profile check: {}", key.name()),
        text: Some(format!("This test message was sent by `mailroom profile check --send-test` through {key}.\n")),
        html: None,
        attachments: Vec::new(),
        headers: vec![("X-Mailroom-Check".to_string(), key.name().to_string())],
        importance: Default::default(),
        message_id: id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authorisation_path_is_named() {
        let entra = describe_authorization("Mail.Send", &verify_permissions("Mail.Send", &["Mail.Send".into()], None));
        assert!(entra.contains("Microsoft Entra application permission Mail.Send"), "{entra}");
        let unknown = describe_authorization("Mail.Send", &verify_permissions("Mail.Send", &[], None));
        assert!(unknown.contains("Exchange Online RBAC for Applications decides") && unknown.contains("--send-test"));
        let accepted =
            SendEvidence::Accepted { sender: "a@contoso.com".into(), at: Timestamp::from_second(0).unwrap() };
        let rbac =
            describe_authorization("SMTP.SendAsApp", &verify_permissions("SMTP.SendAsApp", &[], Some(&accepted)));
        assert!(rbac.starts_with("authorisation: Exchange Online RBAC for Applications"), "{rbac}");
    }

    #[test]
    fn token_description_never_has_the_token() {
        let now = Timestamp::from_second(1_000).unwrap();
        let state = TokenState {
            expires_at: Some(Timestamp::from_second(4_600).unwrap()),
            roles: vec!["Mail.Send".into()],
            ..Default::default()
        };
        let text = describe_token(&state, now);
        assert!(text.contains("(in 1h 0m)") && text.contains("roles: Mail.Send"), "{text}");
        let none = TokenState { roles: vec![], ..state };
        assert!(describe_token(&none, now).contains("roles: none"));
        assert_eq!(describe_token(&TokenState::default(), now), "");
    }

    #[test]
    fn probe_description() {
        let probe = SmtpProbe {
            greeting: "220 mx ESMTP".into(),
            encrypted: true,
            auth_mechanisms: vec!["PLAIN".into(), "LOGIN".into()],
            authenticated_as: Some("mailer".into()),
        };
        let text = describe_probe(&probe);
        assert!(text.contains("greeting: 220 mx ESMTP"), "{text}");
        assert!(text.contains("auth mechanisms (encrypted): PLAIN LOGIN"), "{text}");
        assert!(text.contains("login: accepted for mailer"), "{text}");
    }

    fn relay(extra: serde_json::Value) -> MailProfileSpec {
        let mut spec = serde_json::json!({
            "senders": {"default": "alerts@contoso.com", "allowed": ["*@noreply.contoso.com"]},
            "smtp": {"host": "relay.contoso.com", "port": 25},
        });
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(spec).expect("a MailProfile spec")
    }

    fn test_send(from: Option<&str>, to: &str) -> TestSend {
        TestSend { from: from.map(|f| parse_mailbox(f).unwrap()), to: parse_mailbox(to).unwrap() }
    }

    #[test]
    fn the_test_message_obeys_the_profiles_policy() {
        let key = ProfileKey::Namespaced { namespace: "team-a".into(), name: "relay".into() };
        let open = relay(serde_json::json!({}));
        let from = test_policy(&key, &open, &test_send(None, "anyone@fabrikam.com")).unwrap();
        assert_eq!(from.email, "alerts@contoso.com", "the default sender");
        let from = test_policy(&key, &open, &test_send(Some("CI <ci@noreply.contoso.com>"), "a@b.org")).unwrap();
        assert_eq!(from.email, "ci@noreply.contoso.com");
        let (reason, message) =
            test_policy(&key, &open, &test_send(Some("ceo@contoso.com"), "ops@contoso.com")).unwrap_err();
        assert_eq!(reason, Reason::SenderNotAllowed);
        assert_eq!(
            message,
            "sender ceo@contoso.com is not allowed by profile MailProfile team-a/relay \
             (allowed: *@noreply.contoso.com, alerts@contoso.com)"
        );

        let closed = relay(serde_json::json!({"recipientDomains": ["contoso.com"]}));
        assert!(test_policy(&key, &closed, &test_send(None, "ops@eu.contoso.com")).is_ok(), "a subdomain");
        let (reason, message) = test_policy(&key, &closed, &test_send(None, "Ann <ann@fabrikam.com>")).unwrap_err();
        assert_eq!(reason, Reason::RecipientDomainNotAllowed);
        assert!(message.contains("ann@fabrikam.com") && message.contains("(contoso.com)"), "{message}");
        // The sender is judged first, as the operator does.
        let (reason, _) = test_policy(&key, &closed, &test_send(Some("x@fabrikam.com"), "a@fabrikam.com")).unwrap_err();
        assert_eq!(reason, Reason::SenderNotAllowed);
    }

    #[test]
    fn from_needs_send_test() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: CheckArgs,
        }
        use clap::Parser;
        let err = Cli::try_parse_from(["check", "relay", "--from", "a@contoso.com"]).err().expect("refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let ok = Cli::try_parse_from(["check", "relay", "--send-test", "ops@contoso.com", "--from", "a@contoso.com"]);
        assert_eq!(ok.expect("parses").args.from.as_deref(), Some("a@contoso.com"));
    }

    #[test]
    fn the_test_message_names_the_profile() {
        let key = ProfileKey::Namespaced { namespace: "a".into(), name: "relay".into() };
        let m =
            test_message(&key, parse_mailbox("alerts@contoso.com").unwrap(), parse_mailbox("ops@contoso.com").unwrap());
        assert!(m.subject.contains("relay") && m.message_id.ends_with("@contoso.com>"), "{m:?}");
        assert_eq!(m.to[0].email, "ops@contoso.com");
    }
}
