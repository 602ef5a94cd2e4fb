#!/usr/bin/env bash
# Assembles the operator image's base file system from the Debian packages in image/packages, the
# way distroless does: each package's files extracted with dpkg-deb (no maintainer scripts, no
# dependencies), its control file under /var/lib/dpkg/status.d for scanners, the CA bundle that
# update-ca-certificates would write, and the users and groups in image/etc (nonroot is 65532).
# Both the Dockerfile and `make image` (hack/image.sh) run it, so their bases cannot drift.
#
#   image/rootfs.sh DEBDIR ROOTFS [--served-if-gone]
#
# DEBDIR caches the downloaded .deb files (apt-get download checks them against the signed package
# lists, so run apt-get update first). ROOTFS must not exist yet. With --served-if-gone a pinned
# version that Debian no longer serves is replaced by the served one (said on stderr); without it
# that is an error.
set -euo pipefail
# The C locale fixes the order of globs (the CA bundle below) whatever the caller's locale.
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
debdir="${1:?usage: rootfs.sh DEBDIR ROOTFS [--served-if-gone]}"
rootfs="${2:?usage: rootfs.sh DEBDIR ROOTFS [--served-if-gone]}"
served_if_gone="${3:-}"
log() { printf 'image: %s\n' "$*" >&2; }

[[ ! -e "$rootfs" ]] || {
  log "error: $rootfs exists"
  exit 1
}
mkdir -p "$debdir" "$rootfs"
debdir="$(cd "$debdir" && pwd)"

# name=version lines, comments and blank lines left out.
mapfile -t specs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$here/packages")
arch="$(dpkg --print-architecture)"
for spec in "${specs[@]}"; do
  name="${spec%%=*}"
  version="${spec#*=}"
  if ! apt-cache show "$name=$version" >/dev/null 2>&1; then
    served="$(apt-cache policy "$name" | awk '/Candidate:/ { print $2 }')"
    if [[ "$served_if_gone" != "--served-if-gone" || -z "$served" || "$served" == "(none)" ]]; then
      log "error: Debian does not serve $name $version (it serves: ${served:-nothing}); run apt-get update, or update image/packages"
      exit 1
    fi
    log "$name $version is no longer served; using $served (update image/packages)"
    version="$served"
  fi
  # The file name apt-get download gives it: the epoch's colon is written %3a.
  deb="$debdir/${name}_${version//:/%3a}_${arch}.deb"
  [[ -f "$deb" ]] || deb="$debdir/${name}_${version//:/%3a}_all.deb"
  if [[ ! -f "$deb" ]]; then
    log "downloading $name $version"
    (cd "$debdir" && apt-get download -qq -o APT::Sandbox::User=root "$name=$version" >&2)
    deb="$(ls "$debdir/${name}_${version//:/%3a}_"*.deb)"
  fi
  dpkg-deb --extract "$deb" "$rootfs"
  mkdir -p "$rootfs/var/lib/dpkg/status.d"
  dpkg-deb --field "$deb" >"$rootfs/var/lib/dpkg/status.d/$name"
done

# What update-ca-certificates writes from the Mozilla set, in the C locale's order.
if [[ -d "$rootfs/usr/share/ca-certificates/mozilla" ]]; then
  mkdir -p "$rootfs/etc/ssl/certs"
  cat "$rootfs"/usr/share/ca-certificates/mozilla/*.crt >"$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
install -m 0644 "$here/etc/passwd" "$here/etc/group" "$here/etc/nsswitch.conf" "$rootfs/etc/"
install -d -m 1777 "$rootfs/tmp"
install -d -m 0700 "$rootfs/root"
install -d -m 0700 -o 65532 -g 65532 "$rootfs/home/nonroot"
# Documentation is not needed at run time; the copyright files stay.
find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright \( -type f -o -type l \) -delete 2>/dev/null || true
rm -rf "$rootfs/usr/share/man" "$rootfs/usr/share/lintian" "$rootfs/usr/share/locale"
log "base file system in $rootfs: ${specs[*]}"
