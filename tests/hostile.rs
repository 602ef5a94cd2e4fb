//! Hostile input: a table of malformed and malicious manifests against the real API server, one
//! operator, the SMTP test server and a plain-TCP trap. Each case is refused at apply with an
//! error that names the problem, or ends `Failed` (or waiting, or its profile `Ready=False`) with
//! its own reason and without an attempt; nothing of any case reaches a peer, and afterwards a
//! normal message still goes out through the same operator process.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, phase};
use kube::api::{Api, DynamicObject};
use kube::{Client, ResourceExt};
use mailroom::api::{EmailMessage, MailProfile, Phase, find_condition};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(45);
/// Marks every hostile message's content, so the peers' inboxes can be searched for it.
const MARK: &str = "hostile-case";

/// What must happen to a case.
#[derive(Clone, Debug)]
enum Expect {
    /// The API server refuses the create; its error contains every one of these.
    Rejected(&'static [&'static str]),
    /// The message ends `Failed` with this reason, the condition's message containing the text,
    /// and no attempt counted (nothing was handed to a transport).
    Failed(&'static str, &'static str),
    /// The message waits (phase Pending, condition Waiting) with this reason and text.
    Waiting(&'static str, &'static str),
}

/// One manifest.
struct Case {
    name: &'static str,
    /// Replaces top-level spec fields of the base message (null removes one).
    spec: Value,
    expect: Expect,
    /// The request body, when it must be bytes that JSON text cannot carry.
    raw: Option<Vec<u8>>,
    /// `fieldValidation=Strict` (what kubectl apply asks for), else the server prunes unknown fields.
    strict: bool,
}

fn case(name: &'static str, spec: Value, expect: Expect) -> Case {
    Case { name, spec, expect, raw: None, strict: true }
}

fn base_spec(name: &str) -> Value {
    json!({
        "profileRef": {"name": "relay"},
        "to": ["ops@contoso.com"],
        "subject": format!("{MARK} {name}"),
        "body": {"text": format!("{MARK} {name}")},
    })
}

fn manifest(ns: &str, name: &str, overrides: &Value) -> Value {
    let mut spec = base_spec(name);
    if let (Some(spec), Some(over)) = (spec.as_object_mut(), overrides.as_object()) {
        for (k, v) in over {
            if v.is_null() {
                spec.remove(k);
            } else {
                spec.insert(k.clone(), v.clone());
            }
        }
    }
    json!({
        "apiVersion": "mailroom.dev/v1alpha1",
        "kind": "EmailMessage",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

fn inline(name: &str) -> Value {
    json!([{"name": name, "contentType": "text/plain", "data": "aGVsbG8K"}])
}

fn many(n: usize, domain: &str) -> Value {
    Value::Array((0..n).map(|i| json!(format!("r{i}@{domain}"))).collect())
}

const CEL_TO: &str = "every address in to must be an RFC 5322 mailbox";

fn cases() -> Vec<Case> {
    use Expect::*;
    let long_name = "a".repeat(300);
    let ten_mb = "x".repeat(10 * 1024 * 1024);
    let headers_31: BTreeMap<String, String> = (0..31).map(|i| (format!("X-H{i}"), "v".to_string())).collect();
    let mut v = vec![
        // --- header injection through the subject ---------------------------------------------
        case(
            "subject-crlf",
            json!({"subject": "Hi\r\nBcc: victim@evil.example"}),
            Rejected(&["spec.subject", "subject must not contain CR or LF"]),
        ),
        case(
            "subject-lf",
            json!({"subject": "Hi\nBcc: victim@evil.example"}),
            Rejected(&["subject must not contain CR or LF"]),
        ),
        case(
            "subject-cr",
            json!({"subject": "Hi\rBcc: victim@evil.example"}),
            Rejected(&["subject must not contain CR or LF"]),
        ),
        case(
            "subject-nul",
            json!({"subject": "Hi\u{0}Bcc: victim@evil.example"}),
            Failed("InvalidSubject", "control characters"),
        ),
        case(
            "subject-escape",
            json!({"subject": "Hi \u{1b}[2J\u{1b}[31mred"}),
            Failed("InvalidSubject", "control characters"),
        ),
        case(
            "subject-nel",
            json!({"subject": "Hi\u{85}Bcc: victim@evil.example"}),
            Failed("InvalidSubject", "control characters"),
        ),
        case(
            "subject-line-separator",
            json!({"subject": "Hi\u{2028}Bcc: victim@evil.example"}),
            Failed("InvalidSubject", "control characters"),
        ),
        case("subject-too-long", json!({"subject": "s".repeat(999)}), Rejected(&["spec.subject", "Too long", "998"])),
        // --- addresses and display names -------------------------------------------------------
        case("to-crlf", json!({"to": ["ops@contoso.com\r\nBcc: victim@evil.example"]}), Rejected(&["spec.to", CEL_TO])),
        case("to-name-crlf", json!({"to": ["Ops\r\nBcc: victim@evil.example <ops@contoso.com>"]}), Rejected(&[CEL_TO])),
        case("to-nul", json!({"to": ["ops@contoso.com\u{0}victim@evil.example"]}), Rejected(&[CEL_TO])),
        case("to-two-mailboxes", json!({"to": ["ops@contoso.com, victim@evil.example"]}), Rejected(&[CEL_TO])),
        case(
            "to-quoted-name",
            json!({"to": ["\"Ops\r\nBcc: victim@evil.example\" <ops@contoso.com>"]}),
            Rejected(&[CEL_TO]),
        ),
        case(
            "to-name-nel",
            json!({"to": ["Ops\u{85}Bcc: victim@evil.example <ops@contoso.com>"]}),
            Failed("InvalidAddress", "control character"),
        ),
        case(
            "to-name-bidi-override",
            json!({"to": ["\u{202E}moc.osotnoc <victim@evil.example>"]}),
            Failed("InvalidAddress", "bidi control"),
        ),
        case(
            "to-zero-width",
            json!({"to": ["o\u{200B}ps@contoso.com"]}),
            Failed("InvalidAddress", "invisible formatting"),
        ),
        case("to-replacement-char", json!({"to": ["o\u{FFFD}ps@contoso.com"]}), Failed("InvalidAddress", "U+FFFD")),
        case(
            "to-local-part-too-long",
            json!({"to": [format!("{}@contoso.com", "a".repeat(65))]}),
            Failed("InvalidAddress", "is not a valid mailbox"),
        ),
        case("to-idn-unicode-domain", json!({"to": ["ops@bücher.example"]}), Rejected(&[CEL_TO])),
        case("to-homoglyph-domain", json!({"to": ["ops@сontoso.com"]}), Rejected(&[CEL_TO])),
        case(
            "to-bad-punycode",
            json!({"to": ["ops@xn--.com"]}),
            Failed("InvalidAddress", "expected 'user@example.com'"),
        ),
        case(
            "to-empty-label",
            json!({"to": ["ops@contoso..com"]}),
            Failed("InvalidAddress", "expected 'user@example.com'"),
        ),
        case(
            "cc-crlf",
            json!({"cc": ["ops@contoso.com\r\nBcc: victim@evil.example"]}),
            Rejected(&["every address in cc must be"]),
        ),
        case(
            "bcc-crlf",
            json!({"bcc": ["ops@contoso.com\nTo: victim@evil.example"]}),
            Rejected(&["every address in bcc must be"]),
        ),
        case(
            "reply-to-crlf",
            json!({"replyTo": ["ops@contoso.com\r\nBcc: victim@evil.example"]}),
            Rejected(&["every address in replyTo must be"]),
        ),
        case(
            "reply-to-bidi",
            json!({"replyTo": ["Help\u{2067} <help@contoso.com>"]}),
            Failed("InvalidAddress", "replyTo"),
        ),
        case(
            "from-crlf",
            json!({"from": "alerts@contoso.com\r\nBcc: victim@evil.example"}),
            Rejected(&["from must be an RFC 5322 mailbox"]),
        ),
        case("from-not-allowed", json!({"from": "ceo@contoso.com"}), Failed("SenderNotAllowed", "ceo@contoso.com")),
        case(
            "from-lookalike-domain",
            json!({"from": "x@noreply.contoso.com.evil.example"}),
            Failed("SenderNotAllowed", "x@noreply.contoso.com.evil.example"),
        ),
        case(
            "recipient-domain-not-allowed",
            json!({"profileRef": {"name": "restricted"}, "to": ["victim@evil.example"]}),
            Failed("RecipientDomainNotAllowed", "evil.example"),
        ),
        case(
            "recipients-1000",
            json!({"to": many(1000, "contoso.com")}),
            Rejected(&["spec.to", "must have at most 500 items"]),
        ),
        case(
            "recipients-600-across-fields",
            json!({"to": many(300, "contoso.com"), "bcc": many(300, "contoso.com")}),
            Rejected(&["at most 500 recipients in to, cc and bcc together"]),
        ),
        case("no-recipients", json!({"to": null}), Rejected(&["at least one recipient is required"])),
        // --- custom headers ----------------------------------------------------------------------
        case(
            "header-name-bcc",
            json!({"headers": {"Bcc": "victim@evil.example"}}),
            Rejected(&["header names must be X- headers"]),
        ),
        case(
            "header-name-injection",
            json!({"headers": {"X-Run: 1\r\nBcc": "victim@evil.example"}}),
            Rejected(&["header names must be X- headers"]),
        ),
        case("header-name-space", json!({"headers": {"X-A B": "1"}}), Rejected(&["header names must be X- headers"])),
        case(
            "header-value-crlf",
            json!({"headers": {"X-Run": "1\r\nBcc: victim@evil.example"}}),
            Rejected(&["header values must not contain CR or LF"]),
        ),
        case(
            "header-value-nul",
            json!({"headers": {"X-Run": "1\u{0}Bcc: victim@evil.example"}}),
            Failed("InvalidHeader", "X-Run"),
        ),
        case(
            "header-value-vertical-tab",
            json!({"headers": {"X-Run": "1\u{b}Bcc: victim@evil.example"}}),
            Failed("InvalidHeader", "control characters"),
        ),
        case(
            "header-reserved-priority",
            json!({"headers": {"X-Priority": "1"}}),
            Failed("InvalidHeader", "importance"),
        ),
        case(
            "header-duplicate-case",
            json!({"headers": {"X-Run": "1", "x-run": "2"}}),
            Failed("InvalidHeader", "more than once"),
        ),
        case(
            "header-count-31",
            json!({"headers": headers_31}),
            Rejected(&["spec.headers", "must have at most 30 items"]),
        ),
        case(
            "header-value-too-long",
            json!({"headers": {"X-Run": "v".repeat(999)}}),
            Rejected(&["spec.headers", "Too long"]),
        ),
        // --- bodies and attachments -------------------------------------------------------------------
        case("body-10mb", json!({"body": {"text": ten_mb}}), Rejected(&["too large"])),
        case("no-body", json!({"body": {}}), Rejected(&["body needs text, html, or both"])),
        case(
            "attachment-dotdot",
            json!({"attachments": inline("../../etc/passwd")}),
            Failed("InvalidAttachment", "plain file name"),
        ),
        case(
            "attachment-absolute",
            json!({"attachments": inline("/etc/passwd")}),
            Failed("InvalidAttachment", "plain file name"),
        ),
        case(
            "attachment-backslash",
            json!({"attachments": inline("..\\..\\windows\\win.ini")}),
            Failed("InvalidAttachment", "plain file name"),
        ),
        case(
            "attachment-dot-dot-only",
            json!({"attachments": inline("..")}),
            Failed("InvalidAttachment", "plain file name"),
        ),
        case(
            "attachment-crlf",
            json!({"attachments": inline("a.txt\r\nContent-Type: text/html")}),
            Failed("InvalidAttachment", "plain file name"),
        ),
        case(
            "attachment-nul",
            json!({"attachments": inline("a.txt\u{0}.exe")}),
            Failed("InvalidAttachment", "plain file name"),
        ),
        case(
            "attachment-rtl-override",
            json!({"attachments": inline("invoice\u{202E}fdp.exe")}),
            Failed("InvalidAttachment", "plain file name"),
        ),
        case(
            "attachment-name-too-long",
            json!({"attachments": inline(&long_name)}),
            Rejected(&["spec.attachments[0].name", "Too long"]),
        ),
        case(
            "attachment-invalid-base64",
            json!({"attachments": [{"name": "a.txt", "data": "***not base64***"}]}),
            Failed("InvalidAttachment", "not valid base64"),
        ),
        case(
            "attachment-two-sources",
            json!({"attachments": [{"name": "a.txt", "data": "aGk=", "secretRef": {"name": "loot", "key": "password"}}]}),
            Rejected(&["exactly one of secretRef, configMapRef or data"]),
        ),
        case(
            "attachment-content-type-injection",
            json!({"attachments": [{"name": "a.txt", "contentType": "text/plain\r\nBcc: victim@evil.example", "data": "aGk="}]}),
            Failed("InvalidAttachment", "contentType"),
        ),
        case(
            "attachment-content-type-garbage",
            json!({"attachments": [{"name": "a.txt", "contentType": "not a type; <script>", "data": "aGk="}]}),
            Failed("InvalidAttachment", "contentType"),
        ),
        case(
            "attachment-secret-other-namespace",
            json!({"attachments": [{"name": "loot.txt", "secretRef": {"name": "loot", "key": "password", "namespace": "OTHER"}}]}),
            Rejected(&["unknown field", "spec.attachments[0].secretRef.namespace"]),
        ),
        case(
            "profile-other-namespace",
            json!({"profileRef": {"name": "relay", "namespace": "OTHER"}}),
            Rejected(&["unknown field", "spec.profileRef.namespace"]),
        ),
        case(
            "profile-kind-secret",
            json!({"profileRef": {"name": "relay", "kind": "Secret"}}),
            Rejected(&["spec.profileRef.kind", "Unsupported value"]),
        ),
        case(
            "profile-plain-http",
            json!({"profileRef": {"name": "plain-http"}}),
            Waiting("ProfileNotReady", "plain http"),
        ),
        case(
            "profile-internal-url",
            json!({"profileRef": {"name": "internal-url"}}),
            Waiting("ProfileNotReady", "not one of Microsoft's"),
        ),
        // --- numbers ---------------------------------------------------------------------------------
        case(
            "max-attempts-huge",
            json!({"delivery": {"maxAttempts": 4294967296u64}}),
            Rejected(&["spec.delivery.maxAttempts", "less than or equal to 100"]),
        ),
        case(
            "max-attempts-zero",
            json!({"delivery": {"maxAttempts": 0}}),
            Rejected(&["spec.delivery.maxAttempts", "greater than or equal to 1"]),
        ),
        case(
            "deadline-zero",
            json!({"delivery": {"deadlineSeconds": 0}}),
            Rejected(&["spec.delivery.deadlineSeconds", "greater than or equal to 1"]),
        ),
        case(
            "ttl-negative",
            json!({"ttlSecondsAfterFinished": -1}),
            Rejected(&["spec.ttlSecondsAfterFinished", "greater than or equal to 0"]),
        ),
        case(
            "importance-unknown",
            json!({"importance": "urgent\r\nBcc: victim@evil.example"}),
            Rejected(&["spec.importance", "Unsupported value"]),
        ),
        // Accepted numbers at the edge of int64 must not overflow a timer: each fails for another
        // reason, after which the operator schedules the TTL deletion with them.
        case(
            "ttl-int64-max",
            json!({"ttlSecondsAfterFinished": i64::MAX, "from": "ceo@contoso.com"}),
            Failed("SenderNotAllowed", "ceo@contoso.com"),
        ),
        case(
            "deadline-int64-max",
            json!({"delivery": {"deadlineSeconds": i64::MAX, "maxAttempts": 100}, "ttlSecondsAfterFinished": i64::MAX - 1, "attachments": [{"name": "a.txt", "data": "%%%"}]}),
            Failed("InvalidAttachment", "not valid base64"),
        ),
    ];
    // Bytes that are not UTF-8 cannot be written as JSON text; sent raw, the API server's decoder
    // turns them into U+FFFD, which the operator refuses in an address.
    let name = "to-invalid-utf8";
    let mut raw = serde_json::to_vec(&manifest("NS", name, &json!({"to": ["oZZps@contoso.com"]}))).unwrap_or_default();
    if let Some(at) = raw.windows(2).position(|w| w == b"ZZ") {
        raw[at] = 0xff;
        raw[at + 1] = 0xfe;
    }
    v.push(Case {
        name,
        spec: Value::Null,
        expect: Expect::Failed("InvalidAddress", "U+FFFD"),
        raw: Some(raw),
        strict: true,
    });
    // Without strict field validation the API server prunes the namespace: the message then
    // looks for the Secret in its own namespace only, and waits for it.
    v.push(Case {
        name: "attachment-secret-other-namespace-pruned",
        spec: json!({"attachments": [{"name": "loot.txt", "secretRef": {"name": "loot", "key": "password", "namespace": "OTHER"}}]}),
        expect: Expect::Waiting("AttachmentNotFound", "not found in namespace NS"),
        raw: None,
        strict: false,
    });
    v
}

/// POSTs a manifest; Err is the API server's refusal (status code and message).
async fn post(client: &Client, ns: &str, body: Vec<u8>, strict: bool) -> Result<(), (u16, String)> {
    let validation = if strict { "Strict" } else { "Ignore" };
    let uri = format!("/apis/mailroom.dev/v1alpha1/namespaces/{ns}/emailmessages?fieldValidation={validation}");
    let request =
        axum::http::Request::post(uri).header("content-type", "application/json").body(body).expect("request");
    match client.request::<DynamicObject>(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err((e.code, e.message)),
        Err(e) => Err((0, e.to_string())),
    }
}

/// Accepts TCP connections and counts them: a profile endpoint that must never be contacted.
async fn trap() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((_socket, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, count)
}

fn condition_of(m: &EmailMessage, type_: &str) -> Option<(String, String, String)> {
    m.status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, type_))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Whether a case reached its expected end state (None: not yet).
fn settled(m: &EmailMessage, expect: &Expect) -> bool {
    match expect {
        Expect::Failed(..) => phase(m) == Some(Phase::Failed),
        Expect::Waiting(reason, _) => condition_of(m, "Waiting").is_some_and(|(s, r, _)| s == "True" && r == *reason),
        Expect::Rejected(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_manifests_are_refused_and_the_operator_keeps_working() {
    let started = Instant::now();
    let client = common::client().await;
    let ns = common::namespace(&client, "hostile", &[]).await;
    let other = common::namespace(&client, "hostile-other", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let (trap_port, trap_hits) = trap().await;
    create_yaml(
        &client,
        &other,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: loot}\nstringData: {password: other-namespace-loot}\n",
    )
    .await;
    create_yaml(
        &client,
        &ns,
        &format!(
            r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: relay}}
spec:
  senders: {{default: "alerts@contoso.com", allowed: ["alerts@contoso.com", "*@noreply.contoso.com"]}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: restricted}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  smtp: {{host: 127.0.0.1, port: {port}, tls: None}}
  recipientDomains: ["contoso.com"]
---
apiVersion: v1
kind: Secret
metadata: {{name: graph-credentials}}
stringData: {{client-secret: not-used}}
---
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: plain-http}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  graph:
    tenantId: t
    clientId: c
    clientSecretRef: {{name: graph-credentials, key: client-secret}}
    authorityHost: http://127.0.0.1:{trap_port}
    endpoint: http://127.0.0.1:{trap_port}
---
# A namespace's user pointing the operator at an internal https service (SSRF).
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {{name: internal-url}}
spec:
  senders: {{default: "alerts@contoso.com"}}
  graph:
    tenantId: t
    clientId: c
    clientSecretRef: {{name: graph-credentials, key: client-secret}}
    authorityHost: https://127.0.0.1:{trap_port}
    endpoint: https://login.microsoftonline.com.127.0.0.1.nip.io:{trap_port}
"#,
            port = peer.smtp_port
        ),
    )
    .await;
    let mut op = Operator::start("hostile", &ns, &[]);
    let pid = op.pid();

    let cases = cases();
    assert!(cases.len() >= 40, "the table has {} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(names.insert(c.name), "duplicate case {}", c.name);
    }
    // Every case is created at once.
    let creations = cases.iter().map(|c| {
        let client = client.clone();
        // The raw case keeps its invalid bytes: the namespace is substituted in bytes.
        let body = match &c.raw {
            Some(raw) => replace_bytes(raw, b"\"NS\"", format!("\"{ns}\"").as_bytes()),
            None => {
                let text = serde_json::to_string(&manifest(&ns, c.name, &c.spec)).expect("JSON");
                text.replace("\"OTHER\"", &format!("\"{other}\"")).into_bytes()
            }
        };
        let ns = ns.clone();
        async move { post(&client, &ns, body, c.strict).await }
    });
    let results = futures::future::join_all(creations).await;

    let mut problems = Vec::new();
    let mut pending: Vec<&Case> = Vec::new();
    for (c, result) in cases.iter().zip(results) {
        match (&c.expect, result) {
            (Expect::Rejected(words), Err((code, message))) => {
                if !(400..500).contains(&code) || !words.iter().all(|w| message.contains(w)) {
                    problems
                        .push(format!("{}: refused with {code} {message:?}, expected it to name {words:?}", c.name));
                }
            }
            (Expect::Rejected(_), Ok(())) => problems.push(format!("{}: accepted, expected a refusal", c.name)),
            (_, Err((code, message))) => {
                problems.push(format!("{}: refused ({code} {message}), expected acceptance", c.name))
            }
            (_, Ok(())) => pending.push(c),
        }
    }

    // Wait for every accepted case to settle, listing them all at once.
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + WAIT;
    let seen: BTreeMap<String, EmailMessage> = loop {
        let seen: BTreeMap<String, EmailMessage> =
            api.list(&Default::default()).await.expect("list").items.into_iter().map(|m| (m.name_any(), m)).collect();
        let open: Vec<&str> = pending
            .iter()
            .filter(|c| !seen.get(c.name).is_some_and(|m| settled(m, &c.expect)))
            .map(|c| c.name)
            .collect();
        if open.is_empty() {
            break seen;
        }
        if Instant::now() > deadline {
            problems.push(format!("not settled within {WAIT:?}: {open:?}"));
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for c in &pending {
        let Some(m) = seen.get(c.name) else {
            problems.push(format!("{}: gone", c.name));
            continue;
        };
        let attempts = m.status.as_ref().and_then(|s| s.attempts).unwrap_or(0);
        let other_text = |s: &str| s.replace(&ns, "NS");
        match &c.expect {
            Expect::Failed(reason, text) => {
                let got = condition_of(m, "Failed");
                let ok = got
                    .as_ref()
                    .is_some_and(|(s, r, msg)| s == "True" && r == reason && other_text(msg).contains(text));
                if !ok || phase(m) != Some(Phase::Failed) || attempts != 0 {
                    problems.push(format!(
                        "{}: expected Failed/{reason} naming {text:?} with no attempt; got phase {:?}, attempts {attempts}, {got:?}",
                        c.name,
                        phase(m)
                    ));
                }
            }
            Expect::Waiting(reason, text) => {
                let got = condition_of(m, "Waiting");
                let ok = got
                    .as_ref()
                    .is_some_and(|(s, r, msg)| s == "True" && r == reason && other_text(msg).contains(text));
                if !ok || phase(m) == Some(Phase::Sent) || attempts != 0 {
                    problems.push(format!("{}: expected waiting {reason} naming {text:?}; got {got:?}", c.name));
                }
            }
            Expect::Rejected(_) => {}
        }
        // The reason is also an Event on the message.
        if let Expect::Failed(reason, _) | Expect::Waiting(reason, _) = &c.expect {
            let events = common::events_until(&client, &ns, c.name, |r, _| r == *reason).await;
            if !events.iter().any(|(r, _)| r == reason) {
                problems.push(format!("{}: no {reason} Event, saw {events:?}", c.name));
            }
        }
    }

    // The plain-http profile never became ready, and its endpoint was never contacted.
    let profiles: Api<MailProfile> = Api::namespaced(client.clone(), &ns);
    let plain = profiles.get("plain-http").await.expect("profile");
    let ready = plain.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).cloned();
    match &ready {
        Some(c) if c.status == "False" && c.reason == "InvalidSettings" && c.message.contains("plain http") => {}
        other => problems.push(format!("plain-http profile: expected Ready=False InvalidSettings, got {other:?}")),
    }
    let internal = profiles.get("internal-url").await.expect("profile");
    match internal.status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")) {
        Some(c)
            if c.status == "False" && c.reason == "InvalidSettings" && c.message.contains("not one of Microsoft's") => {
        }
        other => problems.push(format!("internal-url profile: expected Ready=False InvalidSettings, got {other:?}")),
    }

    // A normal message still goes out, through the same process.
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {name: normal}
spec:
  profileRef: {name: relay}
  to: ["Ops Team <ops@contoso.com>"]
  subject: "still working"
  body: {text: "after the hostile table"}
"#,
    )
    .await;
    let sent = common::wait_for(&api, "normal", WAIT, |m| phase(m).is_some_and(Phase::is_finished)).await;
    assert_eq!(phase(&sent), Some(Phase::Sent), "{:?}", sent.status);
    assert!(op.exit_status().is_none(), "the operator exited: {}", op.log_text());
    assert_eq!(op.pid(), pid);
    let log = op.log_text();
    assert!(!log.contains("panicked"), "the operator panicked:\n{log}");

    // Exactly one message reached the SMTP peer: the normal one; nothing hostile is in it.
    let received = peer.messages().await;
    let raws: Vec<String> = received.iter().map(|e| String::from_utf8_lossy(&peer.raw(e)).to_string()).collect();
    if received.len() != 1 || raws.iter().any(|r| r.contains(MARK) || r.contains("evil.example")) {
        problems.push(format!("the SMTP peer received {} messages: {raws:#?}", received.len()));
    }
    assert!(raws.iter().any(|r| r.contains("after the hostile table")), "the normal message arrived: {raws:#?}");
    let hits = trap_hits.load(Ordering::SeqCst);
    if hits != 0 {
        problems.push(format!("the plain-http or internal endpoint was contacted {hits} times"));
    }
    assert!(problems.is_empty(), "{} of {} cases went wrong:\n{}", problems.len(), cases.len(), problems.join("\n"));
    println!("{} hostile cases in {:?}", cases.len(), started.elapsed());
}

fn replace_bytes(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}
