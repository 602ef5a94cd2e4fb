//! The Graph transport against a loopback mock of Graph.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::jiff::Timestamp;
use mailroom::auth::{AccessToken, AuthError, TokenSource};
use mailroom::tls::TrustRoots;
use mailroom::transport::Importance;
use mailroom::transport::graph::{ANSWER_LIMIT, ECHO_LIMIT, GraphConfig, GraphTransport};
use mailroom::transport::{Acceptance, Address, AttachmentData, OutgoingMessage, SendError, Transport};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

#[path = "common/streamed_body.rs"]
mod streamed_body;

const SENDER: &str = "alerts@contoso.com";
const SEND_MAIL: &str = "/v1.0/users/alerts@contoso.com/sendMail";

/// Hands out `token-N`, where N counts the invalidations so far.
#[derive(Default)]
struct CountingTokens {
    invalidations: AtomicUsize,
    fail: Option<AuthError>,
}

#[async_trait]
impl TokenSource for CountingTokens {
    async fn token(&self) -> Result<AccessToken, AuthError> {
        if let Some(error) = &self.fail {
            return Err(error.clone());
        }
        Ok(AccessToken {
            secret: format!("token-{}", self.invalidations.load(Ordering::SeqCst)),
            expires_at: Timestamp::now(),
        })
    }

    fn invalidate(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
    }
}

fn transport(server: &MockServer, tokens: Arc<CountingTokens>, max: usize) -> GraphTransport {
    transport_at(&server.uri(), tokens, max)
}

fn transport_at(endpoint: &str, tokens: Arc<CountingTokens>, max: usize) -> GraphTransport {
    let config = GraphConfig {
        endpoint: endpoint.to_string(),
        save_to_sent_items: false,
        max_concurrent: max,
        allow_insecure: true,
    };
    let client = TrustRoots::default().http_client().expect("client");
    GraphTransport::new(config, tokens, client).expect("transport")
}

fn message() -> OutgoingMessage {
    OutgoingMessage {
        from: Address { name: None, email: SENDER.into() },
        to: vec![Address { name: Some("Ops".into()), email: "ops@contoso.com".into() }],
        cc: vec![],
        bcc: vec![],
        reply_to: vec![],
        subject: "Deploy finished".into(),
        text: Some("Version 1.4.2 is live.".into()),
        html: None,
        attachments: vec![],
        headers: vec![("X-Pipeline-Run".into(), "1234".into())],
        importance: Importance::Normal,
        message_id: "<uid-1@mailroom.dev>".into(),
    }
}

fn graph_error(status: u16, code: &str, text: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({"error": {"code": code, "message": text}}))
}

#[tokio::test]
async fn accepted_with_request_id() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .and(header("authorization", "Bearer token-0"))
        .and(header("content-type", "application/json"))
        .respond_with(ResponseTemplate::new(202).insert_header("request-id", "rid-1"))
        .expect(1)
        .mount(&server)
        .await;
    let tokens = Arc::new(CountingTokens::default());

    let delivered = transport(&server, tokens.clone(), 4).send(&message()).await.expect("sent");

    assert_eq!(delivered.response, "202 Accepted");
    assert_eq!(delivered.request_id.as_deref(), Some("rid-1"));
    // Accepted for delivery: Graph confirms no more than that.
    assert_eq!(delivered.acceptance, Acceptance::AcceptedForDelivery);
    let requests = server.received_requests().await.unwrap();
    let body: Value = requests[0].body_json().unwrap();
    assert_eq!(body["message"]["subject"], "Deploy finished");
    assert_eq!(body["message"]["internetMessageId"], "<uid-1@mailroom.dev>");
    assert_eq!(body["saveToSentItems"], false);
    assert_eq!(tokens.invalidations.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn throttled_is_transient_with_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .respond_with(
            graph_error(429, "ApplicationThrottled", "Too many requests")
                .insert_header("retry-after", "17")
                .insert_header("request-id", "rid-429"),
        )
        .mount(&server)
        .await;

    let err = transport(&server, Arc::default(), 4).send(&message()).await.unwrap_err();

    let SendError::Transient { reason, retry_after } = err else {
        panic!("429 must be transient: {err:?}");
    };
    assert_eq!(retry_after, Some(Duration::from_secs(17)));
    assert!(reason.starts_with("Graph 429 ApplicationThrottled"), "{reason}");
    assert!(reason.contains("request-id rid-429"), "{reason}");
}

#[tokio::test]
async fn unauthorized_once_invalidates_and_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .and(header("authorization", "Bearer token-0"))
        .respond_with(graph_error(401, "InvalidAuthenticationToken", "expired"))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .and(header("authorization", "Bearer token-1"))
        .respond_with(ResponseTemplate::new(202).insert_header("request-id", "rid-2"))
        .expect(1)
        .mount(&server)
        .await;
    let tokens = Arc::new(CountingTokens::default());

    let delivered = transport(&server, tokens.clone(), 4).send(&message()).await.expect("sent after one refresh");

    assert_eq!(delivered.request_id.as_deref(), Some("rid-2"));
    assert_eq!(tokens.invalidations.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unauthorized_twice_is_permanent_and_names_no_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .respond_with(graph_error(401, "InvalidAuthenticationToken", "Access token is empty."))
        .expect(2)
        .mount(&server)
        .await;
    let tokens = Arc::new(CountingTokens::default());

    let err = transport(&server, tokens.clone(), 4).send(&message()).await.unwrap_err();

    assert!(!err.is_transient());
    let reason = err.to_string();
    assert!(reason.starts_with("Graph 401 InvalidAuthenticationToken"), "{reason}");
    assert!(!reason.contains("token-"), "{reason}");
    assert_eq!(tokens.invalidations.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn send_as_denied_is_permanent_with_the_code() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .respond_with(graph_error(403, "ErrorSendAsDenied", "Access is denied.").insert_header("request-id", "rid-403"))
        .mount(&server)
        .await;

    let err = transport(&server, Arc::default(), 4).send(&message()).await.unwrap_err();

    let SendError::Denied { reason } = err else {
        panic!("403 ErrorSendAsDenied must be a permanent denial: {err:?}");
    };
    assert!(reason.starts_with("Graph 403 ErrorSendAsDenied: Access is denied."), "{reason}");
    assert!(reason.contains("application access policy"), "{reason}");
    assert!(reason.contains("request-id rid-403"), "{reason}");
}

#[tokio::test]
async fn token_errors_send_nothing() {
    let server = MockServer::start().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(202)).expect(0).mount(&server).await;
    let rejected = Arc::new(CountingTokens {
        fail: Some(AuthError::Rejected("AADSTS7000215: Invalid client secret provided.".into())),
        ..Default::default()
    });
    let err = transport(&server, rejected, 4).send(&message()).await.unwrap_err();
    assert_eq!(err, SendError::permanent("AADSTS7000215: Invalid client secret provided."));

    let unavailable = Arc::new(CountingTokens {
        fail: Some(AuthError::Unavailable("token endpoint answered 503".into())),
        ..Default::default()
    });
    let err = transport(&server, unavailable, 4).send(&message()).await.unwrap_err();
    assert!(err.is_transient());
}

#[tokio::test]
async fn network_error_is_transient() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let config = GraphConfig { endpoint, allow_insecure: true, ..GraphConfig::default() };
    let client = TrustRoots::default().http_client().unwrap();
    let transport = GraphTransport::new(config, Arc::new(CountingTokens::default()), client).unwrap();

    let err = transport.send(&message()).await.unwrap_err();

    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().starts_with("Graph request failed"), "{err}");
}

#[tokio::test]
async fn six_headers_go_as_base64_mime() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .and(header("content-type", "text/plain"))
        .respond_with(ResponseTemplate::new(202))
        .expect(1)
        .mount(&server)
        .await;
    let mut msg = message();
    msg.headers = (0..6).map(|i| (format!("X-Custom-{i}"), format!("{i}"))).collect();

    transport(&server, Arc::default(), 4).send(&msg).await.expect("sent");

    let requests = server.received_requests().await.unwrap();
    let mime = BASE64.decode(&requests[0].body).expect("base64 body");
    let parsed = mail_parser::MessageParser::default().parse(&mime).expect("RFC 5322");
    assert_eq!(parsed.subject(), Some("Deploy finished"));
    assert_eq!(parsed.message_id(), Some("uid-1@mailroom.dev"));
    assert_eq!(parsed.header_raw("X-Custom-5").map(str::trim), Some("5"));
}

/// Answers upload chunks as Graph does: 202 until the last byte, then 201.
struct UploadResponder;

impl Respond for UploadResponder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let range = request.headers.get("content-range").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let last = range.strip_prefix("bytes ").and_then(|r| r.split_once('/')).and_then(|(span, total)| {
            let end: u64 = span.split_once('-')?.1.parse().ok()?;
            Some(end + 1 == total.parse::<u64>().ok()?)
        });
        match last {
            Some(true) => ResponseTemplate::new(201).set_body_json(json!({"id": "att-1"})),
            Some(false) => ResponseTemplate::new(202).set_body_json(json!({"nextExpectedRanges": []})),
            None => ResponseTemplate::new(400),
        }
    }
}

const MESSAGES: &str = "/v1.0/users/alerts@contoso.com/messages";
const DRAFT: &str = "/v1.0/users/alerts@contoso.com/messages/AAMk%3D%3D";

async fn mount_draft(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .and(header("authorization", "Bearer token-0"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "AAMk=="})))
        .expect(1)
        .mount(server)
        .await;
    let upload_url = format!("{}/upload/session-1?authtoken=upload-secret", server.uri());
    Mock::given(method("POST"))
        .and(path(format!("{DRAFT}/attachments/createUploadSession")))
        .and(header("authorization", "Bearer token-0"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "uploadUrl": upload_url,
            "expirationDateTime": "2030-01-01T00:00:00Z",
        })))
        .expect(1)
        .mount(server)
        .await;
}

fn big_attachment() -> AttachmentData {
    AttachmentData {
        name: "report.bin".into(),
        content_type: "application/octet-stream".into(),
        bytes: (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect(),
    }
}

#[tokio::test]
async fn five_megabytes_go_through_a_draft_and_an_upload_session() {
    let server = MockServer::start().await;
    mount_draft(&server).await;
    Mock::given(method("PUT"))
        .and(path("/upload/session-1"))
        .respond_with(UploadResponder)
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("{DRAFT}/send")))
        .and(header("authorization", "Bearer token-0"))
        .respond_with(ResponseTemplate::new(202).insert_header("request-id", "rid-send"))
        .expect(1)
        .mount(&server)
        .await;
    let small =
        AttachmentData { name: "hello.txt".into(), content_type: "text/plain".into(), bytes: b"hello\n".to_vec() };
    let mut msg = message();
    msg.attachments = vec![small, big_attachment()];

    let delivered = transport(&server, Arc::default(), 4).send(&msg).await.expect("sent");

    assert_eq!(delivered.response, "202 Accepted");
    assert_eq!(delivered.request_id.as_deref(), Some("rid-send"));
    let requests = server.received_requests().await.unwrap();
    let draft: Value = requests[0].body_json().unwrap();
    assert_eq!(draft["internetMessageId"], "<uid-1@mailroom.dev>");
    assert_eq!(draft["attachments"].as_array().unwrap().len(), 1);
    assert_eq!(draft["attachments"][0]["name"], "hello.txt");
    let session: Value = requests[1].body_json().unwrap();
    assert_eq!(
        session,
        json!({"AttachmentItem": {
            "attachmentType": "file",
            "name": "report.bin",
            "size": 5_242_880,
            "contentType": "application/octet-stream",
        }})
    );
    let puts: Vec<&Request> = requests.iter().filter(|r| r.method.as_str() == "PUT").collect();
    let ranges: Vec<&str> = puts.iter().map(|r| r.headers.get("content-range").unwrap().to_str().unwrap()).collect();
    assert_eq!(ranges, ["bytes 0-3932159/5242880", "bytes 3932160-5242879/5242880"]);
    for put in &puts {
        assert!(put.headers.get("authorization").is_none(), "no token on upload");
        assert_eq!(put.url.query(), Some("authtoken=upload-secret"));
    }
    let uploaded: Vec<u8> = puts.iter().flat_map(|r| r.body.clone()).collect();
    assert!(uploaded == big_attachment().bytes, "the chunks are the attachment");
    assert_eq!(requests.last().unwrap().url.path(), format!("{DRAFT}/send"));
}

#[tokio::test]
async fn failed_upload_deletes_the_draft() {
    let server = MockServer::start().await;
    mount_draft(&server).await;
    Mock::given(method("PUT"))
        .and(path("/upload/session-1"))
        .respond_with(graph_error(503, "ServiceUnavailable", "try later").insert_header("retry-after", "5"))
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path(DRAFT))
        .and(header("authorization", "Bearer token-0"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let mut msg = message();
    msg.attachments = vec![big_attachment()];

    let err = transport(&server, Arc::default(), 4).send(&msg).await.unwrap_err();

    let SendError::Transient { reason, retry_after } = err else {
        panic!("503 must be transient: {err:?}");
    };
    assert_eq!(retry_after, Some(Duration::from_secs(5)));
    assert!(reason.starts_with("uploading attachment \"report.bin\": Graph 503 ServiceUnavailable"), "{reason}");
    assert!(!reason.contains("upload-secret"), "{reason}");
}

/// Notes when each request arrived; every answer takes `DELAY`.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Instant>>>);

const DELAY: Duration = Duration::from_millis(300);

impl Respond for Arrivals {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.0.lock().unwrap().push(Instant::now());
        ResponseTemplate::new(202).set_delay(DELAY)
    }
}

impl Arrivals {
    /// The most requests whose answers were pending at one moment. A request is pending
    /// from its arrival until `DELAY` later, when the mock answers it.
    fn max_in_flight(&self) -> usize {
        let arrivals = self.0.lock().unwrap();
        arrivals.iter().map(|&t| arrivals.iter().filter(|&&s| s <= t && t < s + DELAY).count()).max().unwrap_or(0)
    }
}

#[tokio::test]
async fn at_most_four_requests_in_flight_per_mailbox() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(method("POST")).and(path(SEND_MAIL)).respond_with(arrivals.clone()).expect(10).mount(&server).await;
    let transport = Arc::new(transport(&server, Arc::default(), 4));

    let sends = (0..10).map(|_| {
        let transport = transport.clone();
        tokio::spawn(async move { transport.send(&message()).await })
    });
    for send in futures::future::join_all(sends).await {
        send.expect("task").expect("sent");
    }

    assert_eq!(arrivals.max_in_flight(), 4);
}

#[tokio::test]
async fn utf8_text_attachments_are_sent_with_their_charset() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .respond_with(ResponseTemplate::new(202))
        .expect(1)
        .mount(&server)
        .await;
    let mut msg = message();
    msg.attachments = vec![
        AttachmentData {
            name: "greeting.txt".into(), content_type: "text/plain".into(), bytes: "Grüße ✅\n".into()
        },
        AttachmentData {
            name: "latin1.txt".into(),
            content_type: "text/plain".into(),
            bytes: b"Gr\xfc\xdfe\n".to_vec(),
        },
        AttachmentData {
            name: "legacy.csv".into(),
            content_type: "text/csv; charset=windows-1252".into(),
            bytes: b"a,b\n".to_vec(),
        },
    ];

    transport(&server, Arc::default(), 4).send(&msg).await.expect("sent");

    let requests = server.received_requests().await.unwrap();
    let body: Value = requests[0].body_json().unwrap();
    let types: Vec<&str> =
        body["message"]["attachments"].as_array().unwrap().iter().map(|a| a["contentType"].as_str().unwrap()).collect();
    assert_eq!(types, ["text/plain; charset=utf-8", "text/plain", "text/csv; charset=windows-1252"]);
    let bytes = BASE64.decode(body["message"]["attachments"][0]["contentBytes"].as_str().unwrap()).unwrap();
    assert_eq!(String::from_utf8(bytes).unwrap(), "Grüße ✅\n");
}

#[tokio::test]
async fn utf8_text_attachments_keep_their_charset_in_mime_mode() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(SEND_MAIL))
        .respond_with(ResponseTemplate::new(202))
        .expect(1)
        .mount(&server)
        .await;
    let mut msg = message();
    msg.headers = (0..6).map(|i| (format!("X-Custom-{i}"), format!("{i}"))).collect();
    msg.attachments = vec![AttachmentData {
        name: "greeting.txt".into(),
        content_type: "text/plain".into(),
        bytes: "Grüße ✅".into(),
    }];

    transport(&server, Arc::default(), 4).send(&msg).await.expect("sent");

    let requests = server.received_requests().await.unwrap();
    let mime = BASE64.decode(&requests[0].body).expect("base64 body");
    let parsed = mail_parser::MessageParser::default().parse(&mime).expect("RFC 5322");
    let attachment = parsed.attachment(0).expect("the attachment");
    use mail_parser::MimeHeaders as _;
    assert_eq!(attachment.content_type().and_then(|c| c.attribute("charset")), Some("utf-8"));
    assert_eq!(attachment.text_contents(), Some("Grüße ✅"));
}

/// Waits for the streaming server to see the client hang up, and returns what it wrote.
async fn written(server: tokio::task::JoinHandle<u64>) -> u64 {
    tokio::time::timeout(Duration::from_secs(60), server).await.expect("the client hung up").expect("server")
}

#[tokio::test]
async fn an_error_body_over_the_cap_is_not_read_and_the_status_decides() {
    let (endpoint, server) = streamed_body::serve("503 Service Unavailable", streamed_body::FIFTY_MIB).await;

    let err = transport_at(&endpoint, Arc::default(), 4).send(&message()).await.unwrap_err();

    let SendError::Transient { reason, .. } = err else {
        panic!("a 503 stays transient whatever its body: {err:?}");
    };
    assert!(reason.starts_with("Graph 503"), "{reason}");
    assert!(reason.contains(&format!("over {ANSWER_LIMIT} bytes and was not read")), "{reason}");
    // Reading stopped at the cap: the server could not write the 50 MiB before the client left.
    assert!(written(server).await < streamed_body::FIFTY_MIB);
}

#[tokio::test]
async fn an_accepted_send_stays_accepted_when_its_body_passes_the_cap() {
    let (endpoint, server) = streamed_body::serve("202 Accepted", streamed_body::FIFTY_MIB).await;

    let delivered = transport_at(&endpoint, Arc::default(), 4).send(&message()).await.expect("Graph said 202");

    assert_eq!(delivered.response, "202 Accepted");
    assert!(written(server).await < streamed_body::FIFTY_MIB);
}

#[tokio::test]
async fn a_draft_answer_over_the_cap_fails_the_step_without_sending() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .respond_with(ResponseTemplate::new(201).set_body_bytes(vec![b' '; ECHO_LIMIT + 1]))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("{DRAFT}/send")))
        .respond_with(ResponseTemplate::new(202))
        .expect(0)
        .mount(&server)
        .await;
    let mut msg = message();
    msg.attachments = vec![big_attachment()];

    let err = transport(&server, Arc::default(), 4).send(&msg).await.unwrap_err();

    let SendError::Transient { reason, .. } = err else {
        panic!("an unreadable answer is the endpoint's fault, worth another attempt: {err:?}");
    };
    assert!(reason.starts_with("creating the draft: Graph answered 201 with a body over 16777216 bytes"), "{reason}");
}
