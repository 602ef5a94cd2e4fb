//! The same binary as a kubectl plugin: installed as `kubectl-mailroom` (by krew, or copied or
//! linked onto the PATH), kubectl runs it for `kubectl mailroom ...` with the path it found as
//! argv[0] (kubectl's plugin mechanism: an executable on the PATH named `kubectl-<plugin>`).

use std::ffi::OsStr;
use std::path::Path;

/// The executable name kubectl looks for on the PATH for `kubectl mailroom`.
pub const PLUGIN_EXECUTABLE: &str = "kubectl-mailroom";

/// How the binary was invoked, which decides how its help and usage name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invocation {
    /// As `mailroom` (or under any other name).
    Binary,
    /// As `kubectl-mailroom`, through `kubectl mailroom` or directly.
    KubectlPlugin,
}

impl Invocation {
    /// From argv[0]: a path whose file name is `kubectl-mailroom` (`.exe` on Windows) is the plugin.
    pub fn from_argv0(argv0: Option<&OsStr>) -> Invocation {
        let name = argv0.and_then(|a| Path::new(a).file_name()).and_then(OsStr::to_str).unwrap_or_default();
        let name = name.strip_suffix(".exe").unwrap_or(name);
        if name == PLUGIN_EXECUTABLE { Invocation::KubectlPlugin } else { Invocation::Binary }
    }

    /// The command as people type it, for help and usage text; None keeps clap's own (argv[0]'s
    /// file name).
    pub fn display_command(self) -> Option<&'static str> {
        match self {
            Invocation::Binary => None,
            Invocation::KubectlPlugin => Some("kubectl mailroom"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(argv0: &str) -> Invocation {
        Invocation::from_argv0(Some(OsStr::new(argv0)))
    }

    #[test]
    fn the_plugin_is_known_by_its_file_name() {
        assert_eq!(of("/home/ann/.krew/bin/kubectl-mailroom"), Invocation::KubectlPlugin);
        assert_eq!(of("kubectl-mailroom"), Invocation::KubectlPlugin);
        assert_eq!(of("kubectl-mailroom.exe"), Invocation::KubectlPlugin);
        assert_eq!(of("/usr/local/bin/mailroom"), Invocation::Binary);
        assert_eq!(of("./target/debug/mailroom"), Invocation::Binary);
        assert_eq!(of("/opt/kubectl-mailroom/bin/mailroom"), Invocation::Binary, "only the file name counts");
        assert_eq!(of("kubectl-mailroom-old"), Invocation::Binary);
        assert_eq!(Invocation::from_argv0(None), Invocation::Binary);
        assert_eq!(Invocation::KubectlPlugin.display_command(), Some("kubectl mailroom"));
        assert_eq!(Invocation::Binary.display_command(), None);
    }
}
