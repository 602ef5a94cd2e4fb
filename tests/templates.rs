//! EmailTemplates against the real API server, the operator and a real SMTP server: the rendered
//! subject and bodies on the wire, every way a template can fail, and the CRD's rules.

mod common;

use std::time::Duration;

use common::smtp_peer::SmtpPeer;
use common::{Operator, create_yaml, message_condition, phase};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use mail_parser::MessageParser;
use mailroom::api::{EmailMessage, Phase};

const WAIT: Duration = Duration::from_secs(60);

/// A message that names `template` and passes `values` (a YAML flow mapping).
fn templated(name: &str, template: &str, values: &str) -> String {
    format!(
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailMessage
metadata: {{name: {name}}}
spec:
  profileRef: {{name: relay}}
  to: ["Ops Team <ops@contoso.com>"]
  templateRef: {{name: {template}}}
  values: {values}
"#
    )
}

async fn finished(api: &Api<EmailMessage>, name: &str) -> EmailMessage {
    common::wait_for(api, name, WAIT, |m| matches!(phase(m), Some(Phase::Sent | Phase::Failed))).await
}

/// The example a user copies, as written (only its namespace and profile changed): rendered and
/// delivered, with the value that holds `<` escaped in the HTML body and left alone in the text.
#[tokio::test]
async fn the_deployment_notification_example_is_rendered_and_delivered() {
    let client = common::client().await;
    let ns = common::namespace(&client, "tpl-example", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let op = Operator::start("tpl-example", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    let example = std::fs::read_to_string(common::repo_root().join("examples/deployment-notification.yaml"))
        .expect("examples/deployment-notification.yaml");
    let example = example
        .replace("namespace: team-a", &format!("namespace: {ns}"))
        .replace("generateName: deployment-finished-", "name: deploy-1234")
        .replace("profileRef: {name: m365-graph}", "profileRef: {name: relay}");
    create_yaml(&client, &ns, &example).await;

    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let m = finished(&api, "deploy-1234").await;
    assert_eq!(phase(&m), Some(Phase::Sent), "{:?}\noperator log:\n{}", m.status, op.log_text());
    assert_eq!(m.status.as_ref().and_then(|s| s.attempts), Some(1));

    let envelopes = peer.wait_messages(1, WAIT).await;
    assert_eq!(envelopes.len(), 1);
    let raw = peer.raw(&envelopes[0]);
    let parsed = MessageParser::default().parse(&raw).expect("parse the received message");
    assert_eq!(parsed.subject(), Some("[production] shop 1.4.2 deployed"));
    assert_eq!(
        parsed.body_text(0).as_deref().map(|t| t.replace("\r\n", "\n")),
        Some(
            "shop 1.4.2 is live in production.\n\n\
             Commit:  3f9c2e1d8b7a\n\
             Run:     https://ci.contoso.com/shop/runs/1234\n\
             Notes:   Rollout took < 5 minutes"
                .to_string()
        )
    );
    let html = parsed.body_html(0).expect("an HTML body").replace("\r\n", "\n");
    assert!(html.contains("<p><b>shop 1.4.2</b> is live in <b>production</b>.</p>"), "{html}");
    assert!(html.contains("<li>Commit: <code>3f9c2e1d8b7a</code></li>"), "{html}");
    assert!(html.contains("<p>Rollout took &lt; 5 minutes</p>"), "{html}");
    assert!(!html.contains("< 5"), "a value reached the HTML unescaped:\n{html}");
    assert_eq!(parsed.header_raw("X-Pipeline-Run").map(str::trim), Some("1234"));
}

/// Each way a template can fail ends its message Failed before any attempt, with a reason and a
/// message naming the part and line, and nothing reaches the SMTP server.
#[tokio::test]
async fn template_problems_end_the_message_failed_with_a_reason_and_nothing_is_sent() {
    let client = common::client().await;
    let ns = common::namespace(&client, "tpl-errors", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let op = Operator::start("tpl-errors", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(
        &client,
        &ns,
        r#"
apiVersion: mailroom.dev/v1alpha1
kind: EmailTemplate
metadata: {name: release}
spec:
  subject: "{{ app }}: {{ title }}"
  text: |
    {{ app }} was released.
    Version {{ version }}.
---
apiVersion: mailroom.dev/v1alpha1
kind: EmailTemplate
metadata: {name: broken}
spec:
  subject: "broken"
  html: |
    <p>
    {% if app %}
    {{ app }
    {% endif %}
"#,
    )
    .await;
    let cases = [
        (
            "missing-value",
            templated("missing-value", "release", "{app: shop, title: ok}"),
            "TemplateError",
            vec!["EmailTemplate release: the text template, line 2: ", "`version` is undefined"],
        ),
        (
            "syntax-error",
            templated("syntax-error", "broken", "{app: shop}"),
            "TemplateError",
            vec!["EmailTemplate broken: the html template, line 3: syntax error"],
        ),
        (
            "subject-newline",
            templated("subject-newline", "release", r#"{app: shop, title: "ok\nBcc: victim@example.com", version: 1}"#),
            "InvalidSubject",
            vec!["EmailTemplate release: the rendered subject contains a line break"],
        ),
    ];
    for (_, yaml, _, _) in &cases {
        create_yaml(&client, &ns, yaml).await;
    }
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    for (name, _, reason, words) in &cases {
        let m = finished(&api, name).await;
        assert_eq!(phase(&m), Some(Phase::Failed), "{name}: {:?}\noperator log:\n{}", m.status, op.log_text());
        let cond = message_condition(&m, "Failed").expect("a Failed condition");
        assert_eq!((cond.status.as_str(), cond.reason.as_str()), ("True", *reason), "{name}: {cond:?}");
        for w in words {
            assert!(cond.message.contains(w), "{name}: {:?} does not contain {w:?}", cond.message);
        }
        assert_eq!(m.status.as_ref().and_then(|s| s.attempts), None, "{name}: a template error costs no attempt");
        common::expect_event(&client, &ns, name, |r, n| r == *reason && n.contains(words[0])).await;
    }
    // All three failed before a claim, so none can be on its way to the server.
    assert!(peer.messages().await.is_empty(), "a failed template reached the SMTP server");
}

/// Apply order does not matter: a message applied before its EmailTemplate waits, unclaimed and
/// with the reason, and is sent once the template exists.
#[tokio::test]
async fn a_message_applied_before_its_template_waits_and_is_sent_when_it_appears() {
    let client = common::client().await;
    let ns = common::namespace(&client, "tpl-order", &[]).await;
    let peer = SmtpPeer::start(&[]);
    let op = Operator::start("tpl-order", &ns, &[]);
    create_yaml(&client, &ns, &common::relay_profile("relay", peer.smtp_port, "")).await;
    create_yaml(&client, &ns, &templated("early", "later", "{app: shop}")).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let waiting = common::wait_for(&api, "early", WAIT, |m| {
        message_condition(m, "Waiting").is_some_and(|c| c.status == "True" && c.reason == "TemplateNotFound")
    })
    .await;
    let cond = message_condition(&waiting, "Waiting").expect("Waiting");
    assert!(cond.message.contains("EmailTemplate later not found"), "{cond:?}");
    assert_eq!(phase(&waiting), Some(Phase::Pending));
    assert_eq!(waiting.status.as_ref().and_then(|s| s.attempts), None, "waiting costs no attempt");
    common::expect_event(&client, &ns, "early", |r, n| r == "TemplateNotFound" && n.contains("later")).await;
    assert!(peer.messages().await.is_empty());

    create_yaml(
        &client,
        &ns,
        "apiVersion: mailroom.dev/v1alpha1\nkind: EmailTemplate\nmetadata: {name: later}\nspec: {subject: \"{{ app }} is out\", text: \"{{ app }}\"}\n",
    )
    .await;
    // A waiting message is looked at again every minute; no watch on EmailTemplates wakes it.
    let m = common::wait_for(&api, "early", Duration::from_secs(180), |m| {
        matches!(phase(m), Some(Phase::Sent | Phase::Failed))
    })
    .await;
    assert_eq!(phase(&m), Some(Phase::Sent), "{:?}\noperator log:\n{}", m.status, op.log_text());
    let envelopes = peer.wait_messages(1, WAIT).await;
    let raw = peer.raw(&envelopes[0]);
    let parsed = MessageParser::default().parse(&raw).expect("parse");
    assert_eq!(parsed.subject(), Some("shop is out"));
}

/// The CRD's rules: with a templateRef the subject and body may (must) be left out; without one a
/// body is still required; the values are as immutable as the rest of the spec.
#[tokio::test]
async fn a_templated_message_needs_no_body_one_without_either_is_refused_and_values_are_immutable() {
    let client = common::client().await;
    let ns = common::namespace(&client, "tpl-cel", &[]).await;
    let api: Api<EmailMessage> = Api::namespaced(client.clone(), &ns);
    let mut msg: EmailMessage =
        serde_yaml::from_str(&templated("fixed", "deploy", "{app: shop, build: {id: 7, tags: [a, b]}}")).unwrap();
    api.create(&PostParams::default(), &msg).await.expect("a message with templateRef and no subject or body");
    let stored = api.get("fixed").await.expect("get");
    assert!(stored.spec.body.is_empty() && stored.spec.subject.is_empty());
    assert_eq!(
        stored.spec.values.as_ref().and_then(|v| v.get("build")).map(|b| b["tags"][1].clone()),
        Some("b".into())
    );

    for (what, change) in [
        ("a nested value", serde_json::json!({"spec": {"values": {"build": {"id": 8}}}})),
        ("a new value", serde_json::json!({"spec": {"values": {"extra": true}}})),
        ("the template", serde_json::json!({"spec": {"templateRef": {"name": "other"}}})),
    ] {
        let err =
            api.patch("fixed", &PatchParams::default(), &Patch::Merge(&change)).await.expect_err("spec change refused");
        assert!(err.to_string().contains("spec is immutable"), "{what}: {err}");
    }

    msg.metadata.name = Some("neither".into());
    msg.spec.template_ref = None;
    msg.spec.values = None;
    let err = api.create(&PostParams::default(), &msg).await.expect_err("neither body nor templateRef");
    assert!(err.to_string().contains("body is required (text, html, or both), unless templateRef"), "{err}");
    assert!(api.get_opt("neither").await.expect("get").is_none());
    assert_eq!(
        api.list(&Default::default()).await.expect("list").items.iter().map(|m| m.name_any()).collect::<Vec<_>>(),
        ["fixed"]
    );
}
