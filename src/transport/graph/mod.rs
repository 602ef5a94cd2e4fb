//! Microsoft Graph: `POST /v1.0/users/{sender}/sendMail` with an app-only token.
//!
//! A message goes as one `sendMail` request (JSON, or base64 MIME when its custom headers do
//! not fit Graph's JSON), or, when it is larger than one request may be, as a draft that gets
//! its attachments one request or upload session each and is then sent.

mod classify;
mod limiter;
mod request;
mod upload;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

pub use classify::{GraphApiError, classify, parse_retry_after};
pub use limiter::MailboxLimiter;
pub use request::{MAX_ATTACHMENT, MAX_INLINE_ATTACHMENT, MAX_JSON_HEADERS, MAX_REQUEST_BYTES, with_bcc_header};
pub use upload::{UPLOAD_CHUNK_SIZE, UPLOAD_CHUNK_UNIT, chunk_ranges};

use crate::auth::{AuthError, TokenSource};
use crate::response_body::{BodyError, read_capped};
use crate::transport::{
    Acceptance, AttachmentData, Delivered, OutgoingMessage, RawOutgoing, SendError, Transport, offload,
};
use request::{Draft, FileAttachment, Plan, UploadSession, segment};

/// The most of a Graph answer read when it carries little or nothing: an error (Graph's
/// `{"error":{"code","message","innerError"}}`), `sendMail`'s and `send`'s 202 ("It doesn't
/// return anything in the response body", https://learn.microsoft.com/graph/api/user-sendmail),
/// an upload session or the answer to one of its chunks (an upload URL and a few ranges).
/// 64 KiB is far more than any of them.
pub const ANSWER_LIMIT: usize = 64 * 1024;

/// The most of a Graph answer read when it echoes what was just created: a draft comes back as
/// the message with its body (https://learn.microsoft.com/graph/api/user-post-messages), an
/// added attachment with its `contentBytes`
/// (https://learn.microsoft.com/graph/api/message-post-attachments). Either is at most about one
/// request (4 MB, [`MAX_REQUEST_BYTES`]); 16 MiB leaves room for JSON escaping and the
/// properties Graph adds, and still bounds what a broken endpoint can make the operator hold.
pub const ECHO_LIMIT: usize = 4 * MAX_REQUEST_BYTES;

/// Microsoft Graph's service root in the global service (the national clouds have their own:
/// https://learn.microsoft.com/graph/deployments).
pub const DEFAULT_ENDPOINT: &str = "https://graph.microsoft.com";

/// Requests Graph runs at once for one app and mailbox: at most 4 concurrent requests
/// (https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits).
pub const MAILBOX_CONCURRENCY: u32 = 4;

/// How to reach Graph and how to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphConfig {
    /// Graph's base URL, without `/v1.0`.
    pub endpoint: String,
    /// Whether Graph keeps a copy in the sender's Sent Items (a message sent as a draft, or as
    /// MIME, always keeps one: Graph has no switch for those).
    pub save_to_sent_items: bool,
    /// Requests in flight per sender mailbox, at most.
    pub max_concurrent: usize,
    /// Accept a plain `http://` endpoint (local testing only).
    pub allow_insecure: bool,
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            save_to_sent_items: false,
            max_concurrent: MAILBOX_CONCURRENCY as usize,
            allow_insecure: false,
        }
    }
}

/// A Graph configuration that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GraphConfigError {
    /// The endpoint is not an absolute http(s) URL without query.
    #[error("Graph endpoint {endpoint:?} is not usable: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A plain-http endpoint without `allow_insecure`.
    #[error("Graph endpoint {0} uses plain http; it is accepted only with insecure endpoints allowed (local testing)")]
    Insecure(String),
}

/// Sends through Microsoft Graph, at most `max_concurrent` requests at once per sender mailbox.
pub struct GraphTransport {
    client: Arc<reqwest::Client>,
    endpoint: String,
    tokens: Arc<dyn TokenSource>,
    save_to_sent_items: bool,
    allow_insecure: bool,
    limiter: Arc<MailboxLimiter>,
}

impl std::fmt::Debug for GraphTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphTransport")
            .field("endpoint", &self.endpoint)
            .field("save_to_sent_items", &self.save_to_sent_items)
            .field("max_concurrent", &self.limiter.max())
            .finish_non_exhaustive()
    }
}

impl GraphTransport {
    /// A transport over `client` (build it with `TrustRoots::shared_http_client`).
    pub fn new(
        config: GraphConfig,
        tokens: Arc<dyn TokenSource>,
        client: impl Into<Arc<reqwest::Client>>,
    ) -> Result<Self, GraphConfigError> {
        let endpoint = validate_endpoint(&config.endpoint, config.allow_insecure)?;
        Ok(GraphTransport {
            client: client.into(),
            endpoint,
            tokens,
            save_to_sent_items: config.save_to_sent_items,
            allow_insecure: config.allow_insecure,
            limiter: Arc::new(MailboxLimiter::new(config.max_concurrent)),
        })
    }

    fn user_url(&self, sender: &str) -> String {
        format!("{}/v1.0/users/{}", self.endpoint, segment(sender))
    }

    /// One request to Graph with a bearer token; after a 401 the token is invalidated and
    /// the request repeated once per send (`auth` remembers whether that happened).
    /// At most `limit` bytes of a successful answer are read ([`ANSWER_LIMIT`] of an error).
    async fn call(
        &self,
        auth: &mut Reauthorized,
        method: Method,
        url: &str,
        content_type: &'static str,
        body: Bytes,
        limit: usize,
    ) -> Result<Answer, SendError> {
        loop {
            let token = self.tokens.token().await.map_err(token_error)?;
            let response = self
                .client
                .request(method.clone(), url)
                .bearer_auth(&token.secret)
                .header(CONTENT_TYPE, content_type)
                .body(body.clone())
                .send()
                .await
                .map_err(network_error)?;
            let answer = Answer::read(response, limit).await?;
            if answer.status.is_success() {
                return Ok(answer);
            }
            if answer.status == StatusCode::UNAUTHORIZED && !auth.0 {
                auth.0 = true;
                // Only this token: when several sends fail with it at once, a token another
                // one already fetched must survive, so they share one new request.
                self.tokens.invalidate_token(&token);
                continue;
            }
            return Err(answer.error());
        }
    }

    async fn send_mail(
        &self,
        auth: &mut Reauthorized,
        sender: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> Result<Delivered, SendError> {
        let url = format!("{}/sendMail", self.user_url(sender));
        let answer = self.call(auth, Method::POST, &url, content_type, body, ANSWER_LIMIT).await?;
        Ok(answer.delivered())
    }

    async fn send_draft(
        &self,
        auth: &mut Reauthorized,
        sender: &str,
        draft: Draft<'_>,
    ) -> Result<Delivered, SendError> {
        let url = format!("{}/messages", self.user_url(sender));
        let created = self
            .call(auth, Method::POST, &url, draft.content_type, draft.body.clone(), ECHO_LIMIT)
            .await
            .map_err(|e| in_step(e, "creating the draft"))
            .map_err(draft_permission_hint)?;
        let id = serde_json::from_slice::<Created>(created.body("creating the draft")?)
            .map_err(|_| SendError::transient("Graph created a draft but did not return its id"))?
            .id;
        let message_url = format!("{url}/{}", segment(&id));
        let result = self.complete_draft(auth, &message_url, &draft).await;
        if result.is_err() {
            // Best effort: a draft left behind is clutter in the sender's Drafts folder.
            let deleted =
                self.call(auth, Method::DELETE, &message_url, request::JSON, Bytes::new(), ANSWER_LIMIT).await;
            if let Err(e) = deleted {
                tracing::warn!(sender, error = %e, "could not delete the unsent Graph draft");
            }
        }
        result
    }

    async fn complete_draft(
        &self,
        auth: &mut Reauthorized,
        message_url: &str,
        draft: &Draft<'_>,
    ) -> Result<Delivered, SendError> {
        let attachments_url = format!("{message_url}/attachments");
        for attachment in &draft.attach {
            let step = format!("adding attachment {:?}", attachment.name);
            let body = offload::encode(|| request::to_json(&FileAttachment::new(attachment)))?;
            self.call(auth, Method::POST, &attachments_url, request::JSON, body, ECHO_LIMIT)
                .await
                .map_err(|e| in_step(e, &step))?;
        }
        for attachment in &draft.upload {
            let step = format!("uploading attachment {:?}", attachment.name);
            self.upload(auth, &attachments_url, attachment).await.map_err(|e| in_step(e, &step))?;
        }
        let url = format!("{message_url}/send");
        let answer = self
            .call(auth, Method::POST, &url, request::JSON, Bytes::new(), ANSWER_LIMIT)
            .await
            .map_err(|e| in_step(e, "sending the draft"))?;
        Ok(answer.delivered())
    }

    /// Uploads one attachment through an upload session. The upload URL carries its own
    /// authorization, so neither the token nor that URL may appear anywhere.
    async fn upload(
        &self,
        auth: &mut Reauthorized,
        attachments_url: &str,
        attachment: &AttachmentData,
    ) -> Result<(), SendError> {
        let url = format!("{attachments_url}/createUploadSession");
        let body = request::to_json(&UploadSession::new(attachment))?;
        let session = self.call(auth, Method::POST, &url, request::JSON, body, ANSWER_LIMIT).await?;
        let upload_url = serde_json::from_slice::<Session>(session.body("creating the upload session")?)
            .ok()
            .and_then(|s| Url::parse(&s.upload_url).ok())
            .ok_or_else(|| SendError::transient("Graph returned no usable upload URL"))?;
        match upload_url.scheme() {
            "https" => {}
            "http" if self.allow_insecure => {}
            _ => {
                return Err(SendError::permanent("Graph returned an upload URL that is not https"));
            }
        }
        let total = attachment.bytes.len();
        for range in chunk_ranges(total, UPLOAD_CHUNK_SIZE) {
            let chunk = Bytes::copy_from_slice(&attachment.bytes[range.clone()]);
            let response = self
                .client
                .put(upload_url.clone())
                .header(CONTENT_RANGE, upload::content_range(&range, total))
                .body(chunk)
                .send()
                .await
                .map_err(network_error)?;
            let answer = Answer::read(response, ANSWER_LIMIT).await?;
            if !answer.status.is_success() {
                return Err(answer.error());
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for GraphTransport {
    async fn send(&self, message: &OutgoingMessage) -> Result<Delivered, SendError> {
        let plan = offload::encode(|| request::plan(message, self.save_to_sent_items))?;
        let sender = message.from.email.as_str();
        let _slot = self.limiter.acquire(sender).await;
        let mut auth = Reauthorized::default();
        let delivered = match plan {
            Plan::SendMail { content_type, body } => self.send_mail(&mut auth, sender, content_type, body).await,
            Plan::Draft(draft) => self.send_draft(&mut auth, sender, draft).await,
        }?;
        tracing::debug!(
            sender,
            request_id = delivered.request_id.as_deref().unwrap_or(""),
            "Graph accepted the message"
        );
        Ok(delivered)
    }

    /// `sendMail` in MIME format: `Content-Type: text/plain` and the message in base64
    /// (https://learn.microsoft.com/graph/api/user-sendmail, example 4;
    /// https://learn.microsoft.com/graph/outlook-send-mime-message). Graph takes the recipients
    /// from the header fields, so the hidden ones go into its `Bcc:` ([`RawOutgoing::for_graph`]);
    /// a MIME message is always saved to Sent Items (Graph has no switch for it).
    async fn send_raw(&self, message: &RawOutgoing) -> Result<Delivered, SendError> {
        let body = offload::encode(|| raw_request(message))?;
        let sender = message.envelope_from.email.as_str();
        let _slot = self.limiter.acquire(sender).await;
        let mut auth = Reauthorized::default();
        let delivered = self.send_mail(&mut auth, sender, request::MIME, body).await?;
        tracing::debug!(
            sender,
            request_id = delivered.request_id.as_deref().unwrap_or(""),
            "Graph accepted the raw message"
        );
        Ok(delivered)
    }
}

/// The MIME `sendMail` body of a raw message, refused when over Graph's 4 MB: "S/MIME message
/// payloads are currently limited to 4 MB. Submission attempts that exceed this limit will result
/// in an HTTP 413 Request Entity Too Large" (https://learn.microsoft.com/graph/api/user-post-messages),
/// and no request may be larger.
pub fn raw_request(message: &RawOutgoing) -> Result<Bytes, SendError> {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(message.for_graph());
    if body.len() > MAX_REQUEST_BYTES {
        return Err(SendError::permanent(format!(
            "the raw message is {} bytes in base64, over the {MAX_REQUEST_BYTES} bytes (4 MB) that Graph accepts for a MIME message",
            body.len()
        )));
    }
    Ok(Bytes::from(body))
}

/// Whether this send already retried after a 401.
#[derive(Default)]
struct Reauthorized(bool);

/// A response, its body read up to a cap.
struct Answer {
    status: StatusCode,
    request_id: Option<String>,
    retry_after: Option<std::time::Duration>,
    body: AnswerBody,
}

/// The body of an answer, or the cap it passed.
enum AnswerBody {
    Read(Bytes),
    /// Larger than this many bytes: reading stopped there.
    TooLarge(usize),
}

impl Answer {
    /// Reads the status, the headers and at most `limit` bytes of body (of an error, at most
    /// [`ANSWER_LIMIT`]). A body over the cap is not an error by itself: the status still says
    /// what happened, and only a step that needs the body fails for it (see [`Answer::body`]).
    async fn read(response: reqwest::Response, limit: usize) -> Result<Self, SendError> {
        let status = response.status();
        let headers = response.headers();
        let request_id = header(headers, "request-id");
        let retry_after = header(headers, RETRY_AFTER.as_str()).and_then(|v| parse_retry_after(&v, SystemTime::now()));
        let limit = if status.is_success() { limit } else { ANSWER_LIMIT.min(limit) };
        let body = match read_capped(response, limit).await {
            Ok(bytes) => AnswerBody::Read(bytes),
            Err(BodyError::TooLarge { limit }) => {
                tracing::warn!(status = status.as_u16(), limit, "Graph answered with a body over the cap; not read");
                AnswerBody::TooLarge(limit)
            }
            Err(BodyError::Read(e)) => return Err(network_error(e)),
        };
        Ok(Answer { status, request_id, retry_after, body })
    }

    /// The body of a successful answer whose content a step needs (a draft's id, an upload
    /// URL). Over the cap it is no answer Graph gives: transient, like an answer without the
    /// field, since the endpoint (or a proxy in front of it) is at fault, not the message, and
    /// `maxAttempts` bounds the retries.
    fn body(&self, step: &str) -> Result<&[u8], SendError> {
        match &self.body {
            AnswerBody::Read(bytes) => Ok(bytes),
            AnswerBody::TooLarge(limit) => Err(SendError::transient(format!(
                "{step}: Graph answered {} with a body over {limit} bytes, more than such an answer can be; it was not read",
                self.status.as_u16()
            ))),
        }
    }

    /// A success needs no body: `sendMail` and `send` answer 202 with none. Even when one comes
    /// over the cap, the status is Graph's word that it accepted the message: failing here would
    /// send it again or call an accepted message failed.
    fn delivered(self) -> Delivered {
        Delivered {
            acceptance: Acceptance::AcceptedForDelivery,
            response: format!("{} {}", self.status.as_u16(), self.status.canonical_reason().unwrap_or_default())
                .trim_end()
                .to_string(),
            request_id: self.request_id,
            rejected: Vec::new(),
        }
    }

    /// An error answer, judged by its status (429 and 5xx stay transient, with their
    /// Retry-After, whatever the size of the body).
    fn error(&self) -> SendError {
        let error = match &self.body {
            AnswerBody::Read(bytes) => GraphApiError::from_body(bytes),
            AnswerBody::TooLarge(limit) => GraphApiError {
                code: String::new(),
                message: format!("the error body is over {limit} bytes and was not read"),
            },
        };
        classify(self.status.as_u16(), &error, self.request_id.as_deref(), self.retry_after)
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

#[derive(Deserialize)]
struct Session {
    #[serde(rename = "uploadUrl")]
    upload_url: String,
}

fn validate_endpoint(endpoint: &str, allow_insecure: bool) -> Result<String, GraphConfigError> {
    let invalid =
        |reason: &str| GraphConfigError::InvalidEndpoint { endpoint: endpoint.to_string(), reason: reason.to_string() };
    let url = Url::parse(endpoint.trim()).map_err(|e| invalid(&e.to_string()))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(invalid("no query, fragment or user info allowed"));
    }
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure => {}
        "http" => return Err(GraphConfigError::Insecure(url.to_string())),
        _ => return Err(invalid("the scheme must be https")),
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// A token failure: refused credentials are permanent, an unreachable endpoint is not.
fn token_error(error: AuthError) -> SendError {
    match error {
        AuthError::Unavailable(words) => SendError::transient(words),
        AuthError::Rejected(words) | AuthError::Credential(words) => SendError::permanent(words),
    }
}

/// A network failure, described without the URL (an upload URL carries a credential).
fn network_error(error: reqwest::Error) -> SendError {
    let error = error.without_url();
    let mut reason = format!("Graph request failed: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    SendError::transient(reason)
}

/// Says which step of a draft send failed.
fn in_step(error: SendError, step: &str) -> SendError {
    map_reason(error, |reason| format!("{step}: {reason}"))
}

/// Creating a draft needs Mail.ReadWrite, which an app made for `sendMail` often lacks.
fn draft_permission_hint(error: SendError) -> SendError {
    if !error.to_string().contains("ErrorAccessDenied") {
        return error;
    }
    map_reason(error, |reason| {
        format!(
            "{reason}; a message over 4 MB is sent as a draft, which also needs the \
             Mail.ReadWrite application permission"
        )
    })
}

fn map_reason(error: SendError, f: impl FnOnce(String) -> String) -> SendError {
    match error {
        SendError::Transient { reason, retry_after } => SendError::Transient { reason: f(reason), retry_after },
        SendError::Permanent { reason } => SendError::Permanent { reason: f(reason) },
        SendError::Denied { reason } => SendError::Denied { reason: f(reason) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_default_is_graph() {
        let config = GraphConfig::default();
        assert_eq!(config.endpoint, "https://graph.microsoft.com");
        assert_eq!(config.max_concurrent, 4);
        assert_eq!(validate_endpoint(&config.endpoint, false).unwrap(), "https://graph.microsoft.com");
    }

    #[test]
    fn endpoint_trailing_slash_and_path_prefix() {
        assert_eq!(validate_endpoint("https://graph.microsoft.us/", false).unwrap(), "https://graph.microsoft.us");
        assert_eq!(validate_endpoint("https://proxy.example/graph/", false).unwrap(), "https://proxy.example/graph");
    }

    #[test]
    fn plain_http_needs_allow_insecure() {
        assert!(matches!(validate_endpoint("http://127.0.0.1:8080", false), Err(GraphConfigError::Insecure(_))));
        assert_eq!(validate_endpoint("http://127.0.0.1:8080", true).unwrap(), "http://127.0.0.1:8080");
    }

    #[test]
    fn unusable_endpoints() {
        for bad in [
            "graph.microsoft.com",
            "ftp://graph.microsoft.com",
            "https://graph.microsoft.com/?x=1",
            "https://user@graph.microsoft.com",
            "",
        ] {
            assert!(matches!(validate_endpoint(bad, true), Err(GraphConfigError::InvalidEndpoint { .. })), "{bad}");
        }
    }

    #[test]
    fn token_errors() {
        assert_eq!(
            token_error(AuthError::Rejected("AADSTS7000215: Invalid client secret".into())),
            SendError::permanent("AADSTS7000215: Invalid client secret")
        );
        assert!(token_error(AuthError::Unavailable("503".into())).is_transient());
        assert!(!token_error(AuthError::Credential("no key".into())).is_transient());
    }

    /// Hands out `token-N` (N = tokens dropped so far) and records what was dropped.
    #[derive(Default)]
    struct RecordingTokens {
        dropped: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait]
    impl TokenSource for RecordingTokens {
        async fn token(&self) -> Result<crate::auth::AccessToken, AuthError> {
            let n = self.dropped.lock().expect("lock").len();
            Ok(crate::auth::AccessToken { secret: format!("token-{n}"), expires_at: k8s_openapi::jiff::Timestamp::MAX })
        }
        fn invalidate(&self) {
            self.dropped.lock().expect("lock").push("<any>".into());
        }
        fn invalidate_token(&self, token: &crate::auth::AccessToken) {
            self.dropped.lock().expect("lock").push(token.secret.clone());
        }
    }

    #[tokio::test]
    async fn a_401_drops_only_the_token_it_answered() {
        use wiremock::matchers::{header, method};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(header("authorization", "Bearer token-0"))
            .respond_with(ResponseTemplate::new(401))
            .mount(&server)
            .await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(202)).mount(&server).await;
        let tokens = Arc::new(RecordingTokens::default());
        let config = GraphConfig { endpoint: server.uri(), allow_insecure: true, ..GraphConfig::default() };
        let transport = GraphTransport::new(
            config,
            tokens.clone(),
            crate::tls::TrustRoots::default().http_client().expect("client"),
        )
        .expect("transport");
        let message = OutgoingMessage {
            from: crate::transport::Address { name: None, email: "a@contoso.com".into() },
            to: vec![crate::transport::Address { name: None, email: "b@contoso.com".into() }],
            cc: vec![],
            bcc: vec![],
            reply_to: vec![],
            subject: "s".into(),
            text: Some("t".into()),
            html: None,
            attachments: vec![],
            headers: vec![],
            importance: crate::transport::Importance::Normal,
            message_id: "<m@contoso.com>".into(),
        };
        transport.send(&message).await.expect("sent with the second token");
        assert_eq!(*tokens.dropped.lock().expect("lock"), ["token-0"]);
    }

    #[test]
    fn draft_access_denied_names_mail_read_write() {
        let denied = SendError::permanent("creating the draft: Graph 403 ErrorAccessDenied: no");
        assert!(
            draft_permission_hint(denied).to_string().ends_with("also needs the Mail.ReadWrite application permission")
        );
        let other = SendError::permanent("creating the draft: Graph 403 ErrorSendAsDenied: no");
        assert_eq!(draft_permission_hint(other.clone()), other);
    }

    #[test]
    fn step_prefix_keeps_retry_after() {
        let wait = Some(std::time::Duration::from_secs(3));
        let got = in_step(
            SendError::Transient { reason: "Graph 429".into(), retry_after: wait },
            "uploading attachment \"a\"",
        );
        assert_eq!(
            got,
            SendError::Transient { reason: "uploading attachment \"a\": Graph 429".into(), retry_after: wait }
        );
    }
}
