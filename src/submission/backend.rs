//! The submission listener's decisions, taken from the Kubernetes API: who a login is (an
//! `SmtpCredential` and its Secret), what its profile allows, how fast it may submit, and the
//! EmailMessage (with the Secret holding its raw MIME) that an accepted mail becomes.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::reply::Reply;
use super::session::{Backend, Envelope};
use crate::api::{
    ClusterMailProfile, DEFAULT_RAW_KEY, EmailMessage, EmailMessageSpec, MailProfile, ProfileKind, RawMessage,
    RawSecretRef, Senders, SmtpCredential, message_secret,
};
use crate::delivery::policy;
use crate::transport::parse_mailbox;
use crate::transport::raw;

/// How long what was read from the API server is used before it is read again. A changed
/// password or a new credential takes effect within this time.
pub const FRESH_FOR: Duration = Duration::from_secs(10);

/// How long what was read is still used while the API server cannot be reached, so that a
/// client keeps authenticating and gets `451` for its mail (retried) rather than `454`.
pub const STALE_FOR: Duration = Duration::from_secs(600);

/// The label naming the SmtpCredential a message was submitted with.
pub const CREDENTIAL_LABEL: &str = "mailroom.dev/smtp-credential";

/// The label naming the message a raw-message Secret belongs to (as `mailroom send --eml`).
pub const RAW_SECRET_LABEL: &str = "mailroom.dev/raw-message-of";

/// A successful login.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The credential's namespace.
    pub namespace: String,
    /// The credential.
    pub credential: Arc<SmtpCredential>,
    /// Its profile's policy, or why it cannot be used now.
    profile: Result<ProfilePolicy, Reply>,
}

impl Grant {
    /// `namespace/name` of the credential.
    pub fn credential_name(&self) -> String {
        format!("{}/{}", self.namespace, self.credential.name_any())
    }
}

/// What a profile allows: senders and recipient domains.
#[derive(Clone, Debug)]
struct ProfilePolicy {
    name: String,
    senders: Senders,
    recipient_domains: Option<Vec<String>>,
}

/// A credential's Secret as last read: its username and the SHA-256 of its password (the
/// password itself is not kept).
#[derive(Clone)]
struct Login {
    username: String,
    password_sha256: [u8; 32],
}

struct Timed<T> {
    at: Instant,
    value: T,
}

impl<T> Timed<T> {
    fn fresh(&self) -> bool {
        self.at.elapsed() < FRESH_FOR
    }
    fn usable_when_unreachable(&self) -> bool {
        self.at.elapsed() < STALE_FOR
    }
}

#[derive(Default)]
struct Cache {
    credentials: Option<Timed<Arc<Vec<Arc<SmtpCredential>>>>>,
    logins: HashMap<(String, String), Timed<Option<Login>>>,
    profiles: HashMap<(String, String, String), Timed<Result<ProfilePolicy, Reply>>>,
}

/// The listener's backend on the Kubernetes API.
pub struct KubeBackend {
    client: Client,
    /// The only namespace served (`--namespace`); all when unset.
    namespace: Option<String>,
    cache: Mutex<Cache>,
    limiters: Mutex<HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>>,
}

fn unavailable(what: &str, e: &kube::Error) -> Reply {
    tracing::warn!(error = %e, "SMTP submission: {what}");
    Reply::new(454, "4.7.0", "temporary authentication failure: the Kubernetes API cannot be reached; try again later")
}

fn bad_login() -> Reply {
    Reply::new(535, "5.7.8", "authentication credentials invalid")
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl KubeBackend {
    /// A backend reading credentials in `namespace`, or in every namespace.
    pub fn new(client: Client, namespace: Option<String>) -> Self {
        KubeBackend { client, namespace, cache: Mutex::default(), limiters: Mutex::default() }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn credentials(&self) -> Result<Arc<Vec<Arc<SmtpCredential>>>, Reply> {
        if let Some(c) = self.cache().credentials.as_ref().filter(|c| c.fresh()) {
            return Ok(c.value.clone());
        }
        let api: Api<SmtpCredential> = match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                let value = Arc::new(list.items.into_iter().map(Arc::new).collect::<Vec<_>>());
                self.cache().credentials = Some(Timed { at: Instant::now(), value: value.clone() });
                Ok(value)
            }
            Err(e) => match self.cache().credentials.as_ref().filter(|c| c.usable_when_unreachable()) {
                Some(c) => Ok(c.value.clone()),
                None => Err(unavailable("listing SmtpCredentials", &e)),
            },
        }
    }

    /// The login of a credential's Secret; `None`: the Secret or a key is missing.
    async fn login(&self, namespace: &str, secret: &str) -> Result<Option<Login>, Reply> {
        let key = (namespace.to_string(), secret.to_string());
        if let Some(l) = self.cache().logins.get(&key).filter(|l| l.fresh()) {
            return Ok(l.value.clone());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(secret).await {
            Ok(found) => {
                let login = found.as_ref().and_then(|s| super::status::login_of(s).ok()).map(|(username, password)| {
                    Login { username: username.to_string(), password_sha256: sha256(password) }
                });
                self.cache().logins.insert(key, Timed { at: Instant::now(), value: login.clone() });
                Ok(login)
            }
            Err(e) => match self.cache().logins.get(&key).filter(|l| l.usable_when_unreachable()) {
                Some(l) => Ok(l.value.clone()),
                None => Err(unavailable("reading an SmtpCredential's Secret", &e)),
            },
        }
    }

    async fn profile(&self, namespace: &str, credential: &SmtpCredential) -> Result<ProfilePolicy, Reply> {
        let r = &credential.spec.profile_ref;
        let kind = r.kind();
        let key = (namespace.to_string(), format!("{kind:?}"), r.name.clone());
        if let Some(p) = self.cache().profiles.get(&key).filter(|p| p.fresh()) {
            return p.value.clone();
        }
        match self.read_profile(namespace, kind, &r.name).await {
            Ok(value) => {
                self.cache().profiles.insert(key, Timed { at: Instant::now(), value: value.clone() });
                value
            }
            Err(e) => match self.cache().profiles.get(&key).filter(|p| p.usable_when_unreachable()) {
                Some(p) => p.value.clone(),
                None => {
                    tracing::warn!(error = %e, "SMTP submission: reading a profile");
                    Err(api_unavailable())
                }
            },
        }
    }

    /// The profile's policy; the outer `Err` is the API's, the inner a reason the profile cannot
    /// be used now (a reply for MAIL FROM).
    async fn read_profile(
        &self,
        namespace: &str,
        kind: ProfileKind,
        name: &str,
    ) -> Result<Result<ProfilePolicy, Reply>, kube::Error> {
        let missing = |what: String| {
            Reply::new(451, "4.7.0", format!("{what} does not exist (yet); the mail is accepted once it does"))
        };
        match kind {
            ProfileKind::MailProfile => {
                let api: Api<MailProfile> = Api::namespaced(self.client.clone(), namespace);
                Ok(match api.get_opt(name).await? {
                    Some(p) => Ok(ProfilePolicy {
                        name: format!("MailProfile {namespace}/{name}"),
                        senders: p.spec.senders,
                        recipient_domains: p.spec.recipient_domains,
                    }),
                    None => Err(missing(format!("MailProfile {namespace}/{name}"))),
                })
            }
            ProfileKind::ClusterMailProfile => {
                let api: Api<ClusterMailProfile> = Api::all(self.client.clone());
                let Some(p) = api.get_opt(name).await? else {
                    return Ok(Err(missing(format!("ClusterMailProfile {name}"))));
                };
                let ns: Api<Namespace> = Api::all(self.client.clone());
                let labels = ns.get(namespace).await?.metadata.labels.unwrap_or_default();
                let profile = format!("ClusterMailProfile {name}");
                if let Err(e) =
                    policy::check_namespace(&profile, p.spec.allowed_namespaces.as_ref(), namespace, &labels)
                {
                    return Ok(Err(Reply::new(550, "5.7.1", e.to_string())));
                }
                Ok(Ok(ProfilePolicy {
                    name: profile,
                    senders: p.spec.profile.senders,
                    recipient_domains: p.spec.profile.recipient_domains,
                }))
            }
        }
    }

    fn limiter(&self, grant: &Grant) -> Arc<DefaultDirectRateLimiter> {
        let per_minute = grant.credential.spec.messages_per_minute();
        let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        let key = grant.credential_name();
        match limiters.get(&key) {
            Some((n, l)) if *n == per_minute => l.clone(),
            _ => {
                let n = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
                let limiter = Arc::new(RateLimiter::direct(Quota::per_minute(n)));
                limiters.insert(key, (per_minute, limiter.clone()));
                limiter
            }
        }
    }
}

fn api_unavailable() -> Reply {
    Reply::new(451, "4.3.0", "the Kubernetes API cannot be reached; nothing was accepted, try again later")
}

#[async_trait::async_trait]
impl Backend for KubeBackend {
    type Grant = Grant;

    async fn authenticate(&self, username: &str, password: &[u8]) -> Result<Grant, Reply> {
        let credentials = self.credentials().await?;
        let logins = futures::stream::iter(credentials.iter().cloned())
            .map(|c| async move {
                let ns = c.namespace().unwrap_or_default();
                let login = self.login(&ns, &c.spec.secret_ref.name).await?;
                Ok::<_, Reply>((c, login))
            })
            .buffer_unordered(8)
            .try_collect::<Vec<_>>()
            .await?;
        let matching: Vec<_> =
            logins.into_iter().filter_map(|(c, l)| l.filter(|l| l.username == username).map(|l| (c, l))).collect();
        let (credential, login) = match matching.as_slice() {
            [one] => one.clone(),
            [] => return Err(bad_login()),
            many => {
                let names: Vec<_> = many
                    .iter()
                    .map(|(c, _)| format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()))
                    .collect();
                tracing::warn!(credentials = ?names, "SMTP submission: a username is claimed by more than one SmtpCredential; it authenticates none of them");
                return Err(bad_login());
            }
        };
        let presented = sha256(crate::alerts::auth::stored_token(password));
        if !bool::from(presented.ct_eq(&login.password_sha256)) {
            return Err(bad_login());
        }
        let namespace = credential.namespace().unwrap_or_default();
        let profile = self.profile(&namespace, &credential).await;
        Ok(Grant { namespace, credential, profile })
    }

    async fn mail_from(&self, grant: &Grant, from: &str) -> Result<(), Reply> {
        let profile = grant.profile.as_ref().map_err(Clone::clone)?;
        let address = parse_mailbox(from).map_err(|e| Reply::new(501, "5.1.7", format!("bad sender address: {e}")))?;
        policy::check_sender(&profile.name, &profile.senders, &address.email)
            .map_err(|e| Reply::new(550, "5.7.1", e.to_string()))?;
        if self.limiter(grant).check().is_err() {
            return Err(Reply::new(
                451,
                "4.7.1",
                format!(
                    "SmtpCredential {} may submit {} messages per minute; try again later",
                    grant.credential_name(),
                    grant.credential.spec.messages_per_minute()
                ),
            ));
        }
        Ok(())
    }

    fn rcpt_to(&self, grant: &Grant, to: &str) -> Result<(), Reply> {
        let profile = grant.profile.as_ref().map_err(Clone::clone)?;
        let address = parse_mailbox(to).map_err(|e| Reply::new(501, "5.1.3", format!("bad recipient address: {e}")))?;
        policy::check_recipients(&profile.name, profile.recipient_domains.as_deref(), [address.email.as_str()])
            .map_err(|e| Reply::new(550, "5.7.1", format!("relaying denied: {e}")))
    }

    async fn accept(&self, grant: &Grant, envelope: &Envelope, data: Vec<u8>) -> Result<String, Reply> {
        let profile = grant.profile.as_ref().map_err(Clone::clone)?;
        let parsed =
            raw::parse(&data).map_err(|e| Reply::new(554, "5.6.0", format!("the message cannot be sent: {e}")))?;
        for (field, a) in parsed.from.iter().map(|a| ("From", a)).chain(parsed.sender.iter().map(|a| ("Sender", a))) {
            policy::check_sender(&profile.name, &profile.senders, &a.email)
                .map_err(|e| Reply::new(550, "5.7.1", format!("the message's {field}: field: {e}")))?;
        }
        drop(parsed);
        let name = message_name(&grant.namespace, &grant.credential.name_any(), envelope, &data);
        let (message, secret) = submission_objects(grant, envelope, &name, data);
        store(&self.client, &grant.namespace, message, secret).await?;
        tracing::info!(message = %format!("{}/{name}", grant.namespace), credential = %grant.credential_name(), recipients = envelope.recipients.len(), "SMTP submission accepted");
        Ok(format!("{}/{name}", grant.namespace))
    }
}

/// The name of the message a submission becomes: the credential's name and a digest of
/// everything submitted (credential, envelope, bytes). A client that retries after losing the
/// `250` (the operator died, the connection broke) submits the same mail and finds it already
/// there: one message, not two. Mail programs put a Date and Message-ID in every message, so
/// two mails sent on purpose differ.
pub fn message_name(namespace: &str, credential: &str, envelope: &Envelope, data: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [namespace.as_bytes(), credential.as_bytes(), envelope.from.as_bytes()] {
        h.update(part);
        h.update([0]);
    }
    for r in &envelope.recipients {
        h.update(r.as_bytes());
        h.update([0]);
    }
    h.update(data);
    let digest = h.finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let prefix: String = credential.chars().take(40).collect();
    format!("smtp-{}-{hex}", prefix.trim_end_matches(['-', '.']))
}

/// The EmailMessage and its raw-MIME Secret for an accepted mail.
pub fn submission_objects(grant: &Grant, envelope: &Envelope, name: &str, data: Vec<u8>) -> (EmailMessage, Secret) {
    let c = &grant.credential;
    let spec = EmailMessageSpec {
        profile_ref: c.spec.profile_ref.clone(),
        from: Some(envelope.from.clone()),
        to: envelope.recipients.clone(),
        cc: Vec::new(),
        bcc: Vec::new(),
        reply_to: Vec::new(),
        subject: String::new(),
        body: Default::default(),
        attachments: Vec::new(),
        raw: Some(RawMessage { secret_ref: RawSecretRef { name: name.to_string(), key: None } }),
        headers: BTreeMap::new(),
        importance: None,
        delivery: c.spec.delivery.clone(),
        template_ref: None,
        values: None,
        ttl_seconds_after_finished: Some(c.spec.ttl_seconds_after_finished()),
        idempotency_key: None,
        idempotency_retention_seconds: None,
    };
    let mut message = EmailMessage::new(name, spec);
    message.metadata.namespace = Some(grant.namespace.clone());
    message.metadata.labels = Some(BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), "mailroom".to_string()),
        (CREDENTIAL_LABEL.to_string(), c.name_any()),
    ]));
    let data = BTreeMap::from([(DEFAULT_RAW_KEY.to_string(), ByteString(data))]);
    let secret = message_secret(name.to_string(), &grant.namespace, RAW_SECRET_LABEL, data);
    (message, secret)
}

/// The reply for an API error while storing: the API server's refusal of the object is
/// permanent (`554`), anything else is `451` and the client tries again.
fn store_error(what: &str, e: kube::Error) -> Reply {
    match &e {
        kube::Error::Api(s) if s.code == 400 || s.code == 422 => {
            Reply::new(554, "5.6.0", format!("the Kubernetes API refused the {what}: {}", s.message))
        }
        _ => {
            tracing::warn!(error = %e, "SMTP submission: storing the {what}");
            api_unavailable()
        }
    }
}

fn already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Stores the Secret, then the message, then makes the message own the Secret. Each step
/// accepts what an earlier, interrupted submission of the same mail stored.
async fn store(client: &Client, namespace: &str, message: EmailMessage, secret: Secret) -> Result<(), Reply> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), namespace);
    let name = message.name_any();
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {}
        Err(e) if already_exists(&e) => {}
        Err(e) => return Err(store_error("Secret holding the message", e)),
    }
    let created = match messages.create(&PostParams::default(), &message).await {
        Ok(m) => m,
        Err(e) if already_exists(&e) => messages.get(&name).await.map_err(|e| store_error("EmailMessage", e))?,
        Err(e) => return Err(store_error("EmailMessage", e)),
    };
    let Some(owner) = created.owner_reference() else {
        return Err(api_unavailable());
    };
    let patch = json!({"metadata": {"ownerReferences": [owner]}});
    secrets
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| store_error("Secret's owner", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(from: &str, to: &[&str]) -> Envelope {
        Envelope { from: from.into(), recipients: to.iter().map(|s| s.to_string()).collect(), smtputf8: false }
    }

    #[test]
    fn the_same_submission_gets_the_same_name_and_any_difference_another() {
        let e = envelope("a@contoso.com", &["b@contoso.com"]);
        let n = message_name("team", "grafana", &e, b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(n, message_name("team", "grafana", &e, b"Subject: x\r\n\r\nhi\r\n"));
        assert!(n.starts_with("smtp-grafana-") && n.len() == "smtp-grafana-".len() + 16, "{n}");
        assert_ne!(n, message_name("team", "grafana", &e, b"Subject: y\r\n\r\nhi\r\n"));
        assert_ne!(n, message_name("other", "grafana", &e, b"Subject: x\r\n\r\nhi\r\n"));
        assert_ne!(
            n,
            message_name(
                "team",
                "grafana",
                &envelope("a@contoso.com", &["c@contoso.com"]),
                b"Subject: x\r\n\r\nhi\r\n"
            )
        );
        // Recipients are not merely concatenated.
        assert_ne!(
            message_name("t", "c", &envelope("a@x", &["ab@x", "c@x"]), b""),
            message_name("t", "c", &envelope("a@x", &["a", "b@xc@x"]), b"")
        );
    }

    #[test]
    fn a_long_credential_name_still_makes_a_label_value() {
        let long = "a".repeat(63);
        let n = message_name("t", &long, &envelope("a@x", &["b@x"]), b"");
        assert!(n.len() <= 63, "{}", n.len());
        let dashed = format!("{}-{}", "b".repeat(39), "cdef");
        let n = message_name("t", &dashed, &envelope("a@x", &["b@x"]), b"");
        assert!(!n.contains("--"), "{n}");
    }
}
