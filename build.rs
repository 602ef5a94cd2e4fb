//! Records the git commit for `mailroom version`.

fn main() {
    let from_env = std::env::var("MAILROOM_GIT_COMMIT").ok().filter(|s| !s.trim().is_empty());
    let commit = from_env.unwrap_or_else(git_commit);
    println!("cargo:rustc-env=MAILROOM_GIT_COMMIT={commit}");
    // Where HEAD and the branch refs live: `.git/` in a clone, elsewhere in a worktree. A path
    // that does not exist would make cargo run this script, and rebuild the crate, every time.
    for path in ["HEAD", "refs/heads"] {
        if let Some(p) = git_path(path).filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-env-changed=MAILROOM_GIT_COMMIT");
}

fn git(args: &[&str]) -> Option<String> {
    std::process::Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn git_path(path: &str) -> Option<String> {
    git(&["rev-parse", "--path-format=absolute", "--git-path", path])
}

fn git_commit() -> String {
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
}
