#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this host, for running the operator the way users do: as
# a Pod from its image, installed by its Helm chart or kustomize base.
#
#   hack/cluster.sh build     build the pieces into the machine cache (and install Debian's)
#   hack/cluster.sh up        start the cluster (state in $MAILROOM_CLUSTER_DIR); runs `down` first
#                             when an earlier run left anything behind
#   hack/cluster.sh down      stop everything and restore what `up` changed on the host; idempotent
#   hack/cluster.sh status    exit 0 when the node is Ready
#   hack/cluster.sh env       print export lines: eval "$(hack/cluster.sh env)"
#   hack/cluster.sh import A  import the OCI archive A into the node's image store
#   hack/cluster.sh preflight exit 0 when this host can run the cluster; else say what is missing
#   hack/cluster.sh logs      the last lines of each component's log
#   hack/cluster.sh host-state   what the cluster may change on the host, in a stable form
#   hack/cluster.sh kill      SIGKILL every cluster process and leave the rest, as a crash would
#
# The pieces:
#   etcd, kube-apiserver, kubectl          hack/testenv.sh build (tools/testenv)
#   kubelet, kube-controller-manager,      the same pinned k8s.io/kubernetes module (tools/testenv)
#   kube-scheduler, kube-proxy
#   containerd, its runc shim, ctr         tools/containerd (github.com/containerd/containerd/v2)
#   runc, the CNI plugins, iptables        Debian packages at pinned versions
#   the pause image                        hack/image.sh pause (pause.c from the kubernetes module)
#
# Addresses (all created here; nothing listens on the host's own interfaces):
#   10.214.0.0/24 Pods, on the bridge mrcni0, which `up` creates before the CNI plugin uses it
#   10.214.0.1    the bridge's own address, the Pods' gateway: the node, the API server (:6443),
#                 the kubelet, and the mail peers that Pods reach ($MAILROOM_CLUSTER_HOST_IP)
#   10.215.0.0/24 Services; the kubernetes Service is 10.215.0.1
# Nothing masquerades and nothing is routed beyond the host: Pods reach only this host.
#
# What `up` changes on the host, and `down` restores: the mrcni0 bridge and its veths, the iptables
# and ip6tables rule sets (saved before, restored after), net.ipv4.ip_forward and the other sysctls
# below, the kubepods cgroups, the mounts under the state directories, and the host directories
# that the kubelet and the CNI plugins write to whatever their flags say. Its record of these lives
# in /run/mailroom-cluster, which a reboot clears together with everything it describes.
#
# Requires root, Linux with cgroups, iproute2, Go (see tools/testenv/go.mod) and apt-get for the
# Debian packages. A first build takes about 10 minutes and 3 GB of memory on 2 cores.
set -euo pipefail

readonly PREFIX="cluster:"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly CACHE="${MAILROOM_CACHE:-${HOME:?HOME must be set}/.cache/mailroom}"
readonly K8S_MOD="$REPO_ROOT/tools/testenv"
readonly CTRD_MOD="$REPO_ROOT/tools/containerd"
STATE="${MAILROOM_CLUSTER_DIR:-$REPO_ROOT/target/cluster}"
case "$STATE" in
  /*) ;;
  *) STATE="$PWD/$STATE" ;;
esac
# Sockets, the runtime's state and the record of host changes: short paths, cleared by a reboot.
readonly RUN=/run/mailroom-cluster
readonly HOST_RECORD="$RUN/host"
readonly TIMEOUT="${MAILROOM_CLUSTER_TIMEOUT:-120}"

readonly NODE_NAME=mailroom-node
readonly BRIDGE=mrcni0
readonly HOST_IP=10.214.0.1
readonly POD_CIDR=10.214.0.0/24
readonly SERVICE_CIDR=10.215.0.0/24
readonly KUBERNETES_SERVICE_IP=10.215.0.1
readonly APISERVER_PORT=6443
readonly PAUSE_IMAGE=registry.k8s.io/pause:3.10
# Host directories some piece writes to regardless of its flags; `down` removes the ones `up`
# found absent. (The kubelet's root, containerd's root and state, the CNI plugins' IP allocations
# and network namespaces are all pointed into $STATE or $RUN.)
readonly HOST_DIRS=(/var/lib/cni /var/log/pods /var/log/containers /var/lib/kubelet /run/containerd
  /run/netns /var/run/netns /etc/cni /opt/cni)
readonly SYSCTLS=(net/ipv4/ip_forward net/ipv4/conf/all/route_localnet net/bridge/bridge-nf-call-iptables
  net/bridge/bridge-nf-call-ip6tables)
readonly DEBIAN_PACKAGES=(runc=1.1.5+ds1-1+deb12u1 containernetworking-plugins=1.1.1+ds1-3+b5
  iptables=1.8.9-2 conntrack=1:1.4.7-1+b2)
readonly CNI_BIN=/usr/lib/cni

# shellcheck source=hack/lib/debian-packages.sh
source "$REPO_ROOT/hack/lib/debian-packages.sh"

log() { printf '%s %s\n' "$PREFIX" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- builds -------------------------------------------------------------------------------------

sha256() { sha256sum | cut -c1-12; }
kube_version() { awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$K8S_MOD/go.mod"; }
k8s_bin() { printf '%s/cluster/k8s-%s-%s/bin\n' "$CACHE" "$(kube_version)" "$(cat "$K8S_MOD/go.mod" "$K8S_MOD/go.sum" | sha256)"; }
ctrd_bin() { printf '%s/cluster/containerd-%s/bin\n' "$CACHE" "$(cat "$CTRD_MOD/go.mod" "$CTRD_MOD/go.sum" | sha256)"; }
testenv_bin() { bash "$REPO_ROOT/hack/testenv.sh" bin-dir; }

# go_build DEST TAGS MODDIR PACKAGE... : builds into DEST atomically (a temporary directory renamed).
go_build() {
  local dest="$1" tags="$2" mod="$3" tmp start
  shift 3
  mkdir -p "$(dirname "$dest")"
  tmp="$(mktemp -d "$(dirname "$dest")/.build-XXXXXX")"
  start=$SECONDS
  local version ldflags="-s -w" pkg
  version="$(kube_version)"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitTreeState=clean"
  done
  if ! (cd "$mod" && nice go build -mod=readonly -tags "$tags" -ldflags "$ldflags" -o "$tmp/" "$@"); then
    rm -rf "$tmp"
    die "go build failed in $mod"
  fi
  rm -rf "$dest"
  mv "$tmp" "$dest"
  log "built $(cd "$dest" && echo *) in $((SECONDS - start))s"
}

# kube-proxy's iptables mode needs the legacy backend here: with iptables-nft, which Debian's
# iptables package selects on a fresh install, a Pod's request to a ClusterIP whose endpoint is
# another Pod never gets its answer (tests/cluster.rs, the alerts Service). The choice is the
# host's (update-alternatives), made once and said.
use_legacy_iptables() {
  local tool
  for tool in iptables ip6tables; do
    [[ -x "/usr/sbin/$tool-legacy" ]] || continue
    [[ "$(readlink -f "/etc/alternatives/$tool" 2>/dev/null)" == "/usr/sbin/$tool-legacy" ]] && continue
    log "selecting /usr/sbin/$tool-legacy for $tool (update-alternatives --set): kube-proxy's iptables mode needs it"
    update-alternatives --set "$tool" "/usr/sbin/$tool-legacy" >/dev/null
  done
}

cmd_build() {
  command -v go >/dev/null 2>&1 || die "Go is required to build the cluster (see $K8S_MOD/go.mod for the version)"
  require_debian_packages "running the one-node cluster" "${DEBIAN_PACKAGES[@]}"
  use_legacy_iptables
  bash "$REPO_ROOT/hack/testenv.sh" build
  local bin
  bin="$(k8s_bin)"
  if [[ ! -x "$bin/kubelet" || ! -x "$bin/kube-controller-manager" || ! -x "$bin/kube-scheduler" || ! -x "$bin/kube-proxy" ]]; then
    log "building kubelet, kube-controller-manager, kube-scheduler and kube-proxy ($(kube_version)) into $bin"
    log "a first build takes about 7.5 minutes and 3 GB of memory on 2 idle cores; later builds reuse the Go cache"
    go_build "$bin" "" "$K8S_MOD" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy
  fi
  bin="$(ctrd_bin)"
  if [[ ! -x "$bin/containerd" || ! -x "$bin/containerd-shim-runc-v2" || ! -x "$bin/ctr" ]]; then
    log "building containerd, its runc shim and ctr into $bin (about 1.5 minutes the first time)"
    go_build "$bin" "urfave_cli_no_docs no_btrfs" "$CTRD_MOD" github.com/containerd/containerd/v2/cmd/containerd \
      github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/ctr
  fi
  bash "$REPO_ROOT/hack/image.sh" pause >/dev/null
}

# --- preflight ----------------------------------------------------------------------------------

# Fails at once, naming what is missing and how to get it.
preflight() {
  [[ "$(uname -s)" == Linux ]] || die "the cluster needs Linux (this is $(uname -s)); run the process-based tests instead: make test"
  ((EUID == 0)) || die "the cluster changes the host's network and cgroups and must run as root (sudo make cluster)"
  local cmd
  for cmd in ip openssl mount umount python3 setsid; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd is missing; install it (Debian: apt-get install iproute2 openssl mount python3 util-linux)"
  done
  [[ -d /sys/fs/cgroup/memory || -f /sys/fs/cgroup/cgroup.controllers ]] ||
    die "no memory cgroup at /sys/fs/cgroup; the kubelet needs cgroups mounted"
  [[ -e /dev/kmsg ]] || die "/dev/kmsg is missing; the kubelet needs it"
  if [[ ! -d /proc/sys/net/bridge ]]; then
    modprobe br_netfilter 2>/dev/null ||
      die "the br_netfilter kernel module is not loaded (/proc/sys/net/bridge is missing); load it: modprobe br_netfilter"
  fi
  if ip -4 route show | grep -Ev "dev $BRIDGE( |\$)" | grep -Eq '^10\.21[45]\.'; then
    die "the host already routes 10.214.0.0/16 or 10.215.0.0/16, which the cluster uses: $(ip -4 route show | grep -E '^10\.21[45]\.' | head -n 1)"
  fi
}

# --- host changes: record, restore --------------------------------------------------------------

record_host() {
  mkdir -p "$HOST_RECORD"
  [[ -f "$HOST_RECORD/complete" ]] && return 0
  log "recording the host's iptables rules, sysctls and directories in $HOST_RECORD"
  iptables-save >"$HOST_RECORD/iptables.rules"
  ip6tables-save >"$HOST_RECORD/ip6tables.rules" 2>/dev/null || true
  local s d
  : >"$HOST_RECORD/sysctls"
  for s in "${SYSCTLS[@]}"; do
    [[ -r "/proc/sys/$s" ]] && printf '%s %s\n' "$s" "$(cat "/proc/sys/$s")" >>"$HOST_RECORD/sysctls"
  done
  : >"$HOST_RECORD/absent-dirs"
  for d in "${HOST_DIRS[@]}"; do
    [[ -e "$d" ]] || printf '%s\n' "$d" >>"$HOST_RECORD/absent-dirs"
  done
  : >"$HOST_RECORD/absent-cgroups"
  # Each cgroup hierarchy (v1: one per controller; v2: the root itself).
  for d in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    if [[ -d "$d" && ! -e "${d}kubepods" ]]; then
      printf '%s\n' "${d}kubepods" >>"$HOST_RECORD/absent-cgroups"
    fi
  done
  printf '%s\n' "$STATE" >"$HOST_RECORD/state-dir"
  touch "$HOST_RECORD/complete"
}

restore_host() {
  [[ -f "$HOST_RECORD/complete" ]] || return 0
  local s v d
  log "restoring the host's iptables rules and sysctls"
  restore_rules iptables "$HOST_RECORD/iptables.rules"
  restore_rules ip6tables "$HOST_RECORD/ip6tables.rules"
  while read -r s v; do
    if [[ -n "$s" ]]; then
      printf '%s\n' "$v" >"/proc/sys/$s" 2>/dev/null || log "warning: cannot restore $s"
    fi
  done <"$HOST_RECORD/sysctls"
  while read -r d; do
    [[ -n "$d" && -e "$d" ]] || continue
    unmount_under "$d"
    rm -rf --one-file-system "$d"
  done <"$HOST_RECORD/absent-dirs"
  # /var/log/containers and /var/log/pods existed: remove only what points into this cluster.
  if [[ -d /var/log/containers ]]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$STATE/*" -delete 2>/dev/null || true
  fi
  while read -r d; do
    [[ -n "$d" && -d "$d" ]] || continue
    # Deepest first; a cgroup directory goes with rmdir once it holds no process.
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ -d "$d" ]] && log "warning: cgroup $d still holds processes"
  done <"$HOST_RECORD/absent-cgroups"
}

# The built-in chains of an iptables table.
builtin_chains() {
  case "$1" in
    filter | security) echo INPUT FORWARD OUTPUT ;;
    nat) echo PREROUTING INPUT OUTPUT POSTROUTING ;;
    mangle) echo PREROUTING INPUT FORWARD OUTPUT POSTROUTING ;;
    raw) echo PREROUTING OUTPUT ;;
  esac
}

# restore_rules iptables|ip6tables SAVED: puts back the rule set saved before `up`. The saved file
# names only the tables that existed; every other table that exists now is emptied (its chains
# flushed and removed, the built-in ones back to ACCEPT), which iptables-restore does to each
# table it is given.
restore_rules() {
  local cmd="$1" saved="$2" table chain
  command -v "$cmd-restore" >/dev/null 2>&1 || return 0
  {
    [[ -f "$saved" ]] && cat "$saved"
    for table in $("$cmd-save" 2>/dev/null | awk '/^\*/ { print substr($1, 2) }'); do
      grep -qx "\*$table" "$saved" 2>/dev/null && continue
      printf '*%s\n' "$table"
      for chain in $(builtin_chains "$table"); do printf ':%s ACCEPT [0:0]\n' "$chain"; done
      printf 'COMMIT\n'
    done
  } | "$cmd-restore" || log "warning: $cmd-restore failed"
}

# An iptables-save dump without counters and comments, and without the tables that hold nothing
# (only built-in chains that accept): such a table filters nothing, as if it did not exist.
normal_rules() {
  # grep finds no line in an empty table dump (a fresh host): that is no rules, not a failure.
  { grep -v '^#' || true; } | sed -E 's/\[[0-9]+:[0-9]+\]//' | awk '
    /^\*/ { block = $0 "\n"; used = 0; next }
    /^COMMIT/ { if (used) printf "%sCOMMIT\n", block; next }
    { block = block $0 "\n" }
    /^-A/ || (/^:/ && $2 != "ACCEPT") { used = 1 }'
}

# Unmounts every mount point at or below $1, deepest first.
unmount_under() {
  local root="$1" m
  root="$(realpath -m "$root")"
  awk '{ print $2 }' /proc/self/mounts | sed 's/\\040/ /g' | sort -r | while read -r m; do
    if [[ "$m" == "$root" || "$m" == "$root"/* ]]; then
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "warning: cannot unmount $m"
    fi
  done
}

# --- processes ----------------------------------------------------------------------------------

# The pid recorded for component $1 when that process is alive and runs that program.
running_pid() {
  local name="$1" pidfile="$STATE/pids/$1" pid exe
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  [[ "${exe##*/}" == "$name" ]] || return 1
  printf '%s\n' "$pid"
}

# Starts component $1 detached (own session, no terminal, no inherited pipes) and records the real
# pid: the inner shell writes its own pid, then execs the program.
launch() {
  local name="$1"
  shift
  local logfile="$STATE/logs/$name.log" pidfile="$STATE/pids/$name" i
  rm -f "$pidfile"
  # shellcheck disable=SC2016 # the inner shell expands $$, $0 and $@ itself.
  setsid nohup sh -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidfile" "$@" \
    </dev/null >>"$logfile" 2>&1 9>&- &
  for ((i = 0; i < 100; i++)); do
    if [[ -s "$pidfile" ]]; then
      running_pid "$name" >/dev/null && return 0
      kill -0 "$(cat "$pidfile")" 2>/dev/null || break
    fi
    sleep 0.1
  done
  tail -n 30 "$logfile" | sed 's/^/    /' >&2
  die "$name did not start; see $logfile"
}

# TERM, then KILL after $2 seconds (default 10).
stop_pid() {
  local name="$1" pid="$2" grace="${3:-10}" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "$name (pid $pid) did not stop in ${grace}s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
}

# Every process whose program is one of this cluster's binaries or whose command line names its
# state directories, whether or not a pid file survived.
cluster_pids() {
  local p exe cmdline k8s ctrd
  k8s="$(k8s_bin)"
  ctrd="$(ctrd_bin)"
  for p in /proc/[0-9]*; do
    exe="$(readlink "$p/exe" 2>/dev/null)" || continue
    case "$exe" in
      "$k8s"/* | "$ctrd"/*)
        printf '%s\n' "${p#/proc/}"
        continue
        ;;
    esac
    cmdline="$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)" || continue
    if [[ "$cmdline" == *"$RUN/"* || "$cmdline" == *"--data-dir=$STATE/etcd"* || "$cmdline" == *"--advertise-address=$HOST_IP "* ]]; then
      printf '%s\n' "${p#/proc/}"
    fi
  done
}

# Kills whatever runs in the kubepods cgroups (the containers), which outlive the shims otherwise.
kill_pods() {
  local f pid
  for f in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d "$f" ]] || continue
    # Cgroups vanish while this runs: a failed read is not an error.
    { find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null || true; } | sort -u | while read -r pid; do
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
}

stop_all() {
  local name pid i
  # The node first, so that nothing restarts containers while they are being stopped.
  for name in kube-proxy kubelet kube-scheduler kube-controller-manager; do
    pid="$(running_pid "$name")" && {
      log "stopping $name"
      stop_pid "$name" "$pid" 10
    }
  done
  kill_pods
  for name in containerd kube-apiserver etcd; do
    # A SIGTERM'd kube-apiserver can hang in shutdown for minutes: it gets 5 s (its state goes
    # with the cluster anyway).
    pid="$(running_pid "$name")" && {
      log "stopping $name"
      stop_pid "$name" "$pid" 5
    }
  done
  # Whatever is left, shims included, whose pid file is gone.
  for ((i = 0; i < 3; i++)); do
    pid="$(cluster_pids | tr '\n' ' ')"
    [[ -z "${pid// /}" ]] && break
    log "killing leftover cluster processes: $pid"
    # shellcheck disable=SC2086 # a list of pids
    kill -KILL $pid 2>/dev/null || true
    kill_pods
    sleep 0.5
  done
  rm -rf "$STATE/pids"
}

# --- down ---------------------------------------------------------------------------------------

cmd_down() {
  local start=$SECONDS state="$STATE"
  # An earlier run may have used another state directory; its record names it.
  [[ -f "$HOST_RECORD/state-dir" ]] && state="$(cat "$HOST_RECORD/state-dir")"
  if [[ ! -e "$RUN" && ! -e "$state/.mailroom-cluster" ]] && ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "nothing to stop"
    return 0
  fi
  log "stopping the cluster and restoring the host"
  STATE="$state"
  stop_all
  unmount_under "$state"
  unmount_under "$RUN"
  ip link delete "$BRIDGE" 2>/dev/null || true
  restore_host
  # Only a directory that `up` made and marked.
  if [[ -e "$state/.mailroom-cluster" ]]; then
    rm -rf --one-file-system "$state"
  fi
  rm -rf --one-file-system "$RUN"
  log "stopped and restored in $((SECONDS - start))s"
}

# --- configuration ------------------------------------------------------------------------------

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# new_cert NAME SUBJECT EXTENSIONS: a certificate signed by the cluster CA.
new_cert() {
  local name="$1" subject="$2" ext="$3" dir="$STATE/pki"
  new_key "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "$subject" -out "$dir/$name.csr" 2>/dev/null
  printf '%s\nauthorityKeyIdentifier=keyid\n' "$ext" >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 12)" -days 365 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}

client_cert() {
  new_cert "$1" "$2" $'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
}

make_pki() {
  local dir="$STATE/pki"
  mkdir -p "$dir"
  chmod 700 "$dir"
  new_key "$dir/ca.key"
  openssl req -x509 -new -key "$dir/ca.key" -subj "/CN=mailroom-cluster-ca" -days 365 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$dir/ca.crt" 2>/dev/null
  new_cert apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$HOST_IP,IP:$KUBERNETES_SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  client_cert admin "/O=system:masters/CN=mailroom-cluster-admin"
  client_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  client_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  client_cert controller-manager "/CN=system:kube-controller-manager"
  client_cert scheduler "/CN=system:kube-scheduler"
  client_cert kube-proxy "/CN=system:kube-proxy"
  # RSA, so that ServiceAccount tokens are RS256 as on a production cluster.
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/sa.key" 2>/dev/null
  openssl pkey -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  chmod 600 "$dir"/*.key
}

b64() { base64 -w0 <"$1"; }

# kubeconfig NAME: $STATE/NAME.kubeconfig with the client certificate pki/NAME.
kubeconfig() {
  local name="$1" pki="$STATE/pki"
  cat >"$STATE/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mailroom-cluster
  cluster:
    server: https://$HOST_IP:$APISERVER_PORT
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(b64 "$pki/$name.crt")
    client-key-data: $(b64 "$pki/$name.key")
contexts:
- name: mailroom-cluster
  context:
    cluster: mailroom-cluster
    user: $name
    namespace: default
current-context: mailroom-cluster
EOF
  chmod 600 "$STATE/$name.kubeconfig"
}

write_configs() {
  mkdir -p "$STATE/config" "$STATE/cni/net.d" "$RUN/containerd" "$RUN/cni"
  # containerd 2: the CRI plugin with runc, cgroupfs, Debian's CNI plugins, and oom_score_adj left
  # alone (a root without CAP_SYS_RESOURCE cannot lower it, and every sandbox would fail).
  cat >"$STATE/config/containerd.toml" <<EOF
version = 3
root = "$STATE/containerd"
state = "$RUN/containerd/state"

[grpc]
  address = "$RUN/containerd/containerd.sock"

[ttrpc]
  address = "$RUN/containerd/containerd.sock.ttrpc"

[debug]
  level = "warn"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$CNI_BIN"]
    conf_dir = "$STATE/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$RUN/runc"
        SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
EOF
  # The bridge with its gateway on the host and no masquerading: Pods reach only what is on this
  # host (the API server and mail peers on $HOST_IP), never beyond it.
  cat >"$STATE/cni/net.d/10-mailroom.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "mailroom",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$POD_CIDR" }]],
        "routes": [{ "dst": "0.0.0.0/0" }],
        "dataDir": "$RUN/cni/networks"
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
  cat >"$STATE/config/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $HOST_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $STATE/pki/ca.crt
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$RUN/containerd/containerd.sock
# This host has cgroup v1 only.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
podLogsDir: $STATE/pod-logs
resolvConf: /etc/resolv.conf
# No eviction and no image garbage collection on a shared disk: the images here cannot be pulled
# again.
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  imagefs.available: "0%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
EOF
  cat >"$STATE/config/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $HOST_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$HOST_IP/32"]
clientConnection:
  kubeconfig: $STATE/kube-proxy.kubeconfig
# No sysctl changes: the conntrack table and timeouts stay as the host has them.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

# --- up -----------------------------------------------------------------------------------------

kubectl_admin() { "$(testenv_bin)/kubectl" --kubeconfig="$STATE/admin.kubeconfig" --request-timeout=10s "$@"; }

# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds, checking that every started
# component is still alive.
wait_for() {
  local what="$1" seconds="$2" deadline name
  shift 2
  deadline=$((SECONDS + seconds))
  log "waiting up to ${seconds}s for $what"
  until "$@" >/dev/null 2>&1; do
    for name in "${STARTED[@]}"; do
      if ! running_pid "$name" >/dev/null; then
        tail -n 30 "$STATE/logs/$name.log" | sed 's/^/    /' >&2
        die "$name exited while waiting for $what; logs in $STATE/logs"
      fi
    done
    ((SECONDS < deadline)) || {
      for name in "${STARTED[@]}"; do
        log "last lines of $name:"
        tail -n 8 "$STATE/logs/$name.log" | sed 's/^/    /' >&2
      done
      die "timed out waiting for $what; logs in $STATE/logs"
    }
    sleep 0.5
  done
}

STARTED=()
start() {
  launch "$@"
  STARTED+=("$1")
}

node_ready() {
  [[ "$(kubectl_admin get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
default_sa() { kubectl_admin -n default get serviceaccount default; }
apiserver_ready() { [[ "$(kubectl_admin get --raw /readyz)" == ok ]]; }
ctr_ok() { "$(ctrd_bin)/ctr" --address "$RUN/containerd/containerd.sock" version; }

cmd_up() {
  preflight
  if [[ -e "$RUN" || -e "$STATE/.mailroom-cluster" ]] || ip link show "$BRIDGE" >/dev/null 2>&1; then
    # One cluster per host (its addresses are fixed). A live one started from another state
    # directory is not this run's to stop; what a dead run left behind is.
    local other=""
    [[ -f "$HOST_RECORD/state-dir" ]] && other="$(cat "$HOST_RECORD/state-dir")"
    if [[ -n "$other" && "$other" != "$STATE" ]] && STATE="$other" running_pid kube-apiserver >/dev/null; then
      die "a cluster from $other is running on this host; stop it first: MAILROOM_CLUSTER_DIR=$other $0 down"
    fi
    log "an earlier run left state behind; taking it down first"
    cmd_down
  fi
  cmd_build
  local start=$SECONDS k8s ctrd tbin
  k8s="$(k8s_bin)"
  ctrd="$(ctrd_bin)"
  tbin="$(testenv_bin)"
  [[ ! -e "$STATE" ]] || die "$STATE exists and is not a cluster state directory; remove it or set MAILROOM_CLUSTER_DIR"
  mkdir -p "$STATE/logs" "$STATE/pids" "$RUN"
  touch "$STATE/.mailroom-cluster"
  record_host
  # From here on a failure takes everything down again.
  trap 'log "start-up failed; taking the cluster down"; cmd_down' ERR
  trap 'cmd_down; exit 130' INT TERM

  log "creating the bridge $BRIDGE ($HOST_IP): the Pods' gateway, and the address of the node, the API server and the mail peers"
  ip link add "$BRIDGE" type bridge
  ip addr add "$HOST_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  make_pki
  local name
  for name in admin kubelet controller-manager scheduler kube-proxy; do kubeconfig "$name"; done
  write_configs
  local etcd_port etcd_peer
  read -r etcd_port etcd_peer < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

  log "starting etcd and kube-apiserver on $HOST_IP:$APISERVER_PORT"
  start etcd "$tbin/etcd" --name=node --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-cluster="node=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync=true --log-level=warn
  local pki="$STATE/pki"
  start kube-apiserver "$tbin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address="$HOST_IP" --advertise-address="$HOST_IP" --secure-port="$APISERVER_PORT" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --service-account-issuer="https://kubernetes.default.svc" \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --allow-privileged=true \
    --profiling=false
  wait_for "kube-apiserver to become ready" "$TIMEOUT" apiserver_ready

  log "starting containerd"
  start containerd "$ctrd/containerd" --config "$STATE/config/containerd.toml"
  wait_for "containerd" 30 ctr_ok
  cmd_import "$REPO_ROOT/target/image/pause.oci.tar"

  log "starting kube-controller-manager, kube-scheduler, kubelet and kube-proxy"
  start kube-controller-manager "$k8s/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10257 \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" \
    --root-ca-file="$pki/ca.crt" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --leader-elect=false
  start kube-scheduler "$k8s/kube-scheduler" \
    --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false
  start kubelet "$k8s/kubelet" \
    --config="$STATE/config/kubelet.yaml" \
    --kubeconfig="$STATE/kubelet.kubeconfig" \
    --root-dir="$STATE/kubelet" \
    --cert-dir="$STATE/kubelet/pki" \
    --node-ip="$HOST_IP" \
    --hostname-override="$NODE_NAME"
  start kube-proxy "$k8s/kube-proxy" --config="$STATE/config/kube-proxy.yaml"
  wait_for "the node to become Ready" "$TIMEOUT" node_ready
  wait_for "the default ServiceAccount" 60 default_sa
  trap - ERR INT TERM
  log "cluster up in $((SECONDS - start))s: node $NODE_NAME Ready; use it with: eval \"\$($0 env)\""
}

# --- the rest -----------------------------------------------------------------------------------

# import ARCHIVE: loads an OCI archive into the CRI's image store, under the full name its index
# gives (org.opencontainers.image.ref.name).
cmd_import() {
  local archive="${1:?usage: import ARCHIVE}"
  [[ -f "$archive" ]] || die "$archive does not exist"
  "$(ctrd_bin)/ctr" --address "$RUN/containerd/containerd.sock" -n k8s.io images import --digests "$archive" >/dev/null ||
    die "ctr could not import $archive"
  log "imported $archive"
}

cmd_status() {
  [[ -f "$STATE/admin.kubeconfig" ]] || {
    log "not running"
    return 1
  }
  node_ready || {
    log "the node is not Ready"
    return 1
  }
  log "node $NODE_NAME Ready at https://$HOST_IP:$APISERVER_PORT"
}

# Kills every process of the cluster with SIGKILL (the containers too) and cleans up nothing: what
# a crash or a killed CI job leaves, for testing that the next `up` recovers.
cmd_kill() {
  local pids
  pids="$(cluster_pids | tr '\n' ' ')"
  # shellcheck disable=SC2086 # a list of pids
  [[ -n "${pids// /}" ]] && kill -KILL $pids 2>/dev/null
  kill_pods
  log "killed: ${pids:-nothing}"
}

# What this cluster may change on the host, printed in a stable form: `down` must leave it as `up`
# found it (hack/e2e.sh compares the two). Packet counters and comments are left out.
cmd_host_state() {
  local s d
  # A host without iptables yet (a fresh machine: `up` installs it) has no rules to record.
  echo "## iptables"
  if command -v iptables-save >/dev/null 2>&1; then iptables-save 2>/dev/null | normal_rules; fi
  echo "## ip6tables"
  if command -v ip6tables-save >/dev/null 2>&1; then ip6tables-save 2>/dev/null | normal_rules; fi
  echo "## links and addresses"
  ip -o link show | awk '{ print $2 }'
  ip -o addr show | awk '{ print $2, $3, $4 }'
  echo "## routes"
  ip route show table all | grep -v ' proto kernel .*scope host\|^local \|^broadcast ' || true
  echo "## sysctls"
  for s in "${SYSCTLS[@]}"; do
    [[ -r "/proc/sys/$s" ]] && printf '%s %s\n' "$s" "$(cat "/proc/sys/$s")"
  done
  echo "## mounts"
  awk '{ print $2, $3 }' /proc/self/mounts | sort
  echo "## directories"
  for d in "${HOST_DIRS[@]}" "$RUN" "$STATE"; do
    [[ -e "$d" ]] && printf '%s\n' "$d"
  done
  find /sys/fs/cgroup -mindepth 1 -maxdepth 2 -name 'kubepods*' 2>/dev/null | sort
  echo "## processes"
  cluster_pids | while read -r d; do readlink "/proc/$d/exe" 2>/dev/null || true; done | sort
}

# The last lines of every component's log, for a failed run.
cmd_logs() {
  local f
  for f in "$STATE"/logs/*.log; do
    [[ -f "$f" ]] || continue
    log "last lines of $f:"
    tail -n 15 "$f" | sed 's/^/    /' >&2
  done
}

cmd_env() {
  cat <<EOF
export KUBECONFIG='$STATE/admin.kubeconfig'
export PATH='$(testenv_bin)':"\$PATH"
export MAILROOM_CLUSTER_HOST_IP='$HOST_IP'
export MAILROOM_CLUSTER_NODE='$NODE_NAME'
export MAILROOM_CLUSTER_CTR='$(ctrd_bin)/ctr --address $RUN/containerd/containerd.sock -n k8s.io'
EOF
}

case "${1:-}" in
  build) cmd_build ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  preflight) preflight ;;
  host-state) cmd_host_state ;;
  kill) cmd_kill ;;
  logs) cmd_logs ;;
  import)
    shift
    cmd_import "$@"
    ;;
  *)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
