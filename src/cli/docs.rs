//! Shell completions and man pages, generated from the command line's own definition (clap), so
//! that they name exactly the commands and flags the binary has.

use std::io::Write;

use clap::Command;

use super::CliError;

/// The shells `mailroom completion` writes a script for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionShell {
    /// bash: `source <(mailroom completion bash)`.
    Bash,
    /// zsh: a `_mailroom` file in a directory of `$fpath`.
    Zsh,
    /// fish: `mailroom completion fish > ~/.config/fish/completions/mailroom.fish`.
    Fish,
}

impl From<CompletionShell> for clap_complete::Shell {
    fn from(shell: CompletionShell) -> clap_complete::Shell {
        match shell {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// Writes the completion script of `cmd`, invoked as `bin_name`, for `shell`.
pub fn completion(shell: CompletionShell, mut cmd: Command, bin_name: &str, out: &mut dyn Write) {
    clap_complete::generate(clap_complete::Shell::from(shell), &mut cmd, bin_name, out);
}

/// The man page of `cmd`, or of the subcommand that `path` names (`["profile", "check"]` is the
/// page of `mailroom profile check`).
pub fn man_page(cmd: Command, path: &[String]) -> Result<clap_mangen::Man, CliError> {
    // Building fills in each subcommand's display name (`mailroom-send`, the page's title) and
    // its bin name (`mailroom send`, its synopsis). `help` is no page of its own (as
    // clap_mangen::generate_to does).
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    // Every page names the release it documents: the root's version (subcommands have none).
    let version = cmd.get_version().map(str::to_string);
    let mut page = cmd;
    for name in path {
        let Some(sub) = page.find_subcommand(name).cloned() else {
            let known: Vec<&str> = page.get_subcommands().filter(|s| !s.is_hide_set()).map(Command::get_name).collect();
            return Err(CliError::Usage(format!(
                "{} has no command {name:?}; its commands: {}",
                page.get_bin_name().unwrap_or(page.get_name()),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )));
        };
        page = sub;
    }
    let mut man = clap_mangen::Man::new(page).manual("mailroom");
    if let Some(v) = version {
        man = man.source(format!("mailroom {v}"));
    }
    Ok(man)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn tree() -> Command {
        Command::new("mailroom").version("1.0").about("Sends mail.").subcommand(
            Command::new("profile").about("Work with profiles.").subcommand(
                Command::new("check")
                    .about("Check a profile.")
                    .arg(Arg::new("send-test").long("send-test").value_name("MAILBOX").action(ArgAction::Set)),
            ),
        )
    }

    fn man(path: &[&str]) -> Result<String, CliError> {
        let mut out = Vec::new();
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        man_page(tree(), &path)?.render(&mut out).expect("render");
        Ok(String::from_utf8(out).expect("roff is text"))
    }

    #[test]
    fn a_page_per_command() {
        let top = man(&[]).unwrap();
        assert!(top.starts_with(".ie \\n(.g .ds Aq \\(aq") || top.starts_with(".TH"), "{top}");
        assert!(top.contains(".TH mailroom 1"), "{top}");
        assert!(top.contains("mailroom\\-profile(1)"), "the subcommands are listed: {top}");
        assert!(!top.contains("mailroom\\-help(1)"), "help is no page: {top}");
        let check = man(&["profile", "check"]).unwrap();
        assert!(check.contains(".TH mailroom-profile-check 1  \"mailroom 1.0\""), "{check}");
        assert!(check.contains("mailroom profile check"), "the synopsis names the whole command: {check}");
        assert!(check.contains("\\-\\-send\\-test"), "{check}");
        let missing = man(&["profile", "lint"]).unwrap_err();
        assert_eq!(missing.to_string(), "mailroom profile has no command \"lint\"; its commands: check");
        assert_eq!(missing.exit_code(), super::super::exit::USAGE);
    }

    #[test]
    fn completions_name_the_commands() {
        for shell in [CompletionShell::Bash, CompletionShell::Zsh, CompletionShell::Fish] {
            let mut out = Vec::new();
            completion(shell, tree(), "mailroom", &mut out);
            let script = String::from_utf8(out).unwrap();
            assert!(script.contains("profile") && script.contains("send-test"), "{shell:?}: {script}");
        }
    }
}
