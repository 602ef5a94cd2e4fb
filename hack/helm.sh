#!/usr/bin/env bash
# Builds the pinned Helm release from the Go module proxy, once per machine, and prints its path.
#
#   hack/helm.sh          build if needed; the last line of stdout is the path of the helm binary
#   hack/helm.sh path     print that path without building (exit 1 when not built yet)
#
# The version is pinned in tools/helm/go.mod. The binary goes to
# ${MAILROOM_CACHE:-~/.cache/mailroom}/helm/<version>/helm, outside the repository.
set -euo pipefail

readonly PREFIX="helm:"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly MOD_DIR="$REPO_ROOT/tools/helm"
readonly CACHE_ROOT="${MAILROOM_CACHE:-${HOME:?HOME must be set}/.cache/mailroom}/helm"
readonly MODULE="helm.sh/helm/v4"

# shellcheck source=hack/lib/go-tool.sh
source "$REPO_ROOT/hack/lib/go-tool.sh"
readonly NAME=helm


VERSION="$(module_version)"
readonly VERSION
readonly DEST="$CACHE_ROOT/$VERSION"
readonly BIN="$DEST/helm"

built() { [[ -x "$BIN" ]] && "$BIN" version --short >/dev/null 2>&1; }


build_locked() {
  local tmp start
  # Another process may have finished the same build while this one waited for the lock.
  if built; then
    log "helm $VERSION up to date in $DEST"
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "Go is required to build helm (see $MOD_DIR/go.mod for the version)"
  log "building helm $VERSION into $DEST"
  log "a first build downloads the modules and compiles for a few minutes; later builds reuse the Go cache"
  tmp="$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")"
  # An interrupted build leaves only this temporary directory, which is removed here.
  trap 'rm -rf "$tmp"' EXIT
  trap 'exit 130' INT TERM
  start="$SECONDS"
  # -mod=readonly: the committed go.mod and go.sum are complete; a build never rewrites them.
  (cd "$MOD_DIR" && CGO_ENABLED=0 go build -mod=readonly -trimpath \
    -ldflags "-s -w -X $MODULE/internal/version.version=$VERSION" -o "$tmp/helm" "$MODULE/cmd/helm") 9>&- ||
    die "go build failed"
  "$tmp/helm" version --short >/dev/null || die "built helm does not run"
  rm -rf "$DEST"
  mv "$tmp" "$DEST"
  chmod 755 "$DEST"
  trap - EXIT INT TERM
  log "built helm $VERSION in $((SECONDS - start))s"
}

main() {
  tool_command "${1:-build}" "$0" "usage: $0 [build|path]"
}

main "$@"
