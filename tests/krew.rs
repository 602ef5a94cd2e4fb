//! The krew plugin manifest (deploy/krew/mailroom.yaml) and hack/krew-manifest.sh, which packs a
//! built binary into a release archive and writes the manifest for it. The rules checked are
//! krew's own validation of a manifest (`ValidatePlugin` in krew's internal/index/validation,
//! https://github.com/kubernetes-sigs/krew/blob/master/internal/index/validation/validate.go) and
//! its manifest format (https://krew.sigs.k8s.io/docs/developer-guide/plugin-manifest).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;
use sha2::{Digest, Sha256};

const TEMPLATE: &str = "deploy/krew/mailroom.yaml";
const SCRIPT: &str = "hack/krew-manifest.sh";
/// What the committed manifest holds until the script fills in an archive's checksum.
const PLACEHOLDER_SHA256: &str = "FILLED-IN-BY-hack/krew-manifest.sh";

fn mailroom_bin() -> PathBuf {
    std::env::var("MAILROOM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| common::repo_root().join("target/debug/mailroom"))
}

fn script(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("bash")
        .arg(common::repo_root().join(SCRIPT))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run hack/krew-manifest.sh")
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{SCRIPT} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read the archive");
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// krew's structural rules for a manifest named `name` (its file name). `sha256_placeholder`
/// allows the committed copy's placeholder instead of a checksum.
fn validate(name: &str, m: &Value, sha256_placeholder: bool) -> Result<(), String> {
    let s = |v: &Value| v.as_str().map(str::to_string);
    if s(&m["apiVersion"]).as_deref() != Some("krew.googlecontainertools.github.com/v1alpha2") {
        return Err(format!("apiVersion is {:?}", m["apiVersion"]));
    }
    if s(&m["kind"]).as_deref() != Some("Plugin") {
        return Err(format!("kind is {:?}", m["kind"]));
    }
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-') {
        return Err(format!("the plugin name {name:?} is not allowed"));
    }
    if s(&m["metadata"]["name"]).as_deref() != Some(name) {
        return Err(format!("the plugin should be named {name:?}, not {:?}", m["metadata"]["name"]));
    }
    let spec = &m["spec"];
    let short = s(&spec["shortDescription"]).unwrap_or_default();
    if short.is_empty() || short.contains(['\r', '\n']) {
        return Err(format!("shortDescription {short:?}: required, one line"));
    }
    if s(&spec["description"]).unwrap_or_default().trim().is_empty() {
        return Err("description is required".into());
    }
    let version = s(&spec["version"]).unwrap_or_default();
    let semver = version.strip_prefix('v').map(|v| v.split('.').collect::<Vec<_>>());
    if !semver.is_some_and(|parts| parts.len() == 3 && parts.iter().all(|p| p.parse::<u64>().is_ok())) {
        return Err(format!("version {version:?} is not a semantic version with the v prefix"));
    }
    let platforms = spec["platforms"].as_sequence().cloned().unwrap_or_default();
    if platforms.is_empty() {
        return Err("no platform".into());
    }
    for p in &platforms {
        if s(&p["uri"]).unwrap_or_default().is_empty() {
            return Err(format!("a platform without uri: {p:?}"));
        }
        let sum = s(&p["sha256"]).unwrap_or_default();
        let hex = sum.len() == 64 && sum.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
        if !(hex || sha256_placeholder && sum == PLACEHOLDER_SHA256) {
            return Err(format!("sha256 {sum:?} does not match ^[a-f0-9]{{64}}$"));
        }
        if s(&p["bin"]).unwrap_or_default().is_empty() {
            return Err(format!("a platform without bin: {p:?}"));
        }
        if let Some(files) = p.get("files") {
            let files = files.as_sequence().ok_or("files is not a list")?;
            if files.is_empty() || files.iter().any(|f| s(&f["from"]).is_none() || s(&f["to"]).is_none()) {
                return Err("files has to be unspecified, or entries with from and to".into());
            }
        }
        let selector = p["selector"].as_mapping().ok_or_else(|| format!("no selector: {p:?}"))?;
        let labels = selector.get("matchLabels").and_then(Value::as_mapping);
        let expressions = selector.get("matchExpressions").and_then(Value::as_sequence);
        if labels.is_none_or(|l| l.is_empty()) && expressions.is_none_or(|e| e.is_empty()) {
            return Err("an empty selector".into());
        }
        let mut keys: Vec<String> = labels.into_iter().flatten().filter_map(|(k, _)| s(k)).collect();
        keys.extend(expressions.into_iter().flatten().filter_map(|e| s(&e["key"])));
        if let Some(key) = keys.iter().find(|k| *k != "os" && *k != "arch") {
            return Err(format!("selector key {key:?} is not supported"));
        }
    }
    Ok(())
}

fn platform_of(p: &Value) -> (String, String) {
    let labels = &p["selector"]["matchLabels"];
    (labels["os"].as_str().unwrap_or_default().to_string(), labels["arch"].as_str().unwrap_or_default().to_string())
}

fn template() -> Value {
    let text = std::fs::read_to_string(common::repo_root().join(TEMPLATE)).expect("the krew manifest");
    serde_yaml::from_str(&text).expect("the krew manifest is YAML")
}

#[test]
fn the_committed_manifest_is_a_krew_plugin() {
    let m = template();
    validate("mailroom", &m, true).unwrap_or_else(|e| panic!("{TEMPLATE}: {e}"));
    let version = format!("v{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(m["spec"]["version"].as_str(), Some(version.as_str()), "the crate's version");
    for p in m["spec"]["platforms"].as_sequence().expect("platforms") {
        let (os, arch) = platform_of(p);
        assert!(!os.is_empty() && !arch.is_empty(), "each platform names its os and arch: {p:?}");
        assert_eq!(p["bin"].as_str(), Some("mailroom"), "krew links bin as kubectl-mailroom");
        let uri = p["uri"].as_str().unwrap_or_default();
        assert!(uri.starts_with("https://"), "{uri}");
        assert!(uri.ends_with(&format!("/{version}/mailroom-{version}-{os}-{arch}.tar.gz")), "{uri}");
        assert_eq!(p["sha256"].as_str(), Some(PLACEHOLDER_SHA256), "the script fills the checksum in");
    }
    // The validator itself refuses what krew refuses.
    let mut bad = m.clone();
    bad["spec"]["platforms"][0]["sha256"] = Value::from("not-a-checksum");
    assert!(validate("mailroom", &bad, true).is_err());
    assert!(validate("mailroom", &m, false).is_err(), "the placeholder is no checksum");
    assert!(validate("mail", &m, true).is_err(), "the name is the file's");
    let mut bad = m.clone();
    bad["spec"]["platforms"][0]["selector"] = serde_yaml::from_str("{matchLabels: {distro: debian}}").unwrap();
    assert!(validate("mailroom", &bad, true).unwrap_err().contains("distro"));
    let mut bad = m.clone();
    bad["spec"]["version"] = Value::from("0.1.0");
    assert!(validate("mailroom", &bad, true).is_err(), "the v prefix is required");
}

#[test]
fn the_script_fills_in_the_archive_it_is_given() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = mailroom_bin().display().to_string();
    let out_dir = dir.path().display().to_string();
    let archive = stdout_of(&script(&["archive", &bin, "linux", "amd64", &out_dir], &[]));
    let archive = PathBuf::from(archive.trim());
    let version = format!("v{}", env!("CARGO_PKG_VERSION"));
    let file_name = format!("mailroom-{version}-linux-amd64.tar.gz");
    assert_eq!(archive, dir.path().join(&file_name));
    let again = stdout_of(&script(&["archive", &bin, "linux", "amd64", &format!("{out_dir}/again")], &[]));
    assert_eq!(sha256_hex(&archive), sha256_hex(Path::new(again.trim())), "the archive is reproducible");

    let release = "https://downloads.example.org/mailroom";
    let text = stdout_of(&script(&["manifest", &archive.display().to_string()], &[("MAILROOM_RELEASE_URL", release)]));
    let m: Value = serde_yaml::from_str(&text).expect("the manifest is YAML");
    validate("mailroom", &m, false).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(m["spec"]["version"].as_str(), Some(version.as_str()));
    let platforms = m["spec"]["platforms"].as_sequence().expect("platforms");
    assert_eq!(platforms.len(), 1, "one platform per archive given: {text}");
    let p = &platforms[0];
    assert_eq!(platform_of(p), ("linux".to_string(), "amd64".to_string()));
    assert_eq!(p["uri"].as_str(), Some(format!("{release}/{version}/{file_name}").as_str()));
    assert_eq!(p["sha256"].as_str(), Some(sha256_hex(&archive).as_str()), "the archive's checksum");
    let t = template();
    for field in ["homepage", "shortDescription", "description", "caveats"] {
        assert_eq!(m["spec"][field], t["spec"][field], "{field} comes from {TEMPLATE}");
    }

    // The archive holds `bin`, and the binary krew links as kubectl-mailroom is the plugin.
    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir(&unpacked).expect("mkdir");
    let tar = Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(&unpacked).output().expect("tar");
    assert!(tar.status.success(), "{}", String::from_utf8_lossy(&tar.stderr));
    let installed = unpacked.join(p["bin"].as_str().expect("bin"));
    assert_eq!(std::fs::read(&installed).expect("bin"), std::fs::read(mailroom_bin()).expect("binary"));
    let link = unpacked.join("kubectl-mailroom");
    std::os::unix::fs::symlink(&installed, &link).expect("symlink as krew does");
    let help = Command::new(&link).args(["send", "--help"]).output().expect("run the plugin");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: kubectl mailroom send"), "{help:?}");
}

#[test]
fn the_script_refuses_what_krew_could_not_install() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = mailroom_bin().display().to_string();
    let out_dir = dir.path().display().to_string();
    let refused = |out: Output, needle: &str| {
        assert!(!out.status.success(), "accepted: {}", String::from_utf8_lossy(&out.stdout));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    };
    refused(script(&["archive", &bin, "plan9", "mips", &out_dir], &[]), "plan9/mips is not a platform");
    refused(script(&["archive", "/nonexistent/mailroom", "linux", "amd64", &out_dir], &[]), "not an executable");

    let version = format!("v{}", env!("CARGO_PKG_VERSION"));
    let renamed = dir.path().join("mailroom-linux-amd64.tar.gz");
    std::fs::write(&renamed, b"x").expect("write");
    refused(script(&["manifest", &renamed.display().to_string()], &[]), "is not named");
    // An archive without the executable (a tarball of something else, correctly named).
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    std::fs::write(empty.join("README"), "no binary").expect("write");
    let wrong = dir.path().join(format!("mailroom-{version}-linux-arm64.tar.gz"));
    let tar = Command::new("tar").arg("-czf").arg(&wrong).arg("-C").arg(&empty).arg("README").output().expect("tar");
    assert!(tar.status.success());
    refused(script(&["manifest", &wrong.display().to_string()], &[]), "holds no mailroom executable");
    // Two archives for one platform, and an archive of another version.
    let archive = stdout_of(&script(&["archive", &bin, "linux", "amd64", &out_dir], &[]));
    refused(script(&["manifest", archive.trim(), archive.trim()], &[]), "two archives for linux/amd64");
    refused(script(&["manifest", archive.trim()], &[("MAILROOM_VERSION", "9.9.9")]), "is not named mailroom-v9.9.9-");
}
