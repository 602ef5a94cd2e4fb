//! `mailroom send`: one EmailMessage from flags, files and stdin; optionally waits for its outcome.
//!
//! Files up to [`INLINE_LIMIT`] travel inline in the message (base64 `data`). Larger ones go into
//! one Secret named like the message and owned by it: the Secret is created first (so the
//! operator never sees a message whose attachment is missing), then the message, then the
//! Secret's ownerReference is set to the message's uid (so deleting the message deletes it).
//!
//! With `--eml` the message is a ready-made RFC 5322 one: it goes into such a Secret under
//! `message.eml`, and the EmailMessage names it in `spec.raw` (see the README's Raw messages).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rand::Rng;
use serde_json::json;

use super::{CliError, exit, parse_duration, printable};
use crate::api::{
    Attachment, Body, DEFAULT_RAW_KEY, Delivery, EmailMessage, EmailMessageSpec, EmailMessageStatus, HeaderValue,
    Importance, LocalKeySelector, LocalReference, Phase, ProfileKind, ProfileRef, RawMessage, RawSecretRef, conditions,
    find_condition,
};
use crate::controller::steps::safe_attachment_name;
use crate::transport::parse_mailbox;

/// Files up to this size go inline in the message; larger ones into its Secret.
pub const INLINE_LIMIT: usize = 64 * 1024;
/// Inline files together stay under this, so the message stays far below etcd's request limit.
pub const INLINE_TOTAL_LIMIT: usize = 256 * 1024;
/// Kubernetes' limit on a Secret's data (keys and values together).
pub const SECRET_LIMIT: usize = 1024 * 1024;
/// `--max-attempts`: the CRD's range of `delivery.maxAttempts` (a unit test compares them).
pub const MAX_ATTEMPTS: std::ops::RangeInclusive<u32> = 1..=100;
/// `--deadline`: the CRD's minimum of `delivery.deadlineSeconds`.
pub const MIN_DEADLINE_SECONDS: u64 = 1;

/// Flags of `mailroom send`.
#[derive(clap::Args, Debug, Clone)]
pub struct SendArgs {
    /// The profile that sends the message: a MailProfile in the namespace (or see --cluster-profile).
    #[arg(long)]
    pub profile: String,
    /// The profile is a ClusterMailProfile.
    #[arg(long)]
    pub cluster_profile: bool,
    /// A recipient (repeatable): `user@example.com` or `Name <user@example.com>`.
    #[arg(long, value_name = "MAILBOX")]
    pub to: Vec<String>,
    /// A copy recipient (repeatable).
    #[arg(long, value_name = "MAILBOX")]
    pub cc: Vec<String>,
    /// A blind copy recipient (repeatable).
    #[arg(long, value_name = "MAILBOX")]
    pub bcc: Vec<String>,
    /// Where replies go (repeatable).
    #[arg(long, value_name = "MAILBOX")]
    pub reply_to: Vec<String>,
    /// The sender; default: the profile's default sender.
    #[arg(long, value_name = "MAILBOX")]
    pub from: Option<String>,
    /// The subject.
    #[arg(long, default_value = "")]
    pub subject: String,
    /// The plain text body itself (`--text "Deploy done"`); see --text-file for a file or stdin.
    #[arg(long, value_name = "TEXT")]
    pub text: Option<String>,
    /// The plain text body from a file, or `-` for stdin.
    #[arg(long, value_name = "FILE|-")]
    pub text_file: Option<String>,
    /// The HTML body itself; see --html-file for a file or stdin.
    #[arg(long, value_name = "HTML")]
    pub html: Option<String>,
    /// The HTML body from a file, or `-` for stdin.
    #[arg(long, value_name = "FILE|-")]
    pub html_file: Option<String>,
    /// An EmailTemplate in the namespace that renders the subject and bodies (instead of --subject and the body flags).
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    /// A template value (repeatable): `key=value`, the value a string.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Template values from a YAML or JSON object in a file, or `-` for stdin; --set wins over it.
    #[arg(long, value_name = "FILE|-")]
    pub values: Option<String>,
    /// A ready-made RFC 5322 message (an .eml file), or `-` for stdin, sent as it is (instead of
    /// --subject, the body flags, --template and --attach). --to, --cc and --bcc, when given, are
    /// its envelope recipients; else its own To, Cc and Bcc are.
    #[arg(long, value_name = "FILE|-")]
    pub eml: Option<String>,
    /// A file to attach (repeatable); its content type is guessed from its name.
    #[arg(long, value_name = "FILE")]
    pub attach: Vec<PathBuf>,
    /// A custom header (repeatable): `X-Name=value`.
    #[arg(long, value_name = "X-NAME=VALUE")]
    pub header: Vec<String>,
    /// low, normal or high.
    #[arg(long, value_enum)]
    pub importance: Option<ImportanceArg>,
    /// The namespace of the message (default: the kubeconfig context's, else `default`).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The prefix of the message's generated name.
    #[arg(long, value_name = "PREFIX", default_value = "send-")]
    pub generate_name: String,
    /// Attempts before the message fails (delivery.maxAttempts, 1 to 100; the operator's default is 8).
    #[arg(long, value_name = "N", value_parser = parse_max_attempts)]
    pub max_attempts: Option<u32>,
    /// No attempt starts this long after the message was created (delivery.deadlineSeconds: `90s`,
    /// `30m`, `2h`; at least 1s; the operator's default is 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_deadline)]
    pub deadline: Option<u64>,
    /// Delete the message this long after it is Sent or Failed (`90s`, `10m`, `24h`, `7d`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Wait until the message is Sent or Failed.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (`30s`, `2m`, ...).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "2m")]
    pub timeout: Duration,
    /// Print the manifests (YAML) instead of creating them.
    #[arg(long)]
    pub dry_run: bool,
}

/// The Importance header, as a flag value.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportanceArg {
    /// Low.
    Low,
    /// Normal.
    Normal,
    /// High.
    High,
}

impl From<ImportanceArg> for Importance {
    fn from(i: ImportanceArg) -> Importance {
        match i {
            ImportanceArg::Low => Importance::Low,
            ImportanceArg::Normal => Importance::Normal,
            ImportanceArg::High => Importance::High,
        }
    }
}

/// A file to attach: its name and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentFile {
    /// The file name the recipient sees.
    pub name: String,
    /// Its content.
    pub bytes: Vec<u8>,
}

/// What `send` creates: the message and, for large files, its Secret.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The message.
    pub message: EmailMessage,
    /// The Secret holding the large attachments (named like the message).
    pub secret: Option<Secret>,
}

/// Runs `mailroom send`; returns the exit code.
pub async fn run(args: SendArgs) -> u8 {
    match send(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn send(args: SendArgs) -> Result<u8, CliError> {
    // Everything the command line can get wrong is found before the API server is asked anything.
    check_flags(&args)?;
    if let Some(source) = &args.eml {
        let bytes = read_eml(source)?;
        check_eml(&args, source, &bytes)?;
        let (client, namespace) = client_and_namespace(&args).await?;
        let plan = plan_raw(build_raw_spec(&args)?, bytes, &namespace, &args.generate_name);
        return create_and_wait(&args, client, &namespace, plan).await;
    }
    let text = match (&args.text, &args.text_file) {
        (Some(inline), _) => Some(inline.clone()),
        (None, Some(source)) => Some(read_source("--text-file", source)?),
        (None, None) => None,
    };
    let html = match (&args.html, &args.html_file) {
        (Some(inline), _) => Some(inline.clone()),
        (None, Some(source)) => Some(read_source("--html-file", source)?),
        (None, None) => None,
    };
    let files = args.attach.iter().map(|p| read_attachment(p)).collect::<Result<Vec<_>, _>>()?;
    let values = match args.values.as_deref() {
        Some(source) => Some(parse_values(source, &read_source("--values", source)?)?),
        None => None,
    };
    let spec = build_spec(&args, text, html, values)?;
    let (client, namespace) = client_and_namespace(&args).await?;
    let plan = plan(spec, &files, &namespace, &args.generate_name)?;
    create_and_wait(&args, client, &namespace, plan).await
}

/// The client (none with --dry-run, which contacts no API server) and the namespace.
async fn client_and_namespace(args: &SendArgs) -> Result<(Option<Client>, String), CliError> {
    if args.dry_run {
        // The kubeconfig still names the namespace; no API server is contacted.
        let namespace = match &args.namespace {
            Some(ns) => ns.clone(),
            None => kube::Config::infer().await.map(|c| c.default_namespace).unwrap_or_else(|_| "default".into()),
        };
        return Ok((None, namespace));
    }
    let (client, namespace) = super::connect(args.namespace.as_deref()).await?;
    Ok((Some(client), namespace))
}

/// Prints the plan (--dry-run) or creates it, and with --wait waits for its outcome.
async fn create_and_wait(args: &SendArgs, client: Option<Client>, namespace: &str, plan: Plan) -> Result<u8, CliError> {
    let namespace = namespace.to_string();
    let Some(client) = client else {
        print!("{}", dry_run_yaml(&plan)?);
        return Ok(exit::OK);
    };
    let created = create(&client, &namespace, plan).await?;
    let name = created.name_any();
    println!("emailmessage/{name} created in namespace {namespace}");
    if !args.wait {
        return Ok(exit::OK);
    }
    let api: Api<EmailMessage> = Api::namespaced(client, &namespace);
    let done = kube::runtime::wait::await_condition(api.clone(), &name, |m: Option<&EmailMessage>| {
        m.is_none_or(EmailMessage::is_finished)
    });
    match tokio::time::timeout(args.timeout, done).await {
        Ok(Ok(Some(message))) => {
            let status = message.status.clone().unwrap_or_default();
            print!("{}", describe(&name, &status));
            Ok(outcome_code(&status))
        }
        Ok(Ok(None)) => Err(CliError::Api(format!("emailmessage/{name} was deleted while waiting for it"))),
        Ok(Err(e)) => Err(CliError::Api(format!("watching emailmessage/{name}: {e}"))),
        Err(_) => {
            let status = api.get_opt(&name).await.ok().flatten().and_then(|m| m.status).unwrap_or_default();
            print!("{}", describe(&name, &status));
            println!(
                "timed out after {} waiting for emailmessage/{name} to be Sent or Failed",
                super::human_duration(args.timeout)
            );
            Ok(exit::TIMEOUT)
        }
    }
}

/// Reads a body or the values from a file or (`-`) stdin; [`check_flags`] made sure that only
/// one flag reads stdin.
fn read_source(flag: &str, source: &str) -> Result<String, CliError> {
    let bytes = if source == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(|e| CliError::Usage(format!("{flag}: reading stdin: {e}")))?;
        buf
    } else {
        std::fs::read(source).map_err(|e| CliError::Usage(format!("{flag} {source}: {e}")))?
    };
    String::from_utf8(bytes).map_err(|_| CliError::Usage(format!("{flag} {source}: the body is not UTF-8")))
}

/// Reads the message of `--eml` from a file or (`-`) stdin, refusing what no Secret can hold.
fn read_eml(source: &str) -> Result<Vec<u8>, CliError> {
    let limit = SECRET_LIMIT - DEFAULT_RAW_KEY.len();
    let mut bytes = Vec::new();
    let read = if source == "-" {
        std::io::stdin().take(limit as u64 + 1).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(source).and_then(|f| f.take(limit as u64 + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| CliError::Usage(format!("--eml {source}: {e}")))?;
    if bytes.len() > limit {
        return Err(CliError::Usage(format!(
            "--eml {source}: more than {limit} bytes: a raw message is kept in a Kubernetes Secret, whose data may \
             hold at most 1 MiB; send large files as links"
        )));
    }
    Ok(bytes)
}

/// Checks the message of `--eml` as the operator will (`crate::transport::raw::parse`), and that
/// it has recipients: the flags' or its own.
pub fn check_eml(args: &SendArgs, source: &str, bytes: &[u8]) -> Result<(), CliError> {
    let parsed = crate::transport::raw::parse(bytes)
        .map_err(|e| CliError::Usage(format!("--eml {source}: not a message mailroom can send: {e}")))?;
    let flags = args.to.len() + args.cc.len() + args.bcc.len();
    if flags == 0 && parsed.to.is_empty() && parsed.cc.is_empty() && parsed.bcc.is_empty() {
        return Err(CliError::Usage(format!(
            "--eml {source}: the message has no To, Cc or Bcc: name its recipients there or with --to, --cc or --bcc"
        )));
    }
    Ok(())
}

/// The spec of a raw message; [`plan_raw`] names its Secret.
pub fn build_raw_spec(args: &SendArgs) -> Result<EmailMessageSpec, CliError> {
    check_flags(args)?;
    let kind = if args.cluster_profile { Some(ProfileKind::ClusterMailProfile) } else { None };
    Ok(EmailMessageSpec {
        profile_ref: ProfileRef { kind, name: args.profile.clone() },
        from: args.from.clone(),
        to: args.to.clone(),
        cc: args.cc.clone(),
        bcc: args.bcc.clone(),
        reply_to: Vec::new(),
        subject: String::new(),
        body: Body::default(),
        attachments: Vec::new(),
        raw: Some(RawMessage { secret_ref: RawSecretRef { name: String::new(), key: None } }),
        headers: BTreeMap::new(),
        importance: None,
        delivery: delivery(args),
        template_ref: None,
        values: None,
        ttl_seconds_after_finished: ttl_seconds(args),
        idempotency_key: None,
        idempotency_retention_seconds: None,
    })
}

/// The raw message's EmailMessage and its Secret, named alike (prefix and five random characters).
pub fn plan_raw(mut spec: EmailMessageSpec, bytes: Vec<u8>, namespace: &str, prefix: &str) -> Plan {
    let name = format!("{prefix}{}", random_suffix());
    spec.raw = Some(RawMessage { secret_ref: RawSecretRef { name: name.clone(), key: None } });
    let mut message = EmailMessage::new(&name, spec);
    message.metadata.namespace = Some(namespace.to_string());
    let data = BTreeMap::from([(DEFAULT_RAW_KEY.to_string(), ByteString(bytes))]);
    let secret = crate::api::message_secret(name, namespace, "mailroom.dev/raw-message-of", data);
    Plan { message, secret: Some(secret) }
}

/// Reads a file to attach, refusing at once what can never be sent.
fn read_attachment(path: &Path) -> Result<AttachmentFile, CliError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !safe_attachment_name(&name) {
        return Err(CliError::Usage(format!("--attach {}: not a file name", path.display())));
    }
    let size = std::fs::metadata(path).map_err(|e| CliError::Usage(format!("--attach {}: {e}", path.display())))?.len();
    if size > SECRET_LIMIT as u64 {
        return Err(too_large(&name, size as usize));
    }
    let bytes = std::fs::read(path).map_err(|e| CliError::Usage(format!("--attach {}: {e}", path.display())))?;
    Ok(AttachmentFile { name, bytes })
}

fn too_large(name: &str, size: usize) -> CliError {
    CliError::Usage(format!(
        "--attach {name}: {size} bytes is too large: large attachments are kept in a Kubernetes Secret, whose data \
         is limited to 1 MiB ({SECRET_LIMIT} bytes) in all; send a link instead, or a smaller file"
    ))
}

/// Checks one mailbox flag with the parser the operator uses.
fn check_mailbox(flag: &str, value: &str) -> Result<(), CliError> {
    parse_mailbox(value).map(drop).map_err(|e| CliError::Usage(format!("--{flag}: {e}")))
}

/// Parses `X-Name=value` as a custom header; the name rules are the CRD's.
pub fn parse_header(input: &str) -> Result<(String, String), String> {
    let Some((name, value)) = input.split_once('=') else {
        return Err(format!("--header {input:?}: expected X-Name=value"));
    };
    let name = name.trim();
    let valid_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+.^_`|~-".contains(c);
    let rest = name.strip_prefix("X-").or_else(|| name.strip_prefix("x-"));
    if !rest.is_some_and(|r| !r.is_empty() && r.chars().all(valid_char)) {
        return Err(format!(
            "--header {input:?}: the name must be an X- header of letters, digits and -, such as X-Pipeline-Run"
        ));
    }
    if value.contains(['\r', '\n']) {
        return Err(format!("--header {name}: the value must not contain a line break"));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Parses `key=value` as a template value.
pub fn parse_set(input: &str) -> Result<(String, String), String> {
    match input.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_string(), value.to_string())),
        _ => Err(format!("--set {input:?}: expected key=value")),
    }
}

/// Parses template values: a YAML (or JSON) object.
pub fn parse_values(source: &str, text: &str) -> Result<serde_json::Map<String, serde_json::Value>, CliError> {
    let value: serde_json::Value =
        serde_yaml::from_str(text).map_err(|e| CliError::Usage(format!("--values {source}: {e}")))?;
    match value {
        serde_json::Value::Object(map) => Ok(map),
        serde_json::Value::Null => Ok(serde_json::Map::new()),
        _ => Err(CliError::Usage(format!("--values {source}: expected an object of names and values"))),
    }
}

/// The inline and the file form of the bodies: `--text`/`--text-file`, `--html`/`--html-file`.
fn check_bodies(args: &SendArgs) -> Result<(), CliError> {
    for (inline, file, value) in [
        ("--text", "--text-file", (&args.text, &args.text_file)),
        ("--html", "--html-file", (&args.html, &args.html_file)),
    ] {
        match value {
            (Some(_), Some(_)) => {
                return Err(CliError::Usage(format!(
                    "{inline} and {file} both give the body: use {inline} TEXT for the body itself, or {file} FILE|- \
                     to read it from a file or stdin"
                )));
            }
            // `--text -` read stdin before --text took the body itself; a body of "-" is that mistake.
            (Some(body), None) if body == "-" => {
                return Err(CliError::Usage(format!(
                    "{inline} takes the body itself; to read it from stdin use {file} -"
                )));
            }
            _ => {}
        }
    }
    let stdin_readers: Vec<&str> =
        [("--text-file", &args.text_file), ("--html-file", &args.html_file), ("--values", &args.values)]
            .into_iter()
            .filter(|(_, source)| source.as_deref() == Some("-"))
            .map(|(flag, _)| flag)
            .collect();
    if stdin_readers.len() > 1 {
        return Err(CliError::Usage(format!(
            "stdin can be read only once, and {} ask for it (`-`): give all but one of them a file",
            stdin_readers.join(" and ")
        )));
    }
    Ok(())
}

/// Parses `--max-attempts`: the range of the CRD's `delivery.maxAttempts`.
pub fn parse_max_attempts(input: &str) -> Result<u32, String> {
    let n: u32 = input.trim().parse().map_err(|_| format!("{input:?} is not a whole number"))?;
    if !MAX_ATTEMPTS.contains(&n) {
        return Err(format!("{n} is out of range: from {} to {}", MAX_ATTEMPTS.start(), MAX_ATTEMPTS.end()));
    }
    Ok(n)
}

/// Parses `--deadline` into `delivery.deadlineSeconds`: a duration of at least a second (the
/// CRD's minimum), at most what its int64 holds.
pub fn parse_deadline(input: &str) -> Result<u64, String> {
    let seconds = parse_duration(input)?.as_secs();
    if seconds < MIN_DEADLINE_SECONDS {
        return Err(format!("{input:?} is too short: at least {MIN_DEADLINE_SECONDS}s"));
    }
    if i64::try_from(seconds).is_err() {
        return Err(format!("{input:?} is too long"));
    }
    Ok(seconds)
}

/// Checks the flags that need no file or stdin, so that a typo fails before stdin is read.
pub fn check_flags(args: &SendArgs) -> Result<(), CliError> {
    if args.eml.is_some() {
        return check_eml_flags(args);
    }
    check_bodies(args)?;
    let has_body = args.text.is_some() || args.text_file.is_some() || args.html.is_some() || args.html_file.is_some();
    match &args.template {
        Some(_) if has_body || !args.subject.is_empty() => {
            return Err(CliError::Usage(
                "--template supplies the subject and the bodies: leave out --subject, --text, --text-file, --html \
                 and --html-file"
                    .into(),
            ));
        }
        Some(name) if name.is_empty() => return Err(CliError::Usage("--template needs a name".into())),
        Some(_) => {}
        None if !args.set.is_empty() || args.values.is_some() => {
            return Err(CliError::Usage("--set and --values need --template".into()));
        }
        None if !has_body => {
            return Err(CliError::Usage(
                "a body is needed: --text TEXT or --text-file FILE|-, --html HTML or --html-file FILE|- (or a text \
                 and an HTML body), or --template NAME"
                    .into(),
            ));
        }
        None => {}
    }
    for pair in &args.set {
        parse_set(pair).map_err(CliError::Usage)?;
    }
    if args.to.is_empty() && args.cc.is_empty() && args.bcc.is_empty() {
        return Err(CliError::Usage("at least one recipient is needed: --to, --cc or --bcc".into()));
    }
    for (flag, list) in [("to", &args.to), ("cc", &args.cc), ("bcc", &args.bcc), ("reply-to", &args.reply_to)] {
        for value in list {
            check_mailbox(flag, value)?;
        }
    }
    if let Some(from) = &args.from {
        check_mailbox("from", from)?;
    }
    if args.subject.contains(['\r', '\n']) {
        return Err(CliError::Usage("--subject must be one line".into()));
    }
    for h in &args.header {
        parse_header(h).map_err(CliError::Usage)?;
    }
    Ok(())
}

/// The flags of `--eml`: it is the whole message, so the flags that build one do not go with it.
fn check_eml_flags(args: &SendArgs) -> Result<(), CliError> {
    let builders = [
        ("--subject", !args.subject.is_empty()),
        ("--text", args.text.is_some()),
        ("--text-file", args.text_file.is_some()),
        ("--html", args.html.is_some()),
        ("--html-file", args.html_file.is_some()),
        ("--template", args.template.is_some()),
        ("--set", !args.set.is_empty()),
        ("--values", args.values.is_some()),
        ("--attach", !args.attach.is_empty()),
        ("--header", !args.header.is_empty()),
        ("--importance", args.importance.is_some()),
        ("--reply-to", !args.reply_to.is_empty()),
    ];
    let given: Vec<&str> = builders.iter().filter(|(_, set)| *set).map(|(flag, _)| *flag).collect();
    if !given.is_empty() {
        return Err(CliError::Usage(format!(
            "--eml is the whole message: leave out {} (--to, --cc and --bcc, when given, are its envelope recipients)",
            given.join(", ")
        )));
    }
    if args.eml.as_deref() == Some("") {
        return Err(CliError::Usage("--eml needs a file, or - for stdin".into()));
    }
    for (flag, list) in [("to", &args.to), ("cc", &args.cc), ("bcc", &args.bcc)] {
        for value in list {
            check_mailbox(flag, value)?;
        }
    }
    if let Some(from) = &args.from {
        check_mailbox("from", from)?;
    }
    Ok(())
}

/// The message's spec from the flags and the bodies read (attachments are added by [`plan`]).
pub fn build_spec(
    args: &SendArgs,
    text: Option<String>,
    html: Option<String>,
    values: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<EmailMessageSpec, CliError> {
    check_flags(args)?;
    if args.template.is_none() && text.is_none() && html.is_none() {
        return Err(CliError::Usage(
            "a body is needed: --text TEXT or --text-file FILE|-, --html HTML or --html-file FILE|- (or both)".into(),
        ));
    }
    let mut values = values.unwrap_or_default();
    for pair in &args.set {
        let (key, value) = parse_set(pair).map_err(CliError::Usage)?;
        values.insert(key, serde_json::Value::String(value));
    }
    let values = (args.template.is_some() && !values.is_empty()).then_some(values);
    let mut headers = BTreeMap::new();
    for h in &args.header {
        let (name, value) = parse_header(h).map_err(CliError::Usage)?;
        headers.insert(name, HeaderValue(value));
    }
    let kind = if args.cluster_profile { Some(ProfileKind::ClusterMailProfile) } else { None };
    Ok(EmailMessageSpec {
        profile_ref: ProfileRef { kind, name: args.profile.clone() },
        from: args.from.clone(),
        to: args.to.clone(),
        cc: args.cc.clone(),
        bcc: args.bcc.clone(),
        reply_to: args.reply_to.clone(),
        subject: args.subject.clone(),
        body: Body { text, html },
        attachments: Vec::new(),
        raw: None,
        headers,
        importance: args.importance.map(Into::into),
        delivery: delivery(args),
        template_ref: args.template.clone().map(|name| LocalReference { name }),
        values,
        ttl_seconds_after_finished: ttl_seconds(args),
        idempotency_key: None,
        idempotency_retention_seconds: None,
    })
}

/// `delivery` from --max-attempts and --deadline, when either is given.
fn delivery(args: &SendArgs) -> Option<Delivery> {
    (args.max_attempts.is_some() || args.deadline.is_some()).then_some(Delivery {
        max_attempts: args.max_attempts,
        deadline_seconds: args.deadline,
        on_uncertain: None,
    })
}

/// `ttlSecondsAfterFinished` from --ttl.
fn ttl_seconds(args: &SendArgs) -> Option<i64> {
    args.ttl.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Where each file goes: inline while small, else into the Secret.
pub fn place_attachments(files: &[AttachmentFile]) -> Vec<bool> {
    let mut inline_total = 0usize;
    files
        .iter()
        .map(|f| {
            let inline = f.bytes.len() <= INLINE_LIMIT && inline_total + f.bytes.len() <= INLINE_TOTAL_LIMIT;
            if inline {
                inline_total += f.bytes.len();
            }
            inline
        })
        .collect()
}

/// A Secret key for a file name: the characters a key allows, unique among `taken`.
pub fn secret_key(name: &str, taken: &[String]) -> String {
    let base: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' }).collect();
    let base = if base.trim_matches('.').is_empty() { "attachment".to_string() } else { base };
    let mut key = base.clone();
    let mut n = 2;
    while taken.contains(&key) {
        key = format!("{n}-{base}");
        n += 1;
    }
    key
}

/// The message and its Secret for `spec` and the files. With large files the name is chosen
/// here (prefix and five random characters, as the API server's generateName does), so that
/// the message can name its Secret before either exists.
pub fn plan(
    mut spec: EmailMessageSpec,
    files: &[AttachmentFile],
    namespace: &str,
    prefix: &str,
) -> Result<Plan, CliError> {
    let placement = place_attachments(files);
    let needs_secret = placement.iter().any(|inline| !inline);
    let name = needs_secret.then(|| format!("{prefix}{}", random_suffix()));
    let mut secret_data = BTreeMap::new();
    let mut taken = Vec::new();
    let mut secret_size = 0usize;
    for (file, inline) in files.iter().zip(placement) {
        let content_type = Some(crate::controller::steps::guessed_content_type(&file.name));
        if inline {
            use base64::Engine;
            let data = base64::engine::general_purpose::STANDARD.encode(&file.bytes);
            spec.attachments.push(Attachment {
                name: file.name.clone(),
                content_type,
                secret_ref: None,
                config_map_ref: None,
                data: Some(data),
            });
            continue;
        }
        let key = secret_key(&file.name, &taken);
        secret_size += key.len() + file.bytes.len();
        if secret_size > SECRET_LIMIT {
            return Err(too_large("(the large files together)", secret_size));
        }
        taken.push(key.clone());
        secret_data.insert(key.clone(), ByteString(file.bytes.clone()));
        spec.attachments.push(Attachment {
            name: file.name.clone(),
            content_type,
            secret_ref: Some(LocalKeySelector { name: name.clone().unwrap_or_default(), key }),
            config_map_ref: None,
            data: None,
        });
    }
    let mut message = EmailMessage::new("", spec);
    message.metadata = ObjectMeta {
        name: name.clone(),
        generate_name: if name.is_some() { None } else { Some(prefix.to_string()) },
        namespace: Some(namespace.to_string()),
        ..Default::default()
    };
    let secret =
        name.map(|name| crate::api::message_secret(name, namespace, "mailroom.dev/attachments-of", secret_data));
    Ok(Plan { message, secret })
}

fn random_suffix() -> String {
    // The API server's alphabet for generated names: no vowels, no digits that look like letters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// The manifests of a plan as one YAML stream: the Secret (if any), then the message.
pub fn dry_run_yaml(plan: &Plan) -> Result<String, CliError> {
    let yaml = |v: serde_json::Value| serde_yaml::to_string(&v).map_err(|e| CliError::Usage(e.to_string()));
    let mut out = String::new();
    if let Some(secret) = &plan.secret {
        let mut v = serde_json::to_value(secret).map_err(|e| CliError::Usage(e.to_string()))?;
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Secret");
        out.push_str(&yaml(v)?);
        out.push_str("---\n");
    }
    out.push_str(&yaml(serde_json::to_value(&plan.message).map_err(|e| CliError::Usage(e.to_string()))?)?);
    Ok(out)
}

/// Secret, message, then the Secret's ownerReference; a message that cannot be created takes
/// its Secret with it.
async fn create(client: &Client, namespace: &str, plan: Plan) -> Result<EmailMessage, CliError> {
    let messages: Api<EmailMessage> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_error = |what: &str, e: kube::Error| CliError::Api(format!("{what}: {e}"));
    if let Some(secret) = &plan.secret {
        secrets
            .create(&PostParams::default(), secret)
            .await
            .map_err(|e| api_error("creating the message's Secret", e))?;
    }
    let created = match messages.create(&PostParams::default(), &plan.message).await {
        Ok(m) => m,
        Err(e) => {
            if let Some(name) = plan.secret.as_ref().and_then(|s| s.metadata.name.as_deref()) {
                let _ = secrets.delete(name, &DeleteParams::default()).await;
            }
            return Err(api_error("creating the EmailMessage", e));
        }
    };
    if let Some(name) = plan.secret.as_ref().and_then(|s| s.metadata.name.as_deref()) {
        let owner = owner_reference(&created)?;
        let patch = json!({"metadata": {"ownerReferences": [owner]}});
        secrets.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| {
            api_error(
                &format!(
                    "emailmessage/{name} was created, but Secret {name} could not be given to it \
                         (delete the Secret yourself once the message is gone)"
                ),
                e,
            )
        })?;
    }
    Ok(created)
}

/// The reference that makes the message own its attachments' Secret.
pub fn owner_reference(message: &EmailMessage) -> Result<OwnerReference, CliError> {
    message.owner_reference().ok_or_else(|| CliError::Api("the created message has no uid".into()))
}

/// The exit code for a finished (or unfinished) status.
pub fn outcome_code(status: &EmailMessageStatus) -> u8 {
    match status.phase {
        Some(Phase::Sent) => exit::OK,
        Some(Phase::Failed) => exit::FAILED,
        _ => exit::TIMEOUT,
    }
}

/// The status as `key: value` lines, easy to read and to grep in a CI log.
pub fn describe(name: &str, status: &EmailMessageStatus) -> String {
    let phase = status.phase.unwrap_or_default();
    let condition = match phase {
        Phase::Sent => find_condition(&status.conditions, conditions::SENT),
        Phase::Failed => find_condition(&status.conditions, conditions::FAILED),
        Phase::Pending | Phase::Sending => find_condition(&status.conditions, conditions::WAITING)
            .filter(|c| c.status == "True")
            .or_else(|| find_condition(&status.conditions, conditions::SENT)),
    };
    let mut out = format!("emailmessage/{name} {phase:?}\n  phase: {phase:?}\n");
    if let Some(c) = condition {
        out.push_str(&format!("  reason: {}\n  message: {}\n", printable(&c.reason), printable(&c.message)));
    }
    out.push_str(&format!("  attempts: {}\n", status.attempts.unwrap_or(0)));
    let optional = [
        ("messageId", &status.message_id),
        ("transport", &status.transport),
        ("from", &status.from),
        ("response", &status.response),
        ("requestId", &status.request_id),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            out.push_str(&format!("  {key}: {}\n", printable(v)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SendArgs,
    }

    fn args(extra: &[&str]) -> SendArgs {
        let mut argv = vec!["send", "--profile", "relay", "--to", "Ops <ops@contoso.com>", "--text-file", "-"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("flags parse").args
    }

    fn file(name: &str, size: usize) -> AttachmentFile {
        AttachmentFile { name: name.into(), bytes: vec![b'x'; size] }
    }

    #[test]
    fn spec_from_flags() {
        let a = args(&[
            "--cc",
            "cc@contoso.com",
            "--subject",
            "Deploy ✅",
            "--header",
            "X-Run=42",
            "--importance",
            "high",
            "--ttl",
            "1h",
            "--cluster-profile",
        ]);
        let spec = build_spec(&a, Some("hi".into()), None, None).unwrap();
        assert_eq!(spec.to, ["Ops <ops@contoso.com>"]);
        assert_eq!(spec.cc, ["cc@contoso.com"]);
        assert_eq!(spec.profile_ref.kind(), ProfileKind::ClusterMailProfile);
        assert_eq!(spec.headers.get("X-Run"), Some(&HeaderValue("42".into())));
        assert_eq!(spec.importance, Some(Importance::High));
        assert_eq!(spec.ttl_seconds_after_finished, Some(3600));
        assert_eq!(a.timeout, Duration::from_secs(120), "default --timeout");
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        let bad_to = build_spec(&args(&["--to", "ops@@contoso"]), Some("x".into()), None, None).unwrap_err();
        assert!(matches!(&bad_to, CliError::Usage(m) if m.contains("--to") && m.contains("ops@@contoso")), "{bad_to}");
        let mut bodiless = args(&[]);
        bodiless.text_file = None;
        let no_body = check_flags(&bodiless).unwrap_err();
        assert!(no_body.to_string().contains("--text"), "{no_body}");
        let bad_from = build_spec(&args(&["--from", "nobody"]), Some("x".into()), None, None).unwrap_err();
        assert_eq!(bad_from.exit_code(), exit::USAGE);
        assert!(build_spec(&args(&["--subject", "a\nb"]), Some("x".into()), None, None).is_err());
    }

    #[test]
    fn template_flags() {
        let mut t = args(&["--template", "release", "--set", "version=1.4.2", "--set", "app=shop=eu"]);
        t.text_file = None;
        let values = parse_values("values.yaml", "version: '0.9'\nbuild: {url: https://ci/1}\n").unwrap();
        let spec = build_spec(&t, None, None, Some(values)).unwrap();
        assert_eq!(spec.template_ref.as_ref().map(|r| r.name.as_str()), Some("release"));
        let values = spec.values.expect("values");
        assert_eq!(values["version"], "1.4.2", "--set wins over --values");
        assert_eq!(values["app"], "shop=eu");
        assert_eq!(values["build"]["url"], "https://ci/1");
        assert!(spec.body.is_empty() && spec.subject.is_empty());

        let with_body = check_flags(&args(&["--template", "release"])).unwrap_err();
        assert!(with_body.to_string().contains("--template supplies"), "{with_body}");
        let mut with_subject = args(&["--template", "release", "--subject", "hi"]);
        with_subject.text_file = None;
        assert!(check_flags(&with_subject).is_err());
        let set_alone = check_flags(&args(&["--set", "a=b"])).unwrap_err();
        assert!(set_alone.to_string().contains("need --template"), "{set_alone}");
        let mut bad_set = args(&["--template", "release", "--set", "novalue"]);
        bad_set.text_file = None;
        assert_eq!(check_flags(&bad_set).unwrap_err().exit_code(), exit::USAGE);
        assert!(parse_values("v", "- a\n- b\n").is_err(), "a list is not an object");
    }

    /// Parses `send --profile relay --to ops@contoso.com` and `extra`, with no body flag of its own.
    fn bare(extra: &[&str]) -> Result<SendArgs, clap::Error> {
        let mut argv = vec!["send", "--profile", "relay", "--to", "ops@contoso.com"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn eml_is_the_whole_message() {
        let eml = b"From: alerts@contoso.com\r\nTo: ops@contoso.com\r\nSubject: x\r\n\r\nbody\r\n";
        let a = bare(&["--eml", "-"]).expect("parse");
        check_flags(&a).expect("--eml alone is a message");
        check_eml(&a, "-", eml).expect("a message with a recipient");
        let spec = build_raw_spec(&a).expect("spec");
        let plan = plan_raw(spec, eml.to_vec(), "team-a", "send-");
        let name = plan.message.metadata.name.clone().expect("named before creation");
        assert!(name.starts_with("send-") && name.len() == "send-".len() + 5, "{name}");
        let secret = plan.secret.expect("the Secret");
        assert_eq!(secret.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(secret.data.as_ref().and_then(|d| d.get("message.eml")).map(|b| b.0.as_slice()), Some(&eml[..]));
        let raw = plan.message.spec.raw.as_ref().expect("spec.raw");
        assert_eq!((raw.secret_ref.name.as_str(), raw.secret_ref.key()), (name.as_str(), "message.eml"));
        assert!(plan.message.spec.subject.is_empty() && plan.message.spec.body.text.is_none());

        for extra in [&["--subject", "s"][..], &["--text", "t"], &["--header", "X-A=b"], &["--importance", "high"]] {
            let mut argv = vec!["--eml", "m.eml"];
            argv.extend_from_slice(extra);
            let e = check_flags(&bare(&argv).expect("parse")).expect_err("conflict");
            assert!(e.to_string().contains(&format!("leave out {}", extra[0])), "{e}");
            assert_eq!(e.exit_code(), exit::USAGE);
        }
        let no_rcpt = b"From: alerts@contoso.com\r\n\r\nbody\r\n";
        let alone = Cli::try_parse_from(["send", "--profile", "relay", "--eml", "-"]).map(|c| c.args).expect("parse");
        let e = check_eml(&alone, "-", no_rcpt).expect_err("no recipient");
        assert!(e.to_string().contains("no To, Cc or Bcc"), "{e}");
        let argv = ["send", "--profile", "relay", "--eml", "-", "--bcc", "audit@contoso.com"];
        let with_bcc = Cli::try_parse_from(argv).map(|c| c.args).expect("parse");
        check_eml(&with_bcc, "-", no_rcpt).expect("--bcc is the envelope");
        assert!(check_eml(&a, "-", b"no header section").is_err());
    }

    #[test]
    fn inline_bodies_and_body_files() {
        let inline = bare(&["--text", "Deploy done", "--html", "<p>Deploy done</p>"]).unwrap();
        assert!(check_flags(&inline).is_ok());
        assert_eq!(inline.text.as_deref(), Some("Deploy done"));
        assert_eq!(inline.html.as_deref(), Some("<p>Deploy done</p>"));
        assert_eq!((inline.text_file.as_deref(), inline.html_file.as_deref()), (None, None));
        let files = bare(&["--text-file", "body.txt", "--html-file", "-"]).unwrap();
        assert!(check_flags(&files).is_ok());
        assert_eq!(files.text_file.as_deref(), Some("body.txt"));
        assert!(check_flags(&bare(&["--text", "plain", "--html-file", "body.html"]).unwrap()).is_ok(), "one of each");

        for (a, b) in [("--text", "--text-file"), ("--html", "--html-file")] {
            let both = check_flags(&bare(&[a, "inline", b, "body.txt"]).unwrap()).unwrap_err();
            assert_eq!(both.exit_code(), exit::USAGE);
            assert!(both.to_string().starts_with(&format!("{a} and {b} both give the body")), "{both}");
        }
        let dash = check_flags(&bare(&["--text", "-"]).unwrap()).unwrap_err();
        assert!(dash.to_string().contains("to read it from stdin use --text-file -"), "{dash}");
        let dash = check_flags(&bare(&["--html", "-"]).unwrap()).unwrap_err();
        assert!(dash.to_string().contains("--html-file -"), "{dash}");

        let twice = check_flags(&bare(&["--text-file", "-", "--html-file", "-"]).unwrap()).unwrap_err();
        assert!(twice.to_string().contains("--text-file and --html-file ask for it"), "{twice}");
        let values = check_flags(&bare(&["--template", "t", "--values", "-"]).unwrap());
        assert!(values.is_ok(), "--values alone may read stdin: {values:?}");
        let mut with_values = bare(&["--text-file", "-"]).unwrap();
        with_values.values = Some("-".into());
        let err = check_flags(&with_values).unwrap_err();
        assert!(err.to_string().contains("--text-file and --values"), "{err}");

        let none = check_flags(&bare(&[]).unwrap()).unwrap_err();
        assert!(none.to_string().contains("--text TEXT or --text-file FILE|-"), "{none}");
        let template = check_flags(&bare(&["--template", "t", "--html", "<p>x</p>"]).unwrap()).unwrap_err();
        assert!(template.to_string().contains("--html and --html-file"), "{template}");
    }

    #[test]
    fn body_files_and_stdin_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let body = dir.path().join("body.txt");
        std::fs::write(&body, "Version 1.4.2 is live.\n").unwrap();
        let path = body.display().to_string();
        assert_eq!(read_source("--text-file", &path).unwrap(), "Version 1.4.2 is live.\n");
        let missing = read_source("--text-file", "/nonexistent/body.txt").unwrap_err();
        assert_eq!(missing.exit_code(), exit::USAGE);
        assert!(missing.to_string().starts_with("--text-file /nonexistent/body.txt: "), "{missing}");
        std::fs::write(&body, [0xff, 0xfe]).unwrap();
        let binary = read_source("--html-file", &path).unwrap_err();
        assert!(binary.to_string().contains("not UTF-8"), "{binary}");
    }

    #[test]
    fn delivery_limits() {
        let a = bare(&["--text", "x", "--max-attempts", "3", "--deadline", "30m"]).unwrap();
        let spec = build_spec(&a, a.text.clone(), None, None).unwrap();
        assert_eq!(
            spec.delivery,
            Some(Delivery { max_attempts: Some(3), deadline_seconds: Some(1800), on_uncertain: None })
        );
        assert_eq!((spec.max_attempts(), spec.deadline_seconds()), (3, 1800));
        let only = bare(&["--text", "x", "--deadline", "90"]).unwrap();
        let spec = build_spec(&only, only.text.clone(), None, None).unwrap();
        assert_eq!(spec.delivery.as_ref().map(|d| (d.max_attempts, d.deadline_seconds)), Some((None, Some(90))));
        let plain = bare(&["--text", "x"]).unwrap();
        assert_eq!(build_spec(&plain, plain.text.clone(), None, None).unwrap().delivery, None, "the defaults apply");

        assert_eq!(parse_max_attempts("1"), Ok(1));
        assert_eq!(parse_max_attempts("100"), Ok(100));
        assert_eq!(parse_max_attempts("0").unwrap_err(), "0 is out of range: from 1 to 100");
        assert!(parse_max_attempts("101").is_err());
        assert!(parse_max_attempts("-1").is_err());
        assert!(parse_max_attempts("eight").is_err());
        assert_eq!(parse_deadline("2h"), Ok(7200));
        assert_eq!(parse_deadline("1s"), Ok(1));
        assert!(parse_deadline("0s").unwrap_err().contains("at least 1s"));
        assert!(parse_deadline("106751991167301d").unwrap_err().contains("too long"), "over int64 seconds");
        assert!(parse_deadline("soon").is_err());
        // clap turns a parser's refusal into a usage error (exit 64 in main).
        let err = bare(&["--text", "x", "--max-attempts", "0"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(bare(&["--text", "x", "--deadline", "0"]).is_err());
    }

    /// The flags' ranges are the CRD's: `mailroom crd`'s schema for `delivery`.
    #[test]
    fn delivery_ranges_are_the_crds() {
        let crd = crate::api::crd::all().into_iter().find(|c| c.spec.names.kind == "EmailMessage").unwrap();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let delivery = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["delivery"]["properties"];
        assert_eq!(delivery["maxAttempts"]["minimum"].as_f64(), Some(f64::from(*MAX_ATTEMPTS.start())));
        assert_eq!(delivery["maxAttempts"]["maximum"].as_f64(), Some(f64::from(*MAX_ATTEMPTS.end())));
        assert_eq!(delivery["deadlineSeconds"]["minimum"].as_f64(), Some(MIN_DEADLINE_SECONDS as f64));
        assert_eq!(delivery["deadlineSeconds"]["format"], "int64");
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header("X-Pipeline-Run=1234"), Ok(("X-Pipeline-Run".into(), "1234".into())));
        assert_eq!(parse_header("X-Url=a=b"), Ok(("X-Url".into(), "a=b".into())));
        assert!(parse_header("Subject=x").is_err());
        assert!(parse_header("X-=x").is_err());
        assert!(parse_header("X-Bad Name=x").is_err());
        assert!(parse_header("X-Run").is_err());
        assert!(parse_header("X-Run=a\r\nBcc: evil@example.com").is_err());
    }

    #[test]
    fn small_files_inline_large_ones_in_the_secret() {
        let files = [file("small.txt", 10), file("big.bin", INLINE_LIMIT + 1), file("edge.csv", INLINE_LIMIT)];
        assert_eq!(place_attachments(&files), [true, false, true]);
        let many: Vec<_> = (0..5).map(|i| file(&format!("{i}.txt"), INLINE_LIMIT)).collect();
        assert_eq!(place_attachments(&many), [true, true, true, true, false], "the inline total is bounded");

        let spec = build_spec(&args(&[]), Some("x".into()), None, None).unwrap();
        let plan = plan(spec, &files, "team-a", "deploy-").unwrap();
        let name = plan.message.metadata.name.clone().expect("a name chosen for the Secret's sake");
        assert!(name.starts_with("deploy-") && name.len() == "deploy-".len() + 5, "{name}");
        let atts = &plan.message.spec.attachments;
        assert_eq!(atts[0].data.as_deref(), Some("eHh4eHh4eHh4eA=="));
        assert_eq!(atts[0].content_type.as_deref(), Some("text/plain"));
        let r = atts[1].secret_ref.as_ref().expect("secretRef");
        assert_eq!((r.name.as_str(), r.key.as_str()), (name.as_str(), "big.bin"));
        assert_eq!(atts[1].content_type.as_deref(), Some("application/octet-stream"));
        assert_eq!(atts[2].content_type.as_deref(), Some("text/csv"));
        let secret = plan.secret.expect("a Secret");
        assert_eq!(secret.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(secret.data.unwrap()["big.bin"].0.len(), INLINE_LIMIT + 1);
    }

    #[test]
    fn without_large_files_the_server_names_the_message() {
        let spec = build_spec(&args(&[]), Some("x".into()), None, None).unwrap();
        let plan = plan(spec, &[file("a.txt", 3)], "team-a", "send-").unwrap();
        assert!(plan.secret.is_none());
        assert_eq!(plan.message.metadata.generate_name.as_deref(), Some("send-"));
        assert_eq!(plan.message.metadata.name, None);
        let yaml = dry_run_yaml(&plan).unwrap();
        let parsed: EmailMessage = serde_yaml::from_str(&yaml).expect("the dry run parses as an EmailMessage");
        assert_eq!(parsed.spec, plan.message.spec);
        assert!(yaml.contains("kind: EmailMessage") && !yaml.contains("status"), "{yaml}");
    }

    #[test]
    fn the_secret_limit_is_enforced() {
        let spec = build_spec(&args(&[]), Some("x".into()), None, None).unwrap();
        let files = [file("a.bin", 600 * 1024), file("b.bin", 600 * 1024)];
        let err = plan(spec, &files, "ns", "send-").unwrap_err();
        assert!(matches!(&err, CliError::Usage(m) if m.contains("1 MiB")), "{err}");
    }

    #[test]
    fn files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("notes.txt");
        std::fs::write(&ok, "hello").unwrap();
        assert_eq!(
            read_attachment(&ok).unwrap(),
            AttachmentFile { name: "notes.txt".into(), bytes: b"hello".to_vec() }
        );
        let huge = dir.path().join("huge.bin");
        std::fs::File::create(&huge).unwrap().set_len(SECRET_LIMIT as u64 + 1).unwrap();
        let err = read_attachment(&huge).unwrap_err();
        assert!(matches!(&err, CliError::Usage(m) if m.contains("huge.bin") && m.contains("1 MiB")), "{err}");
        let missing = read_attachment(&dir.path().join("absent.txt")).unwrap_err();
        assert_eq!(missing.exit_code(), exit::USAGE);
        assert!(read_attachment(Path::new("/")).is_err(), "a directory has no file name");
    }

    #[test]
    fn secret_keys() {
        assert_eq!(secret_key("report 2026.csv", &[]), "report_2026.csv");
        assert_eq!(secret_key("résumé.pdf", &[]), "r_sum_.pdf");
        assert_eq!(secret_key("a.txt", &["a.txt".into()]), "2-a.txt");
        assert_eq!(secret_key("..", &[]), "attachment");
    }

    #[test]
    fn the_secret_is_owned_by_the_message() {
        let mut m = EmailMessage::new("send-abcde", build_spec(&args(&[]), Some("x".into()), None, None).unwrap());
        assert!(owner_reference(&m).is_err(), "no uid yet");
        m.metadata.uid = Some("1234".into());
        let o = owner_reference(&m).unwrap();
        assert_eq!(
            (o.api_version.as_str(), o.kind.as_str(), o.name.as_str(), o.uid.as_str()),
            ("mailroom.dev/v1alpha1", "EmailMessage", "send-abcde", "1234")
        );
    }

    #[test]
    fn outcome_and_description() {
        let failed = EmailMessageStatus {
            phase: Some(Phase::Failed),
            attempts: Some(1),
            conditions: vec![Condition {
                type_: "Failed".into(),
                status: "True".into(),
                reason: "Rejected".into(),
                message: "550 5.7.64 Relay Access Denied".into(),
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            message_id: Some("<id@contoso.com>".into()),
            ..Default::default()
        };
        assert_eq!(outcome_code(&failed), exit::FAILED);
        let text = describe("m", &failed);
        assert!(text.contains("phase: Failed") && text.contains("reason: Rejected"), "{text}");
        assert!(text.contains("message: 550 5.7.64") && text.contains("attempts: 1"), "{text}");
        assert!(text.contains("messageId: <id@contoso.com>"), "{text}");
        let sent = EmailMessageStatus { phase: Some(Phase::Sent), ..Default::default() };
        assert_eq!(outcome_code(&sent), exit::OK);
        assert_eq!(outcome_code(&EmailMessageStatus::default()), exit::TIMEOUT);
        let forged = EmailMessageStatus { response: Some("250 ok\nphase: Sent".into()), ..failed };
        assert!(describe("m", &forged).contains("response: 250 ok?phase: Sent"), "a reply cannot fake a line");
    }
}
