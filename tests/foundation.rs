//! The CRDs against the real API server: installation, the examples, and every rejection.

mod common;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use mailroom::api::{AlertRoute, ClusterMailProfile, EmailMessage, EmailTemplate, MailProfile};

fn resource_for(kind: &str) -> ApiResource {
    match kind {
        "EmailMessage" => ApiResource::erase::<EmailMessage>(&()),
        "MailProfile" => ApiResource::erase::<MailProfile>(&()),
        "ClusterMailProfile" => ApiResource::erase::<ClusterMailProfile>(&()),
        "AlertRoute" => ApiResource::erase::<AlertRoute>(&()),
        "EmailTemplate" => ApiResource::erase::<EmailTemplate>(&()),
        other => panic!("unknown kind {other}"),
    }
}

/// Creates a manifest (server-side dry run); returns the API server's error message, if any.
async fn try_create(client: &kube::Client, ns: &str, yaml: &str, dry_run: bool) -> Result<(), String> {
    let obj: DynamicObject = serde_yaml::from_str(yaml).expect("test manifest parses");
    let kind = obj.types.as_ref().expect("kind").kind.clone();
    let ar = resource_for(&kind);
    let api: Api<DynamicObject> = if kind == "ClusterMailProfile" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), ns, &ar)
    };
    let pp = PostParams { dry_run, ..Default::default() };
    api.create(&pp, &obj).await.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn crds_install_and_become_established() {
    let client = common::client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ssapply = PatchParams::apply("mailroom-tests").force();
    for crd in mailroom::api::crd::all() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &ssapply, &Patch::Apply(&crd)).await.expect("apply CRD");
        let established = common::wait_for(&crds, &name, Duration::from_secs(30), |c| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        })
        .await;
        assert_eq!(established.spec.group, "mailroom.dev");
    }
    // The API server serves them.
    let gvk = GroupVersionKind::gvk("mailroom.dev", "v1alpha1", "EmailMessage");
    let (ar, _) = kube::discovery::pinned_kind(&client, &gvk).await.expect("discovered");
    assert_eq!(ar.plural, "emailmessages");
}

#[tokio::test]
async fn every_example_is_accepted_by_a_server_side_dry_run() {
    let client = common::client().await;
    let ns = common::namespace(&client, "examples", &[]).await;
    let dir = common::repo_root().join("examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in text.split("\n---").filter(|d| d.contains("apiVersion:")) {
            if !doc.contains("mailroom.dev/") {
                continue;
            }
            // The examples name namespace team-a; dry-run them in this test's namespace instead.
            let doc = doc.replace("namespace: team-a", &format!("namespace: {ns}"));
            try_create(&client, &ns, &doc, true)
                .await
                .unwrap_or_else(|e| panic!("{} rejected: {e}\n{doc}", path.display()));
            count += 1;
        }
    }
    assert!(count >= 5, "expected the example manifests, found {count}");
}

const MESSAGE: &str = r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {generateName: t-}
spec:
  profileRef: {name: p}
  to: ["Ops Team <ops@contoso.com>"]
  subject: "Hello"
  body: {text: "hi"}
"#;

const PROFILE: &str = r#"
apiVersion: mailroom.dev/v1alpha1
kind: MailProfile
metadata: {generateName: p-}
spec:
  senders: {default: alerts@contoso.com}
  smtp: {host: relay.contoso.com}
"#;

const TEMPLATE: &str = r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailTemplate
metadata: {generateName: t-}
spec:
  subject: "Deployed {{ app }}"
  text: "{{ app }} is live."
"#;

/// A message that names a template instead of carrying a subject and body.
const TEMPLATED: &str = r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {generateName: t-}
spec:
  profileRef: {name: p}
  to: ["Ops Team <ops@contoso.com>"]
  templateRef: {name: deploy}
  values: {app: shop}
"#;

const ROUTE: &str = r#"
apiVersion: mailroom.dev/v1alpha1
kind: AlertRoute
metadata: {name: on-call}
spec:
  profileRef: {name: p}
  to: ["Ops Team <ops@contoso.com>"]
  tokenSecretRef: {name: am, key: token}
"#;

/// Replaces the `line` that starts with the same key (after indentation) in a manifest.
fn with(base: &str, key: &str, replacement: &str) -> String {
    let mut out = Vec::new();
    let mut replaced = false;
    for line in base.lines() {
        if !replaced && line.trim_start().starts_with(key) {
            if !replacement.is_empty() {
                out.push(replacement.to_string());
            }
            replaced = true;
        } else {
            out.push(line.to_string());
        }
    }
    if !replaced {
        out.push(replacement.to_string());
    }
    out.join("\n")
}

#[tokio::test]
async fn invalid_manifests_are_rejected_with_a_message_naming_the_problem() {
    let client = common::client().await;
    let ns = common::namespace(&client, "invalid", &[]).await;
    let graph_secret = "  graph: {tenantId: t, clientId: c, clientSecretRef: {name: s, key: k}}";
    let cases: Vec<(&str, String, &str)> = vec![
        ("profile without transport", with(PROFILE, "smtp:", ""), "exactly one transport"),
        (
            "profile with both transports",
            with(PROFILE, "smtp:", &format!("  smtp: {{host: relay}}\n{graph_secret}")),
            "exactly one transport",
        ),
        (
            "graph without credential",
            with(PROFILE, "smtp:", "  graph: {tenantId: t, clientId: c}"),
            "exactly one credential",
        ),
        (
            "graph with two credentials",
            with(
                PROFILE,
                "smtp:",
                "  graph: {tenantId: t, clientId: c, clientSecretRef: {name: s, key: k}, certificateRef: {name: c}}",
            ),
            "exactly one credential",
        ),
        (
            "oauth2 with two credentials",
            with(
                PROFILE,
                "smtp:",
                "  smtp: {host: h, auth: {oauth2: {tenantId: t, clientId: c, certificateRef: {name: c}, workloadIdentity: {}}}}",
            ),
            "exactly one credential",
        ),
        (
            "smtp auth with both kinds",
            with(
                PROFILE,
                "smtp:",
                "  smtp: {host: h, auth: {password: {secretRef: {name: s}}, oauth2: {tenantId: t, clientId: c, workloadIdentity: {}}}}",
            ),
            "exactly one of password or oauth2",
        ),
        ("no recipients", with(MESSAGE, "to:", ""), "at least one recipient"),
        ("empty recipient lists", with(MESSAGE, "to:", "  to: []\n  cc: []\n  bcc: []"), "at least one recipient"),
        ("no body", with(MESSAGE, "body:", "  body: {}"), "body needs text, html, or both"),
        ("malformed to", with(MESSAGE, "to:", "  to: [\"not an address\"]"), "every address in to"),
        ("malformed cc", with(MESSAGE, "to:", "  to: [a@contoso.com]\n  cc: [\"a@b@c\"]"), "every address in cc"),
        ("malformed bcc", with(MESSAGE, "to:", "  to: [a@contoso.com]\n  bcc: [\"<>\"]"), "every address in bcc"),
        (
            "malformed replyTo",
            with(MESSAGE, "to:", "  to: [a@contoso.com]\n  replyTo: [\"x y@z\"]"),
            "every address in replyTo",
        ),
        (
            "malformed from",
            with(MESSAGE, "to:", "  to: [a@contoso.com]\n  from: \"nobody\""),
            "from must be an RFC 5322 mailbox",
        ),
        (
            "display name with line break",
            with(MESSAGE, "to:", "  to: [\"Evil\\r\\nBcc: x@y.z <a@contoso.com>\"]"),
            "every address in to",
        ),
        (
            "subject with LF",
            with(MESSAGE, "subject:", "  subject: \"Hi\\nBcc: victim@example.com\""),
            "subject must not contain CR or LF",
        ),
        (
            "subject with CR",
            with(MESSAGE, "subject:", "  subject: \"Hi\\rthere\""),
            "subject must not contain CR or LF",
        ),
        (
            "header value with CR LF",
            with(MESSAGE, "subject:", "  subject: ok\n  headers: {X-Run: \"1\\r\\nBcc: x@y.z\"}"),
            "header values must not contain CR or LF",
        ),
        (
            "header not X-",
            with(MESSAGE, "subject:", "  subject: ok\n  headers: {Bcc: \"x@y.z\"}"),
            "header names must be X- headers",
        ),
        (
            "header name with colon",
            with(MESSAGE, "subject:", "  subject: ok\n  headers: {\"X-A:B\": \"1\"}"),
            "header names must be X- headers",
        ),
        (
            "attachment without source",
            with(MESSAGE, "subject:", "  subject: ok\n  attachments: [{name: a.txt}]"),
            "exactly one of secretRef, configMapRef or data",
        ),
        (
            "attachment with two sources",
            with(
                MESSAGE,
                "subject:",
                "  subject: ok\n  attachments: [{name: a.txt, data: aGk=, secretRef: {name: s, key: k}}]",
            ),
            "exactly one of secretRef, configMapRef or data",
        ),
        (
            "no body and no template",
            with(MESSAGE, "body:", ""),
            "body is required (text, html, or both), unless templateRef",
        ),
        (
            "template and a subject",
            with(TEMPLATED, "values:", "  values: {app: shop}\n  subject: mine"),
            "with templateRef the EmailTemplate supplies the subject and body",
        ),
        (
            "template and a body",
            with(TEMPLATED, "values:", "  values: {app: shop}\n  body: {text: mine}"),
            "with templateRef the EmailTemplate supplies the subject and body",
        ),
        (
            "values without a template",
            with(TEMPLATED, "templateRef:", "  body: {text: hi}"),
            "values are only used with templateRef",
        ),
        ("values that are a list", with(TEMPLATED, "values:", "  values: [shop]"), "must be of type object"),
        (
            "values with over 100 keys",
            with(
                TEMPLATED,
                "values:",
                &format!("  values: {{{}}}", (0..101).map(|i| format!("k{i}: v")).collect::<Vec<_>>().join(", ")),
            ),
            "must have at most 100",
        ),
        (
            "template ref without a name",
            with(TEMPLATED, "templateRef:", "  templateRef: {}"),
            "templateRef.name: Required value",
        ),
        ("template without a subject", with(TEMPLATE, "subject:", ""), "subject: Required value"),
        ("template without a body", with(TEMPLATE, "text:", ""), "an EmailTemplate needs text, html, or both"),
        (
            "template subject over 4096",
            with(TEMPLATE, "subject:", &format!("  subject: {}", "s".repeat(4097))),
            "Too long: may not be more than 4096",
        ),
        ("route without recipients", with(ROUTE, "to:", "  to: []"), "at least one recipient is required in to or cc"),
        ("route with a malformed cc", with(ROUTE, "to:", "  cc: [\"a@b@c\"]"), "every address in cc"),
        ("route without a token", with(ROUTE, "tokenSecretRef:", ""), "tokenSecretRef: Required value"),
        (
            "route name over 63",
            with(ROUTE, "metadata:", &format!("metadata: {{name: {}}}", "r".repeat(64))),
            "at most 63",
        ),
        (
            "route importance that is not one",
            with(
                ROUTE,
                "tokenSecretRef:",
                "  tokenSecretRef: {name: am, key: token}\n  importanceBySeverity: {critical: urgent}",
            ),
            "Unsupported value: \"urgent\"",
        ),
        (
            "route source that is not one",
            with(ROUTE, "tokenSecretRef:", "  tokenSecretRef: {name: am, key: token}\n  source: jenkins"),
            "Unsupported value: \"jenkins\"",
        ),
        (
            "route signature for a source other than grafana",
            with(
                ROUTE,
                "tokenSecretRef:",
                "  tokenSecretRef: {name: am, key: token}\n  source: flux\n  signature: {header: X-Signature}",
            ),
            "signature applies to source grafana only",
        ),
        (
            "route signature header not named -Signature",
            with(
                ROUTE,
                "tokenSecretRef:",
                "  tokenSecretRef: {name: am, key: token}\n  source: grafana\n  signature: {header: X-Hub-Sig}",
            ),
            "ends in -Signature",
        ),
        (
            "route with both template kinds",
            with(
                ROUTE,
                "tokenSecretRef:",
                "  tokenSecretRef: {name: am, key: token}\n  templateRef: {name: a}\n  emailTemplateRef: {name: b}",
            ),
            "templateRef and emailTemplateRef exclude each other",
        ),
        (
            "route retry window under 10 s",
            with(ROUTE, "tokenSecretRef:", "  tokenSecretRef: {name: am, key: token}\n  retryWindowSeconds: 1"),
            "greater than or equal to 10",
        ),
    ];
    let total = cases.len();
    for (what, yaml, expected) in cases {
        match try_create(&client, &ns, &yaml, true).await {
            Ok(()) => {
                panic!("{what}: accepted, expected rejection containing {expected:?}\n{yaml}")
            }
            Err(e) => assert!(e.contains(expected), "{what}: rejection {e:?} does not contain {expected:?}"),
        }
    }
    assert!(total >= 20);
    // The valid base documents are accepted, so the rejections above are about the change alone.
    try_create(&client, &ns, MESSAGE, true).await.expect("valid message accepted");
    try_create(&client, &ns, PROFILE, true).await.expect("valid profile accepted");
    try_create(&client, &ns, ROUTE, true).await.expect("valid route accepted");
    let grafana = with(
        ROUTE,
        "tokenSecretRef:",
        "  tokenSecretRef: {name: am, key: token}\n  source: grafana\n  signature: {timestampHeader: X-Ts}",
    );
    try_create(&client, &ns, &grafana, true).await.expect("valid grafana route accepted");
    try_create(&client, &ns, TEMPLATE, true).await.expect("valid template accepted");
    try_create(&client, &ns, TEMPLATED, true).await.expect("valid templated message accepted");
}

#[tokio::test]
async fn message_spec_is_immutable() {
    let client = common::client().await;
    let ns = common::namespace(&client, "immutable", &[]).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let mut msg: EmailMessage = serde_yaml::from_str(MESSAGE).unwrap();
    msg.metadata.generate_name = None;
    msg.metadata.name = Some("fixed".into());
    api.create(&PostParams::default(), &msg).await.expect("create");
    let patch = serde_json::json!({"spec": {"subject": "changed"}});
    let err =
        api.patch("fixed", &PatchParams::default(), &Patch::Merge(&patch)).await.expect_err("spec change refused");
    assert!(err.to_string().contains("spec is immutable"), "{err}");
    // Metadata may still change (labels for GitOps tools).
    let patch = serde_json::json!({"metadata": {"labels": {"team": "a"}}});
    api.patch("fixed", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("labels can change");
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let client = common::client().await;
    let ns = common::namespace(&client, "columns", &[]).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let mut msg: EmailMessage = serde_yaml::from_str(MESSAGE).unwrap();
    msg.metadata.generate_name = None;
    msg.metadata.name = Some("cols".into());
    api.create(&PostParams::default(), &msg).await.expect("create");
    let status = serde_json::json!({"status": {"phase": "Sent", "recipients": 3, "attempts": 1}});
    api.patch_status("cols", &PatchParams::default(), &Patch::Merge(&status)).await.expect("status");
    let out = common::kubectl(&["get", "em", "-n", &ns]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "PHASE", "PROFILE", "RECIPIENTS", "ATTEMPTS", "AGE"]);
    let row: Vec<&str> = text.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(&row[..5], ["cols", "Sent", "p", "3", "1"]);
    for (short, header) in [("mp", "TRANSPORT"), ("cmp", "TRANSPORT"), ("email", "PHASE"), ("et", "AGE")] {
        let out = common::kubectl(&["get", short, "-A"]);
        assert!(out.status.success(), "kubectl get {short}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.is_empty() || text.contains(header), "kubectl get {short}: {text}");
    }
}
