# shellcheck shell=bash
# What every script that builds a pinned Go tool into the machine cache shares (hack/helm.sh,
# hack/prom-tools.sh, hack/gitops-tools.sh). The caller sets PREFIX (the log prefix), MODULE and
# MOD_DIR (tools/<name>, whose go.mod pins MODULE), and defines built() and build_locked().
#
#   source hack/lib/go-tool.sh

log() { printf '%s %s\n' "$PREFIX" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# The version of $MODULE that $MOD_DIR/go.mod requires.
module_version() {
  local v
  v="$(awk -v m="$MODULE" '{ for (i = 1; i < NF; i++) if ($i == m) { print $(i + 1); exit } }' "$MOD_DIR/go.mod")"
  [[ -n "$v" ]] || die "no $MODULE requirement in $MOD_DIR/go.mod"
  printf '%s\n' "$v"
}

# The SHA-256 of stdin, in hex.
sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum | cut -c1-64
  else
    shasum -a 256 | cut -c1-64
  fi
}

# Runs "$@" holding an exclusive lock when flock(1) exists, so parallel callers build once.
with_lock() {
  local lockfile="$1"
  shift
  if command -v flock >/dev/null 2>&1; then
    (
      exec 9>"$lockfile"
      if ! flock -n 9; then
        log "waiting for another build holding $lockfile"
        flock 9
      fi
      "$@"
    )
  else
    "$@"
  fi
}

# `build` (build under the lock in $CACHE_ROOT when not built, then print $BIN) or `path` (print
# $BIN, exit 1 when not built). $1: the command; $2: what to run to build it; $3: the usage line.
tool_command() {
  case "${1:-build}" in
    build)
      if ! built; then
        mkdir -p "$CACHE_ROOT"
        with_lock "$CACHE_ROOT/.build.lock" build_locked
      fi
      printf '%s\n' "$BIN"
      ;;
    path)
      built || {
        log "$NAME $VERSION is not built yet; run: $2"
        exit 1
      }
      printf '%s\n' "$BIN"
      ;;
    *)
      echo "$3" >&2
      exit 2
      ;;
  esac
}
