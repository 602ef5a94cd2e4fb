#!/usr/bin/env bash
# Builds the pinned GitOps notification senders from the Go module proxy, once per machine, and
# prints the path of the one asked for.
#
#   hack/gitops-tools.sh notification-controller [build]   build if needed; the last line of stdout is the binary's path
#   hack/gitops-tools.sh argocd-notify [build]             the same for argocd-notify
#   hack/gitops-tools.sh NAME path                         print that path without building (exit 1 when not built yet)
#
# notification-controller is Flux's (github.com/fluxcd/notification-controller, pinned in
# tools/notification-controller/go.mod); its CRDs, from the same module's config/crd/bases, are
# copied beside the binary into crds/. tests/flux.rs runs it against the test API server in front
# of mailroom's Flux receiver.
# argocd-notify is a small program of this repository (tools/argocd-notify/main.go) around Argo
# CD's notifications engine (github.com/argoproj/notifications-engine, pinned in its go.mod): it
# evaluates the triggers and renders the templates of deploy/argocd/argocd-notifications-cm.yaml
# for an Application and sends them through the engine's webhook service; tests/argocd.rs runs it.
# A build goes to ${MAILROOM_CACHE:-~/.cache/mailroom}/<name>/<version>-<hash of the module's
# files>/, outside the repository.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

NAME="${1:-}"
case "$NAME" in
  notification-controller)
    MODULE="github.com/fluxcd/notification-controller"
    # The module's root package is the controller's main package (its Dockerfile builds main.go).
    PACKAGE="$MODULE"
    ;;
  argocd-notify)
    MODULE="github.com/argoproj/notifications-engine"
    PACKAGE="."
    ;;
  *)
    echo "usage: $0 notification-controller|argocd-notify [build|path]" >&2
    exit 2
    ;;
esac
readonly NAME MODULE PACKAGE
readonly PREFIX="$NAME:"
readonly MOD_DIR="$REPO_ROOT/tools/$NAME"
readonly CACHE_ROOT="${MAILROOM_CACHE:-${HOME:?HOME must be set}/.cache/mailroom}/$NAME"

# shellcheck source=hack/lib/go-tool.sh
source "$REPO_ROOT/hack/lib/go-tool.sh"



VERSION="$(module_version)"
readonly VERSION
# Every file of the tool's module (go.mod, go.sum and any source of ours) makes the key.
KEY="$VERSION-$(cd "$MOD_DIR" && find . -type f | LC_ALL=C sort | xargs cat | sha256 | cut -c1-12)"
readonly KEY
readonly DEST="$CACHE_ROOT/$KEY"
readonly BIN="$DEST/$NAME"

built() {
  [[ -x "$BIN" ]] || return 1
  case "$NAME" in
    # The controller has no --version; --help parses its flags and exits 0.
    notification-controller) "$BIN" --help >/dev/null 2>&1 && [[ -f "$DEST/crds/.complete" ]] ;;
    *) "$BIN" --version >/dev/null 2>&1 ;;
  esac
}


# The controller's CRDs, from the module at the pinned version, beside the binary.
copy_crds() {
  local tmp="$1" dir
  dir="$(cd "$MOD_DIR" && go mod download -json "$MODULE" | awk -F'"' '$2 == "Dir" { print $4 }')" 9>&-
  [[ -d "$dir/config/crd/bases" ]] || die "go mod download found no config/crd/bases in $MODULE@$VERSION"
  mkdir -p "$tmp/crds"
  cp "$dir"/config/crd/bases/*.yaml "$tmp/crds/"
  chmod 644 "$tmp"/crds/*.yaml
  : >"$tmp/crds/.complete"
}

build_locked() {
  local tmp start
  # Another process may have finished the same build while this one waited for the lock.
  if built; then
    log "$NAME $VERSION up to date in $DEST"
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "Go is required to build $NAME (see $MOD_DIR/go.mod for the version)"
  log "building $NAME ($MODULE@$VERSION) into $DEST"
  log "a first build downloads the modules and compiles for several minutes; later builds reuse the Go cache"
  tmp="$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")"
  # An interrupted build leaves only this temporary directory, which is removed here.
  trap 'rm -rf "$tmp"' EXIT
  trap 'exit 130' INT TERM
  start="$SECONDS"
  # -mod=readonly: the committed go.mod and go.sum are complete; a build never rewrites them.
  (cd "$MOD_DIR" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" \
    -o "$tmp/$NAME" "$PACKAGE") 9>&- || die "go build failed"
  if [[ "$NAME" == notification-controller ]]; then
    copy_crds "$tmp"
  fi
  rm -rf "$DEST"
  mv "$tmp" "$DEST"
  chmod 755 "$DEST"
  trap - EXIT INT TERM
  built || die "built $NAME does not run"
  log "built $NAME $VERSION in $((SECONDS - start))s"
}

main() {
  tool_command "${2:-build}" "$0 $NAME" "usage: $0 notification-controller|argocd-notify [build|path]"
}

main "$@"
