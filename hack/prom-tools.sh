#!/usr/bin/env bash
# Builds the pinned promtool and Alertmanager releases from the Go module proxy, once per machine,
# and prints the path of the one asked for.
#
#   hack/prom-tools.sh promtool [build]       build if needed; the last line of stdout is the binary's path
#   hack/prom-tools.sh alertmanager [build]   the same for alertmanager
#   hack/prom-tools.sh NAME path              print that path without building (exit 1 when not built yet)
#
# promtool checks and unit-tests the PrometheusRule (deploy/prometheus/) and checks the operator's
# /metrics; Alertmanager runs in front of the alerts receiver in tests/alertmanager.rs.
# The versions are pinned in tools/promtool/go.mod and tools/alertmanager/go.mod. A binary goes to
# ${MAILROOM_CACHE:-~/.cache/mailroom}/<name>/<version>-<hash of go.mod, go.sum and build tags>/<name>,
# outside the repository.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

NAME="${1:-}"
case "$NAME" in
  promtool)
    MODULE="github.com/prometheus/prometheus"
    PACKAGE="$MODULE/cmd/promtool"
    # remove_all_sd leaves out the cloud service discoveries (AWS, Azure, GCE, ...), which only
    # `promtool check config` of such a configuration needs: measured on 2 cores with an empty Go
    # cache, 156 s of CPU and 0.9 GB peak memory instead of 313 s and 3.4 GB.
    TAGS="netgo,remove_all_sd"
    ;;
  alertmanager)
    MODULE="github.com/prometheus/alertmanager"
    PACKAGE="$MODULE/cmd/alertmanager"
    TAGS="netgo"
    ;;
  *)
    echo "usage: $0 promtool|alertmanager [build|path]" >&2
    exit 2
    ;;
esac
readonly NAME MODULE PACKAGE TAGS
readonly PREFIX="$NAME:"
readonly MOD_DIR="$REPO_ROOT/tools/$NAME"
readonly CACHE_ROOT="${MAILROOM_CACHE:-${HOME:?HOME must be set}/.cache/mailroom}/$NAME"

# shellcheck source=hack/lib/go-tool.sh
source "$REPO_ROOT/hack/lib/go-tool.sh"



VERSION="$(module_version)"
readonly VERSION
# The release a module version stands for: Prometheus 3.x is the Go module version v0.3xx.y.
release_version() {
  case "$NAME" in
    promtool)
      local minor="${VERSION#v0.}" patch
      patch="${minor#*.}"
      minor="${minor%%.*}"
      printf '%s.%s.%s\n' "$((minor / 100))" "$((minor % 100))" "$patch"
      ;;
    *) printf '%s\n' "${VERSION#v}" ;;
  esac
}
KEY="$VERSION-$({ cat "$MOD_DIR/go.mod" "$MOD_DIR/go.sum"; printf '%s\n' "$TAGS"; } | sha256 | cut -c1-12)"
readonly KEY
readonly DEST="$CACHE_ROOT/$KEY"
readonly BIN="$DEST/$NAME"

built() { [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; }


# Alertmanager's module, as the Go module proxy serves it, lacks the web UI's build output that
# ui/web.go embeds (ui/app/dist is made by npm in a release build and is not committed), so
# `go build` stops at "pattern app/dist: no matching files found". The build uses a copy of the
# module in $1/src with a one-page placeholder for the UI (the API, which the tests use, is
# complete), through a go.mod in $1/mod that replaces the module by that copy.
prepare_alertmanager() {
  local tmp="$1" dir
  dir="$(cd "$MOD_DIR" && go mod download -json "$MODULE" | awk -F'"' '$2 == "Dir" { print $4 }')" 9>&-
  [[ -d "$dir" ]] || die "go mod download found no source for $MODULE@$VERSION"
  mkdir -p "$tmp/src" "$tmp/mod"
  cp -R "$dir" "$tmp/src/alertmanager"
  chmod -R u+w "$tmp/src/alertmanager"
  local ui
  for ui in elm mantine; do
    mkdir -p "$tmp/src/alertmanager/ui/app/dist/$ui"
    printf '<!DOCTYPE html>\n<title>Alertmanager</title>\n<p>This build of Alertmanager %s has no web UI; its API is at /api/v2/.</p>\n' \
      "$VERSION" >"$tmp/src/alertmanager/ui/app/dist/$ui/index.html"
  done
  cp "$MOD_DIR/go.mod" "$MOD_DIR/go.sum" "$tmp/mod/"
  (cd "$MOD_DIR" && go mod edit -modfile="$tmp/mod/go.mod" -replace="$MODULE=$tmp/src/alertmanager") 9>&-
}

build_locked() {
  local tmp start release ldflags
  # Another process may have finished the same build while this one waited for the lock.
  if built; then
    log "$NAME $VERSION up to date in $DEST"
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "Go is required to build $NAME (see $MOD_DIR/go.mod for the version)"
  release="$(release_version)"
  log "building $NAME $release ($PACKAGE@$VERSION) into $DEST"
  log "a first build downloads the modules and compiles for several minutes; later builds reuse the Go cache"
  tmp="$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")"
  # An interrupted build leaves only this temporary directory, which is removed here.
  trap 'rm -rf "$tmp"' EXIT
  trap 'exit 130' INT TERM
  start="$SECONDS"
  # The version stamp only affects the link step, so it never invalidates compiled packages.
  ldflags="-s -w -X github.com/prometheus/common/version.Version=$release"
  ldflags+=" -X github.com/prometheus/common/version.Branch=release -X github.com/prometheus/common/version.Revision=$VERSION"
  local -a modfile=()
  if [[ "$NAME" == alertmanager ]]; then
    prepare_alertmanager "$tmp"
    modfile=(-modfile="$tmp/mod/go.mod")
  fi
  # -mod=readonly: the committed go.mod and go.sum are complete; a build never rewrites them.
  (cd "$MOD_DIR" && CGO_ENABLED=0 go build "${modfile[@]}" -mod=readonly -trimpath -tags "$TAGS" \
    -ldflags "$ldflags" -o "$tmp/$NAME" "$PACKAGE") 9>&- ||
    die "go build failed"
  rm -rf "$tmp/mod" "$tmp/src"
  "$tmp/$NAME" --version >/dev/null 2>&1 || die "built $NAME does not run"
  rm -rf "$DEST"
  mv "$tmp" "$DEST"
  chmod 755 "$DEST"
  trap - EXIT INT TERM
  log "built $NAME $release in $((SECONDS - start))s"
}

main() {
  tool_command "${2:-build}" "$0 $NAME" "usage: $0 promtool|alertmanager [build|path]"
}

main "$@"
