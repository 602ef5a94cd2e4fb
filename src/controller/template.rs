//! An EmailMessage with `templateRef`: its EmailTemplate rendered with its `values` into the subject
//! and body it is sent with. The rendering is a plain function; the reconciler calls
//! [`render_message`], which reads the template and hands back the spec to build from.

use std::borrow::Cow;
use std::io;

use kube::{Api, Client};
use minijinja::value::{Serde, Value};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};

use super::reason::Reason;
use crate::api::{Body, EmailMessageSpec, EmailTemplate, EmailTemplateSpec, LocalReference};

/// Bounds the work of one part's rendering: every instruction costs one, every 64 bytes of data
/// produced (strings built, output written) one more, so a looping or exploding template stops
/// after a few milliseconds and at most a few tens of MB instead of holding the operator.
pub const TEMPLATE_FUEL: u64 = 500_000;
/// The most a rendered text or HTML body may weigh.
pub const MAX_RENDERED_BODY_BYTES: usize = 1024 * 1024;
/// The longest rendered subject, in characters (RFC 5322's line length, as for a written subject).
pub const MAX_SUBJECT_CHARS: usize = 998;
/// The most bytes a subject may render before it is cut off (998 characters of up to 4 bytes).
const MAX_RENDERED_SUBJECT_BYTES: usize = 4 * MAX_SUBJECT_CHARS;

/// The parts of a template, as named in errors and as the templates are named to minijinja.
const SUBJECT: &str = "subject";
const TEXT: &str = "text";
const HTML: &str = "html";

/// A rendered template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// One line.
    pub subject: String,
    /// Absent when the template has none or it renders only whitespace.
    pub text: Option<String>,
    /// Absent when the template has none or it renders only whitespace.
    pub html: Option<String>,
}

/// Why a template could not be rendered into a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A syntax error, or an error while rendering (an undefined value, a failed filter, no fuel left).
    #[error("the {part} template{}: {reason}", at_line(*.line))]
    Template {
        /// subject, text or html.
        part: &'static str,
        /// The line in that part, when minijinja knows it.
        line: Option<usize>,
        /// minijinja's words.
        reason: String,
    },
    /// The rendered subject breaks the header rules: CR, LF or NUL.
    #[error("the rendered subject contains a line break or NUL (a value with CR or LF?); a subject is one line")]
    SubjectLineBreak,
    /// The rendered subject is longer than a header line.
    #[error("the rendered subject is longer than {MAX_SUBJECT_CHARS} characters")]
    SubjectTooLong,
    /// A body rendered more than it may.
    #[error("the {part} template rendered more than {limit} bytes")]
    TooLarge {
        /// text or html.
        part: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Both bodies rendered nothing.
    #[error("the text and html templates both rendered nothing")]
    EmptyBody,
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(", line {l}")).unwrap_or_default()
}

impl RenderError {
    /// A CamelCase reason for conditions and Events; a subject that breaks the header rules is
    /// `InvalidSubject`, as for a written one.
    pub fn reason(&self) -> Reason {
        match self {
            RenderError::SubjectLineBreak | RenderError::SubjectTooLong => Reason::InvalidSubject,
            _ => Reason::TemplateError,
        }
    }
}

/// Why a message's template could not be used: a missing one is waited for (see
/// [`missing_template`]) until the deadline; the others end the message `Failed`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// No EmailTemplate of that name in the message's namespace.
    #[error("EmailTemplate {name} not found in namespace {namespace}; the message is sent when it exists")]
    NotFound {
        /// The name in templateRef.
        name: String,
        /// The message's namespace.
        namespace: String,
    },
    /// The template did not render.
    #[error("EmailTemplate {name}: {source}")]
    Render {
        /// The template.
        name: String,
        /// What went wrong.
        source: RenderError,
    },
    /// The message names a template and brings its own subject or body (the CRD's rules refuse
    /// this; kept for messages written before them).
    #[error("the message names EmailTemplate {0} and has its own subject or body; the template supplies both")]
    Conflict(String),
    /// The message has neither a body nor a template (refused by the CRD's rules as well).
    #[error("the message has no body and no templateRef")]
    NoBody,
}

impl TemplateError {
    /// A CamelCase reason for conditions and Events.
    pub fn reason(&self) -> Reason {
        match self {
            TemplateError::NotFound { .. } => Reason::TemplateNotFound,
            TemplateError::Render { source, .. } => source.reason(),
            TemplateError::Conflict(_) => Reason::TemplateConflict,
            TemplateError::NoBody => Reason::MissingBody,
        }
    }
}

/// The template a message is rendered from, if any: the subject and body come either from the
/// message or from its template, never from both.
pub fn template_of(spec: &EmailMessageSpec) -> Result<Option<&LocalReference>, TemplateError> {
    match &spec.template_ref {
        Some(r) if !spec.body.is_empty() || !spec.subject.is_empty() => Err(TemplateError::Conflict(r.name.clone())),
        Some(r) => Ok(Some(r)),
        None if spec.body.is_empty() => Err(TemplateError::NoBody),
        None => Ok(None),
    }
}

/// Renders a template with a message's values. Undefined values are errors (a misspelt name does not
/// silently become an empty string), only the HTML body is HTML-escaped, there is no loader (no
/// `include` of files or other templates), and each part has [`TEMPLATE_FUEL`] and an output limit.
pub fn render(
    template: &EmailTemplateSpec,
    values: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<Rendered, RenderError> {
    let env = environment();
    let empty = serde_json::Map::new();
    let ctx = Value::from(Serde(values.unwrap_or(&empty)));
    let subject =
        render_part(&env, SUBJECT, &template.subject, &ctx, MAX_RENDERED_SUBJECT_BYTES).map_err(|e| match e {
            RenderError::TooLarge { .. } => RenderError::SubjectTooLong,
            e => e,
        })?;
    if subject.contains(['\r', '\n', '\0']) {
        return Err(RenderError::SubjectLineBreak);
    }
    if subject.chars().count() > MAX_SUBJECT_CHARS {
        return Err(RenderError::SubjectTooLong);
    }
    let body = |part: &'static str, source: &Option<String>| -> Result<Option<String>, RenderError> {
        match source {
            Some(s) => {
                Ok(Some(render_part(&env, part, s, &ctx, MAX_RENDERED_BODY_BYTES)?).filter(|r| !r.trim().is_empty()))
            }
            None => Ok(None),
        }
    };
    let text = body(TEXT, &template.text)?;
    let html = body(HTML, &template.html)?;
    if text.is_none() && html.is_none() {
        return Err(RenderError::EmptyBody);
    }
    Ok(Rendered { subject, text, html })
}

fn environment<'s>() -> Environment<'s> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // The template's name decides the escaping: only the html part is HTML.
    env.set_auto_escape_callback(|name| if name == HTML { AutoEscape::Html } else { AutoEscape::None });
    env.set_fuel(Some(TEMPLATE_FUEL));
    env
}

fn render_part(
    env: &Environment<'_>,
    part: &'static str,
    source: &str,
    ctx: &Value,
    limit: usize,
) -> Result<String, RenderError> {
    let error = |e: minijinja::Error| {
        let mut reason = e.kind().to_string();
        match (e.detail(), e.range().and_then(|r| source.get(r))) {
            (Some(detail), _) => reason = format!("{reason}: {detail}"),
            (None, Some(near)) => reason = format!("{reason}, at `{}`", excerpt(near)),
            (None, None) => {}
        }
        RenderError::Template { part, line: e.line(), reason }
    };
    let template = env.template_from_named_str(part, source).map_err(error)?;
    let mut out = CappedOutput { bytes: Vec::new(), limit, overflowed: false };
    match template.render_captured_to(ctx.clone(), &mut out) {
        Ok(_) => {}
        Err(_) if out.overflowed => return Err(RenderError::TooLarge { part, limit }),
        Err(e) => return Err(error(e)),
    }
    String::from_utf8(out.bytes).map_err(|e| RenderError::Template { part, line: None, reason: e.to_string() })
}

/// A piece of template source on one short line, for an error message.
fn excerpt(source: &str) -> String {
    let line = source.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(60) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line,
    }
}

/// Output that refuses to grow past a limit, which stops the rendering.
struct CappedOutput {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(io::Error::other("rendered output over its limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The spec with the rendered subject and body in place of the message's own.
pub fn with_rendered(spec: &EmailMessageSpec, rendered: Rendered) -> EmailMessageSpec {
    EmailMessageSpec {
        subject: rendered.subject,
        body: Body { text: rendered.text, html: rendered.html },
        ..spec.clone()
    }
}

/// The message's EmailTemplate when it names one that does not exist (yet), read with a GET
/// before the message is claimed, so that it waits without an attempt.
pub async fn missing_template(
    client: &Client,
    namespace: &str,
    spec: &EmailMessageSpec,
) -> Result<Option<TemplateError>, kube::Error> {
    let Some(reference) = &spec.template_ref else {
        return Ok(None);
    };
    let api: Api<EmailTemplate> = Api::namespaced(client.clone(), namespace);
    Ok(match api.get_opt(&reference.name).await? {
        Some(_) => None,
        None => Some(TemplateError::NotFound { name: reference.name.clone(), namespace: namespace.to_string() }),
    })
}

/// The spec a message is built from: its own, or with the subject and body rendered from its
/// EmailTemplate, read with a GET (templates change rarely; no watch or cache needed).
pub async fn render_message<'a>(
    client: &Client,
    namespace: &str,
    spec: &'a EmailMessageSpec,
) -> Result<Result<Cow<'a, EmailMessageSpec>, TemplateError>, kube::Error> {
    let reference = match template_of(spec) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(Ok(Cow::Borrowed(spec))),
        Err(e) => return Ok(Err(e)),
    };
    let api: Api<EmailTemplate> = Api::namespaced(client.clone(), namespace);
    let Some(template) = api.get_opt(&reference.name).await? else {
        return Ok(Err(TemplateError::NotFound { name: reference.name.clone(), namespace: namespace.to_string() }));
    };
    Ok(match render(&template.spec, spec.values.as_ref()) {
        Ok(rendered) => Ok(Cow::Owned(with_rendered(spec, rendered))),
        Err(source) => Err(TemplateError::Render { name: reference.name.clone(), source }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    fn template(subject: &str, text: Option<&str>, html: Option<&str>) -> EmailTemplateSpec {
        EmailTemplateSpec { subject: subject.into(), text: text.map(Into::into), html: html.map(Into::into) }
    }

    fn values(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn renders_all_three_parts_and_escapes_only_html() {
        let t = template(
            "Deployed {{ app }} {{ version }} to {{ environment }}",
            Some("{{ app }} <{{ version }}> & {{ notes }}"),
            Some("<p>{{ app }}: {{ notes }}</p>{% for c in changes %}<li>{{ c }}</li>{% endfor %}"),
        );
        let v = values(json!({
            "app": "shop", "version": "1.4.2", "environment": "prod",
            "notes": "a < b & \"c\"", "changes": ["<script>", "fix"]
        }));
        let r = render(&t, Some(&v)).unwrap();
        assert_eq!(r.subject, "Deployed shop 1.4.2 to prod");
        assert_eq!(r.text.as_deref(), Some("shop <1.4.2> & a < b & \"c\""));
        assert_eq!(
            r.html.as_deref(),
            Some("<p>shop: a &lt; b &amp; &quot;c&quot;</p><li>&lt;script&gt;</li><li>fix</li>")
        );
    }

    #[test]
    fn safe_marks_html_as_trusted_and_nested_values_work() {
        let t = template("{{ build.id }}", None, Some("{{ snippet | safe }} {{ build.url }}"));
        let v = values(json!({"build": {"id": 7, "url": "https://ci/7?a=1&b=2"}, "snippet": "<b>ok</b>"}));
        let r = render(&t, Some(&v)).unwrap();
        assert_eq!(r.subject, "7");
        assert_eq!(r.html.as_deref(), Some("<b>ok</b> https:&#x2f;&#x2f;ci&#x2f;7?a=1&amp;b=2"));
        assert_eq!(r.text, None);
    }

    #[test]
    fn a_missing_value_is_an_error_naming_part_and_line() {
        let t = template("ok", Some("line one\n{{ app }}\n{{ version }}"), None);
        let err = render(&t, Some(&values(json!({"app": "shop"})))).unwrap_err();
        let RenderError::Template { part, line, reason } = &err else { panic!("{err:?}") };
        assert_eq!((*part, *line), ("text", Some(3)));
        assert_eq!(reason, "undefined value: `version` is undefined");
        assert!(err.to_string().starts_with("the text template, line 3: "), "{err}");
        assert_eq!(err.reason(), "TemplateError");
        // Without values at all, too.
        let err = render(&template("{{ app }}", Some("x"), None), None).unwrap_err();
        assert!(matches!(err, RenderError::Template { part: "subject", line: Some(1), .. }), "{err:?}");
        // A default or a test makes a value optional on purpose.
        let t = template("{{ app | default('app') }}{% if env is defined %} in {{ env }}{% endif %}", Some("x"), None);
        assert_eq!(render(&t, None).unwrap().subject, "app");
    }

    #[test]
    fn a_syntax_error_names_part_and_line() {
        let t = template("ok", Some("x"), Some("<p>\n{% if app %}\n{{ app }\n"));
        let err = render(&t, Some(&values(json!({"app": "a"})))).unwrap_err();
        let RenderError::Template { part, line, reason } = &err else { panic!("{err:?}") };
        assert_eq!((*part, *line), ("html", Some(3)));
        assert!(reason.contains("syntax error"), "{reason}");
    }

    #[test]
    fn a_subject_with_a_line_break_is_refused() {
        let t = template("Deploy {{ title }}", Some("x"), None);
        for bad in ["a\nBcc: victim@example.com", "a\rb", "a\0b"] {
            let err = render(&t, Some(&values(json!({"title": bad})))).unwrap_err();
            assert_eq!(err, RenderError::SubjectLineBreak, "{bad:?}");
            assert_eq!(err.reason(), "InvalidSubject");
        }
        let long = "é".repeat(MAX_SUBJECT_CHARS);
        let err = render(&t, Some(&values(json!({"title": long})))).unwrap_err();
        assert_eq!(err, RenderError::SubjectTooLong);
        // One trailing newline of the template itself (a YAML block scalar) is not part of the output.
        assert_eq!(
            render(&template("Hi {{ title }}\n", Some("x"), None), Some(&values(json!({"title": "t"}))))
                .unwrap()
                .subject,
            "Hi t"
        );
    }

    #[test]
    fn hostile_templates_stop_with_an_error() {
        // Endless work.
        let t = template(
            "ok",
            Some("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
            None,
        );
        let err = render(&t, None).unwrap_err();
        assert!(matches!(&err, RenderError::Template { reason, .. } if reason.contains("out of fuel")), "{err:?}");
        // A huge string, built in one step or doubled over and over: refused before it is allocated.
        let t = template("ok", Some("{{ 'x' * 100000000 }}"), None);
        let err = render(&t, None).unwrap_err().to_string();
        assert_eq!(err, "the text template, line 1: engine ran out of fuel, at `'x' * 100000000`");
        let t = template(
            "ok",
            Some(&format!("{{% set a = 'x' * 1000 %}}{}{{{{ a }}}}", "{% set a = a ~ a %}".repeat(40))),
            None,
        );
        assert!(render(&t, None).unwrap_err().to_string().contains("out of fuel"));
        // Output over the limit, within the fuel.
        let t = template("ok", Some("{% for i in range(3) %}{{ 'x' * 500000 }}{% endfor %}"), None);
        assert_eq!(
            render(&t, None).unwrap_err(),
            RenderError::TooLarge { part: "text", limit: MAX_RENDERED_BODY_BYTES }
        );
        // No loader: nothing to include.
        let t = template("ok", Some("{% include '/etc/passwd' %}"), None);
        assert!(render(&t, None).unwrap_err().to_string().contains("template not found"));
        // Unbounded recursion.
        let t = template("ok", Some("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"), None);
        assert!(render(&t, None).unwrap_err().to_string().contains("recursion limit"));
    }

    #[test]
    fn empty_bodies_are_dropped_and_both_empty_is_an_error() {
        let t = template("s", Some("{% if text %}{{ text }}{% endif %}"), Some("<p>{{ text }}</p>"));
        let r = render(&t, Some(&values(json!({"text": ""})))).unwrap();
        assert_eq!((r.text, r.html.as_deref()), (None, Some("<p></p>")));
        let t = template("s", Some("  "), Some("{{ '' }}\n"));
        assert_eq!(render(&t, None).unwrap_err(), RenderError::EmptyBody);
    }

    fn spec(extra: serde_json::Value) -> EmailMessageSpec {
        let mut base = json!({"profileRef": {"name": "p"}, "to": ["a@contoso.com"]});
        base.as_object_mut().unwrap().extend(values(extra));
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn subject_and_body_come_from_the_message_or_the_template_never_both() {
        let own = spec(json!({"subject": "s", "body": {"text": "t"}}));
        assert_eq!(template_of(&own), Ok(None));
        let templated = spec(json!({"templateRef": {"name": "deploy"}, "values": {"app": "shop"}}));
        assert_eq!(template_of(&templated).unwrap().map(|r| r.name.as_str()), Some("deploy"));
        for both in [
            json!({"templateRef": {"name": "deploy"}, "subject": "mine"}),
            json!({"templateRef": {"name": "deploy"}, "body": {"html": "<p>mine</p>"}}),
        ] {
            let err = template_of(&spec(both)).unwrap_err();
            assert_eq!(err.reason(), "TemplateConflict");
        }
        assert_eq!(template_of(&spec(json!({"subject": "s"}))).unwrap_err(), TemplateError::NoBody);
    }

    #[test]
    fn the_rendered_spec_keeps_everything_else() {
        let s = spec(json!({"templateRef": {"name": "deploy"}, "values": {"app": "shop"}, "headers": {"X-Run": "1"}}));
        let r = Rendered { subject: "S".into(), text: Some("T".into()), html: None };
        let out = with_rendered(&s, r);
        assert_eq!((out.subject.as_str(), out.body.text.as_deref(), out.body.html), ("S", Some("T"), None));
        assert_eq!((out.to, out.headers, out.template_ref, out.values), (s.to, s.headers, s.template_ref, s.values));
    }

    #[test]
    fn template_errors_read_as_reasons() {
        let nf = TemplateError::NotFound { name: "deploy".into(), namespace: "team-a".into() };
        assert_eq!(
            (nf.reason(), nf.to_string().as_str()),
            (
                Reason::TemplateNotFound,
                "EmailTemplate deploy not found in namespace team-a; the message is sent when it exists"
            )
        );
        let r = TemplateError::Render {
            name: "deploy".into(),
            source: RenderError::Template { part: "html", line: Some(4), reason: "undefined value".into() },
        };
        assert_eq!(r.reason(), "TemplateError");
        assert_eq!(r.to_string(), "EmailTemplate deploy: the html template, line 4: undefined value");
    }

    /// The example a user copies renders with its own values, and a value with `<` is escaped in HTML only.
    #[test]
    fn the_example_renders() {
        let docs: Vec<serde_yaml::Value> =
            serde_yaml::Deserializer::from_str(include_str!("../../examples/deployment-notification.yaml"))
                .map(|d| serde_yaml::Value::deserialize(d).unwrap())
                .collect();
        let t: EmailTemplate = serde_yaml::from_value(docs[0].clone()).unwrap();
        let m: crate::api::EmailMessage = serde_yaml::from_value(docs[1].clone()).unwrap();
        assert_eq!(m.spec.template_ref.as_ref().map(|r| r.name.as_str()), t.metadata.name.as_deref());
        let r = render(&t.spec, m.spec.values.as_ref()).unwrap();
        assert_eq!(r.subject, "[production] shop 1.4.2 deployed");
        assert!(r.text.is_some_and(|t| t.ends_with("Notes:   Rollout took < 5 minutes")));
        assert!(r.html.is_some_and(|h| h.contains("<p>Rollout took &lt; 5 minutes</p>")));
        // The error the README shows for a missing value.
        let mut values = m.spec.values.clone().unwrap();
        values.remove("commit");
        let err = render(&t.spec, Some(&values)).unwrap_err();
        assert_eq!(err.to_string(), "the text template, line 3: undefined value: `commit` is undefined");
    }
}
