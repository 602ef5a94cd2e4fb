#!/usr/bin/env bash
# Builds the images as OCI archives without a container engine, with umoci.
#
#   hack/image.sh build     the release binary, then target/image/mailroom-<version>.oci.tar
#                           (MAILROOM_IMAGE_BINARY=path: that binary instead, e.g. the debug one)
#   hack/image.sh check     an image in target/image-check, its OCI config compared with the
#                           Dockerfile's final stage (image/check_config.py), and that check's tests
#   hack/image.sh pause     target/image/pause.oci.tar: the Kubernetes pause program compiled
#                           statically from the pinned k8s.io/kubernetes module (tools/testenv)
#   hack/image.sh toolbox   target/image/toolbox.oci.tar: Debian's static busybox, for test Pods
#                           that fetch /metrics or POST to a Service (sh, wget, nc, sleep, cat;
#                           any other applet as `busybox <applet>`)
#   hack/image.sh all       build, pause and toolbox
#   hack/image.sh name      print the operator image's name (the chart's default, ghcr.io/...:<version>)
#   hack/image.sh pause-name, toolbox-name   print those images' names
#
# Each archive's index names its image in full (org.opencontainers.image.ref.name), so that
# `ctr images import ARCHIVE`, with or without `--base-name <repository>`, stores it under exactly
# that name. An archive is rebuilt only when what it is made of changed: its inputs' files are
# newer, or (the operator's) the binary or the commit differ. The operator's base is image/rootfs.sh's,
# from the Debian packages in image/packages, as in the Dockerfile; its configuration below must
# match the Dockerfile's final stage, and `check` fails when they differ.
#
# Runs as root: the layers hold files owned by 65532, and each image is tried in a chroot. Installs
# Debian's umoci (and gcc for the pause image) with apt-get when missing; downloaded .deb files are
# cached in ${MAILROOM_CACHE:-~/.cache/mailroom}/image/debs.
set -euo pipefail

readonly PREFIX="image:"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly CACHE="${MAILROOM_CACHE:-${HOME:?HOME must be set}/.cache/mailroom}/image"
readonly OUT="$REPO_ROOT/target/image"
readonly REPOSITORY="ghcr.io/mailroom-dev/mailroom"
readonly SOURCE="https://github.com/mailroom-dev/mailroom"
# The Dockerfile's build stage runs the same command; `check` compares the two.
readonly CARGO_BUILD=(cargo build --release --locked --package mailroom --bin mailroom)
# The name the cluster's containerd is told to use for Pod sandboxes (hack/cluster.sh).
readonly PAUSE_IMAGE="registry.k8s.io/pause:3.10"
readonly TOOLBOX_IMAGE="docker.io/local/mailroom-toolbox:1"
readonly TOOLBOX_APPLETS=(sh wget nc sleep cat)
readonly DEFAULT_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
readonly UMOCI="umoci=0.4.7+ds-3+b7"
readonly GCC=("gcc=4:12.2.0-3" "libc6-dev=2.36-9+deb12u14")
readonly BUSYBOX="busybox-static=1:1.35.0-4+deb12u1+b1"
# What every image is made by, besides its own inputs: a change to either rebuilds it.
readonly SCRIPTS=("$REPO_ROOT/hack/image.sh" "$REPO_ROOT/hack/lib/debian-packages.sh")
readonly BASE_INPUTS=("$REPO_ROOT/image/packages" "$REPO_ROOT/image/rootfs.sh" "$REPO_ROOT/image/etc")
# shellcheck source=hack/lib/debian-packages.sh
source "$REPO_ROOT/hack/lib/debian-packages.sh"

log() { printf '%s %s\n' "$PREFIX" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

version() { awk -F'"' '/^version *=/ { print $2; exit }' "$REPO_ROOT/Cargo.toml"; }
commit() { git -C "$REPO_ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown; }
image_name() { printf '%s:%s\n' "$REPOSITORY" "$(version)"; }

# The commit's time goes into the configurations, the history and the files' times, so that two
# builds of one commit from the same inputs give the same image digests.
EPOCH="$(git -C "$REPO_ROOT" log -1 --format=%ct 2>/dev/null || echo 0)"
readonly EPOCH
CREATED="$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
readonly CREATED

require_root() {
  ((EUID == 0)) || die "building images needs root: the layers hold files owned by 65532, and each image is tried in a chroot"
}

# One build at a time: hack/cluster.sh and hack/e2e.sh run this script too, on the same target/image.
lock_out() {
  mkdir -p "$OUT"
  exec 9>"$OUT/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
}

# Succeeds when archive $1 exists and nothing under the paths after it is newer.
up_to_date() {
  local archive="$1"
  shift
  [[ -f "$archive" ]] || return 1
  local newer
  newer="$(find "$@" -newer "$archive" -print -quit)" || return 1
  [[ -z "$newer" ]]
}

# Runs apt-get update when Debian's package lists do not know one of the name=version pins given,
# so that apt-get download can check the .deb files against them (a fresh machine has no lists).
refresh_package_lists() {
  local spec
  for spec in "$@"; do
    if ! apt-cache show "$spec" >/dev/null 2>&1; then
      log "updating Debian's package lists (they do not list $spec)"
      apt-get update -qq >&2 || log "apt-get update failed; going on with the lists there are"
      return 0
    fi
  done
}

# Prints the path of the cached .deb of name=version $1, downloaded first when missing.
debian_deb() {
  local spec="$1" name version deb served
  name="${spec%%=*}"
  version="${spec#*=}"
  mkdir -p "$CACHE/debs"
  # apt-get download writes an epoch's colon as %3a.
  deb="$(find "$CACHE/debs" -maxdepth 1 -name "${name}_${version//:/%3a}_*.deb" -print -quit)"
  if [[ -z "$deb" ]]; then
    refresh_package_lists "$spec"
    if ! apt-cache show "$spec" >/dev/null 2>&1; then
      served="$(apt-cache policy "$name" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
      die "Debian does not serve $name $version (it serves: ${served:-nothing}); update the pin in hack/image.sh"
    fi
    log "downloading $name $version"
    (cd "$CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "$spec" >&2)
    deb="$(find "$CACHE/debs" -maxdepth 1 -name "${name}_${version//:/%3a}_*.deb" -print -quit)"
    [[ -n "$deb" ]] || die "apt-get download gave no .deb for $spec"
  fi
  printf '%s\n' "$deb"
}

# --- OCI layouts with umoci ---------------------------------------------------------------------

# Starts layout $1 holding one empty image named $2.
oci_new() {
  local layout="$1" name="$2"
  rm -rf "$layout" "$layout.bundle"
  mkdir -p "$(dirname "$layout")"
  umoci init --layout "$layout"
  umoci new --image "$layout:$name"
}

# Adds the directory tree $3 as one layer to image $2 of layout $1, with history line $4.
# Unpack and repack rather than `umoci insert`: Debian 12's umoci 0.4.7 writes inserted layers
# without the tar trailer (umoci#436, fixed in 0.4.8), which GNU tar and Python's tarfile reject.
oci_add_layer() {
  local layout="$1" name="$2" tree="$3" created_by="$4" bundle="$1.bundle"
  find "$tree" -exec touch -h -d "@$EPOCH" {} +
  rm -rf "$bundle"
  umoci unpack --image "$layout:$name" "$bundle" >/dev/null
  cp -a "$tree/." "$bundle/rootfs/"
  umoci repack --image "$layout:$name" --history.created "$CREATED" --history.created_by "$created_by" "$bundle"
  rm -rf "$bundle"
}

# Sets image $2's configuration in layout $1 from the umoci config flags after them.
oci_configure() {
  local layout="$1" name="$2"
  shift 2
  umoci config --image "$layout:$name" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "image configuration" "$@"
  umoci gc --layout "$layout"
}

# Runs the command after $3 in image $2's file system as uid:gid $3, with the default PATH: proof
# that the image holds what the program needs to start.
oci_try() {
  local layout="$1" name="$2" user="$3" bundle="$1.bundle" out rc=0
  shift 3
  rm -rf "$bundle"
  umoci unpack --image "$layout:$name" "$bundle" >/dev/null
  out="$(env -i PATH="$DEFAULT_PATH" chroot --userspec="$user" "$bundle/rootfs" "$@" 2>&1)" || rc=$?
  rm -rf "$bundle"
  if ((rc != 0)); then
    printf '%s\n' "$out" >&2
    die "'$*' failed in $name as $user (exit $rc)"
  fi
  log "in $name as $user, '$*' says: $(head -n 1 <<<"$out")"
}

# Writes layout $1 as the OCI archive $2: the layout in a tar, in a fixed order with fixed owners
# and times.
oci_archive() {
  local layout="$1" archive="$2"
  mkdir -p "$(dirname "$archive")"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" -C "$layout" -cf "$archive.tmp" .
  mv "$archive.tmp" "$archive"
  rm -rf "$layout"
}

# --- the operator -------------------------------------------------------------------------------

# Writes layout $1 holding the operator image of binary $2, named $3. Extra arguments go to
# image/rootfs.sh.
operator_layout() {
  local layout="$1" binary="$2" name="$3" work="$1.work"
  local -a pins
  shift 3
  rm -rf "$work"
  mkdir -p "$work"
  mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$REPO_ROOT/image/packages")
  refresh_package_lists "${pins[@]}"
  log "base file system from image/packages"
  "$REPO_ROOT/image/rootfs.sh" "$CACHE/debs" "$work/base" "$@"
  install -D -m 0755 "$binary" "$work/binary/mailroom"

  # Two layers, as the Dockerfile's two COPY lines: the base, then the binary.
  oci_new "$layout" "$name"
  oci_add_layer "$layout" "$name" "$work/base" "image/rootfs.sh"
  oci_add_layer "$layout" "$name" "$work/binary" "mailroom $(version) ($(commit))"
  rm -rf "$work"

  # Keep in step with the Dockerfile's final stage; `hack/image.sh check` compares the two. The
  # chart passes its own args (run and flags); CMD is what the image runs without any.
  oci_configure "$layout" "$name" \
    --config.user=65532:65532 \
    --config.workingdir=/home/nonroot \
    --config.env="PATH=$DEFAULT_PATH" \
    --config.env=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --config.exposedports=8080/tcp \
    --config.exposedports=8081/tcp \
    --config.entrypoint=/mailroom \
    --config.cmd=run \
    --config.label="org.opencontainers.image.source=$SOURCE" \
    --config.label="org.opencontainers.image.version=$(version)" \
    --config.label="org.opencontainers.image.revision=$(commit)"
}

cmd_build() {
  local start=$SECONDS binary="${MAILROOM_IMAGE_BINARY:-}" archive name layout="$OUT/mailroom.layout" made_of
  require_root
  require_debian_packages "building the OCI image" "$UMOCI"
  if [[ -z "$binary" ]]; then
    log "building the release binary (${CARGO_BUILD[*]}, as the Dockerfile does)"
    (cd "$REPO_ROOT" && MAILROOM_GIT_COMMIT="$(commit)" nice "${CARGO_BUILD[@]}")
    binary="$REPO_ROOT/target/release/mailroom"
  else
    [[ -f "$binary" && -x "$binary" ]] || die "MAILROOM_IMAGE_BINARY=$binary is not an executable file"
    log "using $binary (MAILROOM_IMAGE_BINARY) instead of a release build"
  fi
  name="$(image_name)"
  archive="$OUT/mailroom-$(version).oci.tar"
  # The binary by content, not by time: a release and a debug build take turns in one archive name.
  made_of="$(sha256sum "$binary" | cut -d' ' -f1) $(commit)"
  if up_to_date "$archive" "${BASE_INPUTS[@]}" "${SCRIPTS[@]}" && [[ "$(cat "$archive.made-of" 2>/dev/null)" == "$made_of" ]]; then
    log "up to date: $archive ($name)"
    return 0
  fi
  rm -f "$archive.made-of"
  operator_layout "$layout" "$binary" "$name"
  oci_try "$layout" "$name" 65532:65532 /mailroom version
  oci_archive "$layout" "$archive"
  printf '%s\n' "$made_of" >"$archive.made-of"
  log "wrote $archive ($(du -h "$archive" | cut -f1)) as $name in $((SECONDS - start))s"
  log "load it with: ctr -n k8s.io images import $archive (the archive names the image)"
}

cmd_check() {
  local out="$REPO_ROOT/target/image-check" binary python name
  require_root
  require_debian_packages "checking the OCI image" "$UMOCI"
  # Any build of the operator will do: the check is about the configuration and the base.
  binary="$REPO_ROOT/target/release/mailroom"
  [[ -x "$binary" ]] || binary="$REPO_ROOT/target/debug/mailroom"
  [[ -x "$binary" ]] || (cd "$REPO_ROOT" && cargo build --quiet --package mailroom --bin mailroom)
  name="$(image_name)"
  # The contents of the base do not matter to this check: a Debian point release must not stop it.
  operator_layout "$out/layout" "$binary" "$name" --served-if-gone
  oci_try "$out/layout" "$name" 65532:65532 /mailroom version
  python="${MAILROOM_PYTHON:-$(bash "$REPO_ROOT/hack/pyenv.sh" | tail -n 1)}"
  # As the Dockerfile's header builds it: the commit given, the version the ARG's default.
  PYTHONDONTWRITEBYTECODE=1 "$python" "$REPO_ROOT/image/check_config.py" \
    --dockerfile "$REPO_ROOT/Dockerfile" \
    --layout "$out/layout" \
    --name "$name" \
    --cargo-command "${CARGO_BUILD[*]}" \
    --build-arg "MAILROOM_GIT_COMMIT=$(commit)"
  log "the tests of image/check_config.py"
  PYTHONDONTWRITEBYTECODE=1 "$python" -m unittest discover --start-directory "$REPO_ROOT/image" --pattern 'test_*.py'
}

# --- the pause image ----------------------------------------------------------------------------

# Prints the directory of the k8s.io/kubernetes module pinned in tools/testenv/go.mod, downloaded
# into Go's module cache when missing.
kubernetes_module_dir() {
  command -v go >/dev/null 2>&1 || die "the pause image needs Go to find the k8s.io/kubernetes module (see tools/testenv/go.mod)"
  local dir
  dir="$(cd "$REPO_ROOT/tools/testenv" && go mod download -json k8s.io/kubernetes |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -d "$dir" ]] || die "go mod download k8s.io/kubernetes gave no module directory"
  printf '%s\n' "$dir"
}

cmd_pause() {
  local archive="$OUT/pause.oci.tar" layout="$OUT/pause.layout" tree="$OUT/pause.tree" dir src tag version
  require_root
  dir="$(kubernetes_module_dir)"
  src="$dir/build/pause/linux/pause.c"
  if up_to_date "$archive" "$src" "$REPO_ROOT/tools/testenv/go.mod" "${SCRIPTS[@]}"; then
    log "up to date: $archive ($PAUSE_IMAGE)"
    return 0
  fi
  require_debian_packages "building the pause image" "$UMOCI" "${GCC[@]}"
  # VERSION as the module's build/pause/Makefile gives it: v<TAG>-<kubernetes revision>.
  tag="$(awk '$1 == "TAG" && $2 == "?=" { print $3; exit }' "$dir/build/pause/Makefile")"
  version="v${tag:?no TAG in build/pause/Makefile}-${dir##*@}"
  rm -rf "$tree"
  mkdir -p "$tree"
  log "compiling pause.c $version statically"
  gcc -Os -Wall -Werror -static -DVERSION="$version" -o "$tree/pause" "$src"
  strip "$tree/pause"
  oci_new "$layout" "$PAUSE_IMAGE"
  oci_add_layer "$layout" "$PAUSE_IMAGE" "$tree" "pause.c $version"
  rm -rf "$tree"
  # As the module's build/pause/Dockerfile: FROM scratch, USER 65535:65535, ENTRYPOINT ["/pause"].
  oci_configure "$layout" "$PAUSE_IMAGE" \
    --config.user=65535:65535 \
    --config.env="PATH=$DEFAULT_PATH" \
    --config.entrypoint=/pause
  oci_try "$layout" "$PAUSE_IMAGE" 65535:65535 /pause -v
  oci_archive "$layout" "$archive"
  log "wrote $archive ($(du -h "$archive" | cut -f1)) as $PAUSE_IMAGE"
}

# --- the toolbox image --------------------------------------------------------------------------

cmd_toolbox() {
  local archive="$OUT/toolbox.oci.tar" layout="$OUT/toolbox.layout" tree="$OUT/toolbox.tree" deb applet
  require_root
  if up_to_date "$archive" "$REPO_ROOT/image/etc" "${SCRIPTS[@]}"; then
    log "up to date: $archive ($TOOLBOX_IMAGE)"
    return 0
  fi
  require_debian_packages "building the toolbox image" "$UMOCI"
  deb="$(debian_deb "$BUSYBOX")"
  rm -rf "$tree" "$tree.deb"
  dpkg-deb --extract "$deb" "$tree.deb"
  install -D -m 0755 "$tree.deb/bin/busybox" "$tree/bin/busybox"
  for applet in "${TOOLBOX_APPLETS[@]}"; do
    ln -s busybox "$tree/bin/$applet"
  done
  # The licence travels with the binary, and the package's control file lets scanners name it.
  install -D -m 0644 "$tree.deb/usr/share/doc/busybox-static/copyright" "$tree/usr/share/doc/busybox-static/copyright"
  mkdir -p "$tree/var/lib/dpkg/status.d"
  dpkg-deb --field "$deb" >"$tree/var/lib/dpkg/status.d/busybox-static"
  rm -rf "$tree.deb"
  install -D -m 0644 -t "$tree/etc" "$REPO_ROOT/image/etc/passwd" "$REPO_ROOT/image/etc/group"
  install -d -m 1777 "$tree/tmp"
  install -d -m 0700 -o 65532 -g 65532 "$tree/home/nonroot"
  oci_new "$layout" "$TOOLBOX_IMAGE"
  oci_add_layer "$layout" "$TOOLBOX_IMAGE" "$tree" "busybox ${BUSYBOX#*=} (${TOOLBOX_APPLETS[*]})"
  rm -rf "$tree"
  # A numeric user that is not root, so Pods under the restricted Pod Security Standard (which
  # needs runAsNonRoot) can run it without setting runAsUser.
  oci_configure "$layout" "$TOOLBOX_IMAGE" \
    --config.user=65532:65532 \
    --config.workingdir=/home/nonroot \
    --config.env="PATH=$DEFAULT_PATH" \
    --config.cmd=/bin/sh
  oci_try "$layout" "$TOOLBOX_IMAGE" 65532:65532 /bin/sh -c \
    'wget --help 2>&1 | cat && command -v wget nc sleep cat'
  oci_archive "$layout" "$archive"
  log "wrote $archive ($(du -h "$archive" | cut -f1)) as $TOOLBOX_IMAGE"
}

case "${1:-}" in
  build | check | pause | toolbox | all) lock_out ;;
  *) ;;
esac
case "${1:-}" in
  build) cmd_build ;;
  check) cmd_check ;;
  pause) cmd_pause ;;
  toolbox) cmd_toolbox ;;
  all)
    cmd_build
    cmd_pause
    cmd_toolbox
    ;;
  name) image_name ;;
  pause-name) echo "$PAUSE_IMAGE" ;;
  toolbox-name) echo "$TOOLBOX_IMAGE" ;;
  *)
    echo "usage: $0 build|check|pause|toolbox|all|name|pause-name|toolbox-name" >&2
    exit 2
    ;;
esac
