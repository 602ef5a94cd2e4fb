#!/usr/bin/env bash
# The kubectl plugin's release archives and their krew manifest.
#
#   hack/krew-manifest.sh archive BINARY OS ARCH [DIR]
#       packs BINARY as `mailroom` into DIR/mailroom-v<version>-<os>-<arch>.tar.gz (DIR default
#       target/krew) and prints the archive's path. krew links `bin` (mailroom) as kubectl-mailroom.
#   hack/krew-manifest.sh manifest ARCHIVE...
#       prints deploy/krew/mailroom.yaml for this release: spec.version, and one platform per
#       archive with its uri and sha256. Each archive is named as `archive` names it, for a
#       platform that deploy/krew/mailroom.yaml lists, and holds an executable `mailroom`.
#
# The version is Cargo.toml's (MAILROOM_VERSION overrides it). URIs are
# $MAILROOM_RELEASE_URL/v<version>/<archive name>; the default is the homepage's GitHub releases.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly TEMPLATE="$REPO_ROOT/deploy/krew/mailroom.yaml"
readonly RELEASE_URL="${MAILROOM_RELEASE_URL:-https://github.com/mailroom-dev/mailroom/releases/download}"
# The staging directory of `archive`, removed on exit.
STAGE=""

die() {
  printf 'krew-manifest: error: %s\n' "$*" >&2
  exit 1
}

version() {
  if [[ -n "${MAILROOM_VERSION:-}" ]]; then
    printf '%s\n' "${MAILROOM_VERSION#v}"
    return
  fi
  # The [package] section's version, the first `version =` line of Cargo.toml.
  local v
  v="$(awk -F'"' '/^\[package\]/ { p = 1 } p && /^version *=/ { print $2; exit }' "$REPO_ROOT/Cargo.toml")"
  [[ -n "$v" ]] || die "no package version in Cargo.toml"
  printf '%s\n' "$v"
}

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -c1-64
  else
    shasum -a 256 "$1" | cut -c1-64
  fi
}

# The os/arch pairs the template lists, one "os/arch" a line.
template_platforms() {
  awk '
    /^ *os: / { os = $2 }
    /^ *arch: / { arch = $2 }
    /^ *bin: / { if (os != "" && arch != "") print os "/" arch; os = ""; arch = "" }
  ' "$TEMPLATE"
}

cmd_archive() {
  [[ $# -ge 3 && $# -le 4 ]] || die "usage: $0 archive BINARY OS ARCH [DIR]"
  local binary="$1" os="$2" arch="$3" dir="${4:-$REPO_ROOT/target/krew}"
  [[ -f "$binary" && -x "$binary" ]] || die "$binary is not an executable file"
  template_platforms | grep -qx "$os/$arch" || die "$os/$arch is not a platform of $TEMPLATE"
  local v name
  v="$(version)"
  name="mailroom-v$v-$os-$arch.tar.gz"
  mkdir -p "$dir"
  STAGE="$(mktemp -d)"
  trap 'rm -rf "$STAGE"' EXIT
  install -m 0755 "$binary" "$STAGE/mailroom"
  # Reproducible: fixed owner, mode and time, so the same binary gives the same sha256.
  tar --owner=0 --group=0 --numeric-owner --mtime='@0' -C "$STAGE" -cf - mailroom | gzip -n >"$dir/$name"
  printf '%s\n' "$dir/$name"
}

cmd_manifest() {
  [[ $# -ge 1 ]] || die "usage: $0 manifest ARCHIVE..."
  local v platforms="" seen=" " archive name os arch sum uri
  v="$(version)"
  for archive in "$@"; do
    [[ -f "$archive" ]] || die "$archive: no such file"
    name="$(basename "$archive")"
    [[ "$name" =~ ^mailroom-v${v//./\\.}-([a-z0-9]+)-([a-z0-9]+)\.tar\.gz$ ]] ||
      die "$name is not named mailroom-v$v-<os>-<arch>.tar.gz (made by: $0 archive)"
    os="${BASH_REMATCH[1]}"
    arch="${BASH_REMATCH[2]}"
    template_platforms | grep -qx "$os/$arch" || die "$name: $os/$arch is not a platform of $TEMPLATE"
    [[ "$seen" != *" $os/$arch "* ]] || die "two archives for $os/$arch"
    seen+="$os/$arch "
    tar -tzf "$archive" | grep -qx '\(\./\)\{0,1\}mailroom' || die "$name holds no mailroom executable"
    sum="$(sha256 "$archive")"
    uri="$RELEASE_URL/v$v/$name"
    platforms+="  - selector:
      matchLabels:
        os: $os
        arch: $arch
    uri: $uri
    sha256: $sum
    bin: mailroom
"
  done
  # The template up to its platforms, without its leading comment, with this version; then the
  # platforms of the archives given.
  awk -v version="v$v" '
    !started && /^#/ { next }
    { started = 1 }
    /^  version: / { print "  version: " version; next }
    /^  platforms:/ { print; exit }
    { print }
  ' "$TEMPLATE"
  printf '%s' "$platforms"
}

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    archive) cmd_archive "$@" ;;
    manifest) cmd_manifest "$@" ;;
    *)
      sed -n '2,14p' "${BASH_SOURCE[0]}" >&2
      exit 2
      ;;
  esac
}

main "$@"
