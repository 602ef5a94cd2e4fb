# shellcheck shell=bash
# Debian packages a script needs on the host, installed with apt-get at pinned versions.
#
#   source hack/lib/debian-packages.sh
#   require_debian_packages "why they are needed" name=version ...
#
# Each name=version that is not installed at that version is installed non-interactively. When
# Debian no longer serves the pinned version, the installed or served one is used and said, so a
# point release of Debian does not stop the build; the pin is what a fresh machine gets while it
# is served. Fails at once, saying what to install, when the host has no apt-get or is not root.

# Prints the installed version of package $1, or nothing. dpkg-query fails for a package it has
# never heard of (a fresh machine); that is "not installed", not an error of the caller's pipeline.
installed_debian_version() {
  { dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$1 == "installed" { print $2 }'
}

require_debian_packages() {
  local why="$1"
  shift
  local -a missing=() install=()
  local spec name version have
  for spec in "$@"; do
    name="${spec%%=*}"
    version="${spec#*=}"
    have="$(installed_debian_version "$name")"
    [[ "$have" == "$version" ]] && continue
    if [[ -n "$have" ]]; then
      printf '%s %s %s is installed; the pinned version is %s (kept: it is installed)\n' \
        "${PREFIX:-deb:}" "$name" "$have" "$version" >&2
      continue
    fi
    missing+=("$spec")
  done
  ((${#missing[@]} == 0)) && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    printf '%s error: %s needs the Debian packages %s, and this host has no apt-get; install them by hand\n' \
      "${PREFIX:-deb:}" "$why" "${missing[*]}" >&2
    return 1
  fi
  if ((EUID != 0)); then
    printf '%s error: %s needs the Debian packages %s; install them as root: apt-get install %s\n' \
      "${PREFIX:-deb:}" "$why" "${missing[*]}" "${missing[*]}" >&2
    return 1
  fi
  printf '%s installing %s with apt-get (%s)\n' "${PREFIX:-deb:}" "${missing[*]}" "$why" >&2
  export DEBIAN_FRONTEND=noninteractive
  # The package lists may be missing (a fresh machine) or older than the pins.
  local served
  for spec in "${missing[@]}"; do
    name="${spec%%=*}"
    version="${spec#*=}"
    if ! apt-cache show "$name=$version" >/dev/null 2>&1; then
      apt-get update -qq >&2 || true
      break
    fi
  done
  for spec in "${missing[@]}"; do
    name="${spec%%=*}"
    version="${spec#*=}"
    if apt-cache show "$name=$version" >/dev/null 2>&1; then
      install+=("$spec")
      continue
    fi
    served="$(apt-cache policy "$name" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
    if [[ -z "$served" || "$served" == "(none)" ]]; then
      printf '%s error: Debian serves no package %s; %s cannot go on\n' "${PREFIX:-deb:}" "$name" "$why" >&2
      return 1
    fi
    printf '%s %s %s is no longer served; installing %s (update the pin)\n' \
      "${PREFIX:-deb:}" "$name" "$version" "$served" >&2
    install+=("$name=$served")
  done
  apt-get install -y -qq --no-install-recommends "${install[@]}" >&2
}
