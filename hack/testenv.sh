#!/usr/bin/env bash
# Local Kubernetes control plane for tests and demos: a real etcd and kube-apiserver on 127.0.0.1,
# started the way controller-runtime's envtest starts them (no kubelet, no controller-manager).
#
#   hack/testenv.sh build              build kube-apiserver, etcd and kubectl into the machine cache
#   hack/testenv.sh up                 build if needed, start etcd and kube-apiserver, wait until ready
#   hack/testenv.sh down               stop both and remove the state directory
#   hack/testenv.sh status             print the server URL and exit 0 when running and healthy
#   hack/testenv.sh env                print export lines: eval "$(hack/testenv.sh env)"
#   hack/testenv.sh restart-apiserver  restart kube-apiserver alone, same flags and port
#   hack/testenv.sh stop-apiserver     stop kube-apiserver alone (etcd keeps running)
#   hack/testenv.sh start-apiserver    start it again after stop-apiserver, same flags and port
#
# Environment:
#   MAILROOM_CACHE            machine cache (default ~/.cache/mailroom); binaries go under testenv/<key>/bin
#   MAILROOM_TESTENV_DIR      state directory (default <repo>/target/testenv)
#   MAILROOM_TESTENV_TIMEOUT  seconds to wait for readiness (default 90)
#   MAILROOM_TESTENV_AUDIT    1: `up` also writes an audit log of every request on Secrets (metadata
#                             level: who, verb, namespace, name; never the data) to logs/audit.log.
#                             Off by default; tests that prove which Secrets the operator reads use it.
#
# State directory layout (read by tests):
#   kubeconfig                admin kubeconfig (system:masters), certificates embedded
#   url                       https://127.0.0.1:PORT
#   sa-issuer                 service-account issuer (the "iss" of tokens the API server issues)
#   sa-signing-key-file       path of the service-account signing key (PEM, RSA private key)
#   sa-key-file               path of the service-account verification key (PEM, RSA public key)
#   testenv.env               all of the above as shell assignments
#   certs/                    ca.{crt,key} (serving CA), client-ca.{crt,key}, admin.{crt,key}, sa.{key,pub}
#   logs/                     etcd.log, kube-apiserver.log (and audit.log with MAILROOM_TESTENV_AUDIT=1)
#   audit-policy.yaml         the audit policy, only with MAILROOM_TESTENV_AUDIT=1
set -euo pipefail

readonly PREFIX="testenv:"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly MOD_DIR="$REPO_ROOT/tools/testenv"
readonly CACHE_ROOT="${MAILROOM_CACHE:-${HOME:?HOME must be set}/.cache/mailroom}/testenv"
STATE="${MAILROOM_TESTENV_DIR:-$REPO_ROOT/target/testenv}"
case "$STATE" in
  /*) ;;
  *) STATE="$PWD/$STATE" ;;
esac
readonly STATE
readonly TIMEOUT="${MAILROOM_TESTENV_TIMEOUT:-90}"
# Marks a directory as ours, so `down` never removes a directory it did not create.
readonly MARKER=".mailroom-testenv"
readonly GO_PACKAGES=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3)

log() { printf '%s %s\n' "$PREFIX" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- cache key and binaries -------------------------------------------------------------------

kube_version() {
  local v
  v="$(awk '{ for (i = 1; i < NF; i++) if ($i == "k8s.io/kubernetes") { print $(i + 1); exit } }' "$MOD_DIR/go.mod")"
  [[ -n "$v" ]] || die "no k8s.io/kubernetes requirement in $MOD_DIR/go.mod"
  printf '%s\n' "$v"
}

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum | cut -c1-64
  else
    shasum -a 256 | cut -c1-64
  fi
}

cache_key() {
  local hash
  hash="$(cat "$MOD_DIR/go.mod" "$MOD_DIR/go.sum" | sha256 | cut -c1-12)"
  printf '%s-%s\n' "$(kube_version)" "$hash"
}

# The cache directory holding the binaries for the pinned versions; set once by main.
BIN_DIR=""
bin_dir() { printf '%s\n' "$BIN_DIR"; }

have_binaries() {
  local bin="$1"
  [[ -x "$bin/kube-apiserver" && -x "$bin/etcd" && -x "$bin/kubectl" ]]
}

# Runs "$@" holding an exclusive lock on file $1 when flock(1) exists (not on macOS); fd 9 is
# closed in every process started while it is held so that no long-lived child keeps the lock.
with_lock() {
  local lockfile="$1"
  shift
  if command -v flock >/dev/null 2>&1; then
    (
      exec 9>"$lockfile"
      if ! flock -n 9; then
        log "waiting for another testenv command holding $lockfile"
        flock 9
      fi
      "$@"
    )
  else
    "$@"
  fi
}

cmd_build() {
  local bin
  bin="$(bin_dir)"
  if have_binaries "$bin"; then
    log "binaries up to date in $bin"
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "Go is required to build the control plane (see $MOD_DIR/go.mod for the version)"
  mkdir -p "$CACHE_ROOT"
  with_lock "$CACHE_ROOT/.build.lock" build_locked "$bin"
}

build_locked() {
  local bin="$1" dest version tmp start
  dest="$(dirname "$bin")"
  # Another process may have finished the same build while this one waited for the lock.
  if have_binaries "$bin"; then
    log "binaries up to date in $bin"
    return 0
  fi
  version="$(kube_version)"
  log "building kube-apiserver, etcd and kubectl (Kubernetes $version) into $bin"
  log "a first build downloads the modules and compiles for about 10 minutes (~3 GB of memory); later builds reuse the Go cache"
  tmp="$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")"
  chmod 755 "$tmp"
  # An interrupted build leaves only this temporary directory, which is removed here.
  trap 'rm -rf "$tmp"' EXIT
  trap 'exit 130' INT TERM
  start="$SECONDS"
  # The version stamp only affects the link step, so it never invalidates compiled packages.
  local ldflags="-s -w"
  local major="${version#v}" minor="${version#v*.}"
  major="${major%%.*}"
  minor="${minor%%.*}"
  local pkg
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  mkdir -p "$tmp/bin"
  # -mod=readonly: the committed go.mod and go.sum are complete; a build never rewrites them.
  (cd "$MOD_DIR" && go build -mod=readonly -ldflags "$ldflags" -o "$tmp/bin/" "${GO_PACKAGES[@]}") 9>&- ||
    die "go build failed"
  # `go build` names the etcd binary after its module path's last element.
  mv "$tmp/bin/server" "$tmp/bin/etcd"
  "$tmp/bin/etcd" --version >/dev/null || die "built etcd does not run"
  "$tmp/bin/kube-apiserver" --version >/dev/null || die "built kube-apiserver does not run"
  "$tmp/bin/kubectl" version --client >/dev/null || die "built kubectl does not run"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  trap - EXIT INT TERM
  log "built in $((SECONDS - start))s: $(cd "$bin" && echo *)"
}

# --- processes ----------------------------------------------------------------------------------

# Prints the pid recorded for component $1 when that process is alive and is that component.
running_pid() {
  local name="$1" pidfile="$STATE/$1.pid" pid comm
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guards against a recycled pid (for instance after a reboot) naming an unrelated process.
  if [[ -r "/proc/$pid/comm" ]]; then
    comm="$(cat "/proc/$pid/comm")"
  else
    comm="$(ps -p "$pid" -o comm= 2>/dev/null)" || return 1
    comm="${comm##*/}"
  fi
  [[ "$comm" == "$name" ]] || return 1
  printf '%s\n' "$pid"
}

# Starts component $1 detached from this script (own session, no terminal, no inherited pipes),
# then records its pid. The inner shell writes its own pid and execs, so the pid is the server's.
launch() {
  local name="$1"
  shift
  local logfile="$STATE/logs/$name.log" pidfile="$STATE/$name.pid"
  rm -f "$pidfile"
  printf '=== %s starting %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$name" >>"$logfile"
  local -a detach=(nohup)
  if command -v setsid >/dev/null 2>&1; then
    detach=(setsid nohup)
  fi
  # shellcheck disable=SC2016 # the inner shell expands $$, $0 and $@ itself.
  "${detach[@]}" sh -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidfile" "$@" \
    </dev/null >>"$logfile" 2>&1 9>&- &
  # Wait until the recorded pid has exec'd into the server, so later liveness checks see its name.
  local i
  for ((i = 0; i < 100; i++)); do
    if [[ -s "$pidfile" ]]; then
      running_pid "$name" >/dev/null && return 0
      kill -0 "$(cat "$pidfile")" 2>/dev/null || break
    fi
    sleep 0.1
  done
  show_log_tail "$name"
  die "$name did not start; see $logfile"
}

# Sends TERM to component $1, then KILL when it is still alive after a few seconds.
stop_component() {
  local name="$1" pid i
  pid="$(running_pid "$name")" || {
    rm -f "$STATE/$name.pid"
    return 0
  }
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name did not stop after 5s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$STATE/$name.pid"
}

# Prints three distinct free TCP ports on 127.0.0.1 (the kernel picks them, as envtest does).
free_ports() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c '
import socket
socks = []
for _ in range(3):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
'
    return
  fi
  # Without python3: random ports in the ephemeral range that nothing answers on.
  local -a ports=()
  local p
  while ((${#ports[@]} < 3)); do
    p=$((32768 + RANDOM % 28000))
    [[ " ${ports[*]} " == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      ports+=("$p")
    fi
  done
  printf '%s\n' "${ports[*]}"
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# --- certificates -------------------------------------------------------------------------------

# Writes a fresh EC P-256 key to $1.
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# Signs a certificate: new_cert NAME SUBJECT EXTENSIONS [CA_NAME]; self-signed without CA_NAME.
new_cert() {
  local name="$1" subject="$2" ext="$3" ca="${4:-}" dir="$STATE/certs"
  new_key "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "$subject" -out "$dir/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$dir/$name.ext"
  local -a signer=(-signkey "$dir/$name.key")
  if [[ -n "$ca" ]]; then
    signer=(-CA "$dir/$ca.crt" -CAkey "$dir/$ca.key")
  fi
  openssl x509 -req -in "$dir/$name.csr" "${signer[@]}" -set_serial "0x$(openssl rand -hex 12)" \
    -days 3650 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}

make_certs() {
  command -v openssl >/dev/null 2>&1 || die "openssl is required to generate the control plane's certificates"
  local dir="$STATE/certs"
  mkdir -p "$dir"
  chmod 700 "$dir"
  local ca_ext=$'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash'
  new_cert ca "/CN=mailroom-testenv-ca" "$ca_ext"
  new_cert client-ca "/CN=mailroom-testenv-client-ca" "$ca_ext"
  new_cert serving "/CN=kube-apiserver" $'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nauthorityKeyIdentifier=keyid' ca
  new_cert admin "/O=system:masters/CN=mailroom-admin" $'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\nauthorityKeyIdentifier=keyid' client-ca
  # RSA, so that service-account tokens are RS256 like on a production cluster.
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/sa.key" 2>/dev/null
  openssl pkey -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  chmod 600 "$dir"/*.key
}

b64() { base64 <"$1" | tr -d '\n'; }

write_kubeconfig() {
  local url="$1" certs="$STATE/certs"
  cat >"$STATE/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mailroom-testenv
  cluster:
    server: $url
    certificate-authority-data: $(b64 "$certs/ca.crt")
users:
- name: mailroom-admin
  user:
    client-certificate-data: $(b64 "$certs/admin.crt")
    client-key-data: $(b64 "$certs/admin.key")
contexts:
- name: mailroom-testenv
  context:
    cluster: mailroom-testenv
    user: mailroom-admin
    namespace: default
current-context: mailroom-testenv
EOF
  chmod 600 "$STATE/kubeconfig.tmp"
  mv "$STATE/kubeconfig.tmp" "$STATE/kubeconfig"
}

# --- start and readiness ------------------------------------------------------------------------

# The backend quota is 8 GiB, not etcd's default 2 GiB: the database does not shrink when the API
# server compacts it, and a benchmark's runs of 10,000 messages of 16 KiB, each written three
# times, filled 2 GiB ("mvcc: database space exceeded").
start_etcd() {
  local bin="$1" client_port peer_port
  client_port="$(cat "$STATE/etcd-port")"
  peer_port="$(cat "$STATE/etcd-peer-port")"
  launch etcd "$bin/etcd" \
    --name=default \
    --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$client_port" \
    --advertise-client-urls="http://127.0.0.1:$client_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="default=http://127.0.0.1:$peer_port" \
    --unsafe-no-fsync=true \
    --quota-backend-bytes=$((8 * 1024 * 1024 * 1024)) \
    --log-level=warn
}

start_apiserver() {
  local bin="$1" port etcd_port certs="$STATE/certs"
  port="$(cat "$STATE/apiserver-port")"
  etcd_port="$(cat "$STATE/etcd-port")"
  # An audit policy in the state directory (MAILROOM_TESTENV_AUDIT=1 at `up`) survives restarts.
  local audit_args=()
  if [[ -f "$STATE/audit-policy.yaml" ]]; then
    audit_args=(--audit-policy-file="$STATE/audit-policy.yaml" --audit-log-path="$STATE/logs/audit.log"
      --audit-log-mode=blocking --audit-log-format=json)
  fi
  launch kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --cert-dir="$certs" \
    --tls-cert-file="$certs/serving.crt" \
    --tls-private-key-file="$certs/serving.key" \
    --client-ca-file="$certs/client-ca.crt" \
    --secure-port="$port" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --service-cluster-ip-range=10.0.0.0/24 \
    --allow-privileged=true \
    --disable-admission-plugins=ServiceAccount \
    --authorization-mode=RBAC \
    --service-account-issuer="$(cat "$STATE/sa-issuer")" \
    --service-account-key-file="$certs/sa.pub" \
    --service-account-signing-key-file="$certs/sa.key" \
    "${audit_args[@]}"
}

# The audit policy of MAILROOM_TESTENV_AUDIT=1: Secrets at metadata level, nothing else.
write_audit_policy() {
  cat >"$STATE/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  resources:
  - group: ""
    resources: [secrets]
- level: None
POLICY
}

kubectl_admin() {
  "$(bin_dir)/kubectl" --kubeconfig="$STATE/kubeconfig" --cache-dir="$STATE/kubectl-cache" \
    --request-timeout=5s "$@"
}

healthy() {
  [[ "$(kubectl_admin get --raw /readyz 2>/dev/null)" == "ok" ]]
}

show_log_tail() {
  local name="$1" logfile="$STATE/logs/$1.log"
  [[ -f "$logfile" ]] || return 0
  log "last lines of $logfile:"
  tail -n 40 "$logfile" | sed 's/^/    /' >&2
}

# Waits until kube-apiserver reports ready and the bootstrap objects (default namespace, RBAC
# roles) exist; on failure prints the log tail and stops whatever was started.
wait_ready() {
  local deadline=$((SECONDS + TIMEOUT)) name
  log "waiting up to ${TIMEOUT}s for kube-apiserver to become ready"
  while :; do
    for name in etcd kube-apiserver; do
      if ! running_pid "$name" >/dev/null; then
        log "error: $name exited during start-up"
        show_log_tail "$name"
        stop_component kube-apiserver
        stop_component etcd
        die "control plane failed to start; logs in $STATE/logs"
      fi
    done
    if healthy &&
      kubectl_admin get namespace default -o name >/dev/null 2>&1 &&
      kubectl_admin get clusterrole cluster-admin -o name >/dev/null 2>&1; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      log "error: kube-apiserver not ready after ${TIMEOUT}s"
      show_log_tail kube-apiserver
      stop_component kube-apiserver
      stop_component etcd
      die "control plane failed to start; logs in $STATE/logs"
    fi
    sleep 0.5
  done
}

# --- commands -----------------------------------------------------------------------------------

state_lock() {
  mkdir -p "$(dirname "$STATE")"
  printf '%s/.%s.lock\n' "$(dirname "$STATE")" "$(basename "$STATE")"
}

cmd_up() {
  cmd_build
  with_lock "$(state_lock)" up_locked
}

up_locked() {
  local bin start url
  bin="$(bin_dir)"
  if [[ -f "$STATE/$MARKER" ]]; then
    if running_pid etcd >/dev/null && running_pid kube-apiserver >/dev/null && healthy; then
      log "already running at $(cat "$STATE/url") (state in $STATE); nothing to do"
      return 0
    fi
    log "found stale state in $STATE; cleaning it up"
    down_locked
  fi
  if [[ -e "$STATE" ]] && [[ -n "$(ls -A "$STATE" 2>/dev/null)" ]]; then
    die "$STATE exists and was not created by this script; remove it or set MAILROOM_TESTENV_DIR"
  fi
  start="$SECONDS"
  mkdir -p "$STATE/logs" "$STATE/etcd"
  chmod 700 "$STATE/etcd"
  : >"$STATE/$MARKER"

  local ports
  read -r -a ports <<<"$(free_ports)"
  printf '%s\n' "${ports[0]}" >"$STATE/apiserver-port"
  printf '%s\n' "${ports[1]}" >"$STATE/etcd-port"
  printf '%s\n' "${ports[2]}" >"$STATE/etcd-peer-port"
  url="https://127.0.0.1:${ports[0]}"
  printf '%s\n' "$url" >"$STATE/url"
  printf '%s\n' "$url" >"$STATE/sa-issuer"

  log "generating certificates in $STATE/certs"
  make_certs
  printf '%s\n' "$STATE/certs/sa.key" >"$STATE/sa-signing-key-file"
  printf '%s\n' "$STATE/certs/sa.pub" >"$STATE/sa-key-file"
  write_kubeconfig "$url"
  if [[ "${MAILROOM_TESTENV_AUDIT:-}" == "1" ]]; then
    write_audit_policy
    log "audit log of requests on Secrets: $STATE/logs/audit.log"
  fi
  {
    printf 'KUBECONFIG=%q\n' "$STATE/kubeconfig"
    printf 'MAILROOM_TESTENV_URL=%q\n' "$url"
    printf 'MAILROOM_TESTENV_SA_ISSUER=%q\n' "$url"
    printf 'MAILROOM_TESTENV_SA_SIGNING_KEY_FILE=%q\n' "$STATE/certs/sa.key"
    printf 'MAILROOM_TESTENV_SA_KEY_FILE=%q\n' "$STATE/certs/sa.pub"
    printf 'MAILROOM_TESTENV_BIN=%q\n' "$bin"
  } >"$STATE/testenv.env"

  log "starting etcd on 127.0.0.1:${ports[1]}"
  start_etcd "$bin"
  log "starting kube-apiserver on $url"
  start_apiserver "$bin"
  wait_ready
  log "control plane ready at $url in $((SECONDS - start))s"
  log "use it with: eval \"\$($REPO_ROOT/hack/testenv.sh env)\""
}

cmd_down() {
  if [[ ! -d "$STATE" ]]; then
    log "not running (no $STATE)"
    return 0
  fi
  with_lock "$(state_lock)" down_locked
}

down_locked() {
  [[ -d "$STATE" ]] || return 0
  if [[ ! -f "$STATE/$MARKER" ]] && [[ -n "$(ls -A "$STATE" 2>/dev/null)" ]]; then
    die "$STATE was not created by this script; not removing it"
  fi
  stop_component kube-apiserver
  stop_component etcd
  rm -rf "$STATE"
  log "stopped; removed $STATE"
}

cmd_status() {
  if [[ ! -f "$STATE/$MARKER" ]]; then
    log "not running (no state in $STATE)"
    return 1
  fi
  local name
  for name in etcd kube-apiserver; do
    if ! running_pid "$name" >/dev/null; then
      log "$name is not running (state in $STATE)"
      return 1
    fi
  done
  if ! healthy; then
    log "kube-apiserver at $(cat "$STATE/url") is not ready"
    return 1
  fi
  cat "$STATE/url"
}

cmd_env() {
  local bin
  bin="$(bin_dir)"
  have_binaries "$bin" || log "binaries not built yet; run: $REPO_ROOT/hack/testenv.sh build"
  [[ -f "$STATE/kubeconfig" ]] || log "control plane not started; run: $REPO_ROOT/hack/testenv.sh up"
  printf 'export KUBECONFIG=%q\n' "$STATE/kubeconfig"
  printf 'export MAILROOM_TESTENV_DIR=%q\n' "$STATE"
  # shellcheck disable=SC2016 # $PATH is expanded by the shell that evaluates this line.
  printf 'export PATH=%q:"$PATH"\n' "$bin"
}

cmd_restart_apiserver() {
  [[ -f "$STATE/$MARKER" ]] || die "not running (no state in $STATE); run: $REPO_ROOT/hack/testenv.sh up"
  with_lock "$(state_lock)" restart_apiserver_locked
}

restart_apiserver_locked() {
  local start="$SECONDS"
  stop_apiserver_locked
  start_apiserver_locked
  log "kube-apiserver ready again in $((SECONDS - start))s"
}

cmd_stop_apiserver() {
  [[ -f "$STATE/$MARKER" ]] || die "not running (no state in $STATE); run: $REPO_ROOT/hack/testenv.sh up"
  with_lock "$(state_lock)" stop_apiserver_locked
}

cmd_start_apiserver() {
  [[ -f "$STATE/$MARKER" ]] || die "not running (no state in $STATE); run: $REPO_ROOT/hack/testenv.sh up"
  with_lock "$(state_lock)" start_apiserver_locked
}

# Stops kube-apiserver and waits until its port is free, so that it can start on it again.
stop_apiserver_locked() {
  local port i
  port="$(cat "$STATE/apiserver-port")"
  stop_component kube-apiserver
  for ((i = 0; i < 50; i++)); do
    port_free "$port" && break
    sleep 0.1
  done
  port_free "$port" || die "port $port is still in use after kube-apiserver stopped"
}

start_apiserver_locked() {
  local bin
  bin="$(bin_dir)"
  have_binaries "$bin" || die "binaries missing from $bin; run: $REPO_ROOT/hack/testenv.sh build"
  running_pid etcd >/dev/null || die "etcd is not running; run: $REPO_ROOT/hack/testenv.sh down && $REPO_ROOT/hack/testenv.sh up"
  running_pid kube-apiserver >/dev/null && die "kube-apiserver is already running"
  log "starting kube-apiserver on $(cat "$STATE/url")"
  start_apiserver "$bin"
  wait_ready
}

usage() {
  cat >&2 <<EOF
usage: $0 build|up|down|status|env|restart-apiserver|stop-apiserver|start-apiserver
  build              build kube-apiserver, etcd and kubectl into $CACHE_ROOT/<key>/bin
  bin-dir            print the directory those binaries are in
  up                 start etcd and kube-apiserver on 127.0.0.1 (state in $STATE)
  down               stop them and remove the state directory
  status             print the server URL; exit non-zero unless running and ready
  env                print export lines for: eval "\$($0 env)"
  restart-apiserver  restart kube-apiserver alone with the same flags and port
  stop-apiserver     stop kube-apiserver alone (etcd keeps running)
  start-apiserver    start kube-apiserver again after stop-apiserver
EOF
}

main() {
  local cmd="${1:-}"
  BIN_DIR="$CACHE_ROOT/$(cache_key)/bin"
  readonly BIN_DIR
  case "$cmd" in
    build) cmd_build ;;
    bin-dir) bin_dir ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    restart-apiserver) cmd_restart_apiserver ;;
    stop-apiserver) cmd_stop_apiserver ;;
    start-apiserver) cmd_start_apiserver ;;
    -h | --help | help)
      usage
      ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
