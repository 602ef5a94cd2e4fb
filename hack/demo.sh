#!/usr/bin/env bash
# The demo: mailroom running locally against real peers, with messages delivered.
#
#   hack/demo.sh up     build, start everything in the background, send the demo messages, print
#                       where to look (`make demo`)
#   hack/demo.sh down   stop everything and remove target/demo (`make demo-down`)
#
# Where the host can run the one-node cluster (hack/cluster.sh preflight: Linux, root), `up` shows
# mailroom as users run it: the operator's image installed by its Helm chart into that cluster
# (state in target/demo/cluster), with the SMTP test server and the emulator listening on the
# address Pods reach the host on. Elsewhere it says so and stops; MAILROOM_DEMO_LOCAL=1 (`make
# demo-local`) runs the demo below, with the operator as a process beside a bare kube-apiserver.
#
# The process-based demo starts, each on loopback with its state under target/demo/:
#   - a Kubernetes control plane (etcd and kube-apiserver, hack/testenv.sh, state in testenv/);
#   - the SMTP test server (tests/peers/smtp_server.py, a plain relay; state in smtp/, log smtp.log);
#   - the Microsoft 365 emulator (m365-emulator; state in emulator/, log emulator.log), with the
#     demo's app registered (Mail.Send, a client secret made up at every start);
#   - the operator (target/debug/mailroom run; log operator.log; metrics and health ports printed);
# then applies demo/profiles.yaml and demo/messages.yaml in the namespace team-a and waits until
# every message is Sent. Everything is left running.
#
# A second `up` while the demo runs starts nothing: it says so and prints the summary again. When
# only part of it is running (a process died, the machine rebooted), `up` stops what is left and
# starts afresh. To run a rebuilt operator: `make demo-down && make demo`.
#
# Environment: CARGO_TARGET_DIR (where the binaries are built, default <repo>/target), MAILROOM_CACHE
# (see hack/testenv.sh), MAILROOM_DEMO_TIMEOUT (seconds to wait for the messages, default 120).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
cd "$REPO_ROOT"

# Paths are shown relative to the repository (where `make demo` runs) and used absolute.
readonly DEMO_REL="target/demo"
readonly DEMO="$REPO_ROOT/$DEMO_REL"
readonly MARKER="$DEMO/.mailroom-demo"
readonly LOCK="$REPO_ROOT/target/.demo.lock"
export MAILROOM_TESTENV_DIR="$DEMO/testenv"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
case "$TARGET_DIR" in
  /*) ;;
  *) TARGET_DIR="$REPO_ROOT/$TARGET_DIR" ;;
esac
readonly TARGET_DIR
readonly MAILROOM_BIN="$TARGET_DIR/debug/mailroom"
readonly EMULATOR_BIN="$TARGET_DIR/debug/m365-emulator"
readonly NAMESPACE="team-a"
readonly TENANT_ID="00000000-0000-0000-0000-000000000000"
readonly CLIENT_ID="11111111-1111-1111-1111-111111111111"
readonly MESSAGE_TIMEOUT="${MAILROOM_DEMO_TIMEOUT:-120}"
# "cluster" (the Helm chart in the one-node cluster) or "local" (the operator as a process); set by
# cmd_up, or from demo.env.
DEMO_MODE=""
readonly CLUSTER_DIR="$DEMO/cluster"

say() { printf 'demo: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# --- steps and their timing ---------------------------------------------------------------------

# Milliseconds since the epoch (whole seconds where bash has no EPOCHREALTIME).
now_ms() {
  if [[ -n "${EPOCHREALTIME:-}" ]]; then
    local t="${EPOCHREALTIME/[.,]/}"
    printf '%s\n' "$((10#$t / 1000))"
  else
    printf '%s\n' "$(($(date +%s) * 1000))"
  fi
}

# Formats a duration in milliseconds as 1.2s or 2m05s.
duration() {
  local ms="$1"
  if ((ms < 60000)); then
    printf '%d.%ds\n' "$((ms / 1000))" "$((ms % 1000 / 100))"
  else
    printf '%dm%02ds\n' "$((ms / 60000))" "$((ms % 60000 / 1000))"
  fi
}

STEP=0
STEP_TITLE=""
STEP_START=0
STEPS=9
# The logs worth showing when the current step fails.
STEP_LOGS=()

# Starts step "$1"; the remaining arguments name the components whose logs explain its failure.
step() {
  end_step
  STEP=$((STEP + 1))
  STEP_TITLE="$1"
  shift
  STEP_LOGS=("$@")
  STEP_START="$(now_ms)"
  say "[$STEP/$STEPS] $STEP_TITLE"
}

end_step() {
  [[ -n "$STEP_TITLE" ]] || return 0
  say "[$STEP/$STEPS] done in $(duration $(($(now_ms) - STEP_START)))"
  STEP_TITLE=""
  STEP_LOGS=()
}

show_log_tail() {
  local logfile="$DEMO/$1.log"
  [[ -s "$logfile" ]] || return 0
  say "last lines of $DEMO_REL/$1.log:"
  tail -n 30 "$logfile" | sed 's/^/    /' >&2
}

# On a failed `up`: names the step, shows the logs that explain it, and leaves what runs for a look.
on_up_exit() {
  local rc=$?
  ((rc != 0)) || return 0
  if [[ -n "$STEP_TITLE" ]]; then
    say "error: step $STEP/$STEPS failed after $(duration $(($(now_ms) - STEP_START))): $STEP_TITLE"
    local name
    for name in "${STEP_LOGS[@]}"; do
      show_log_tail "$name"
    done
  fi
  if [[ -f "$MARKER" ]]; then
    say "what started is still running so that you can look at it; 'make demo-down' stops it all"
  fi
  exit "$rc"
}

# --- background processes -----------------------------------------------------------------------

# Prints the pid recorded for component $1 when that process is alive and is the demo's (its
# command line names the demo's directory, which guards against a recycled pid).
running_pid() {
  local pidfile="$DEMO/$1.pid" pid args
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  args="$(ps -p "$pid" -o args= 2>/dev/null)" || return 1
  [[ "$args" == *"$DEMO"* ]] || return 1
  printf '%s\n' "$pid"
}

# Starts component $1 (the command is the rest) detached from this script: its own session, no
# terminal, output to $DEMO/$1.log, none of this script's descriptors, so that it outlives `make`.
launch() {
  local name="$1"
  shift
  local pidfile="$DEMO/$name.pid" logfile="$DEMO/$name.log"
  rm -f "$pidfile"
  local -a detach=(nohup)
  if command -v setsid >/dev/null 2>&1; then
    detach=(setsid nohup)
  fi
  # shellcheck disable=SC2016 # the inner shell expands $$, $0 and $@ itself.
  "${detach[@]}" sh -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidfile" "$@" \
    </dev/null >>"$logfile" 2>&1 8>&- 9>&- &
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -s "$pidfile" ]] && return 0
    sleep 0.1
  done
  die "the $(label "$name") did not start"
}

# What component $1 is, in words.
label() {
  case "$1" in
    smtp) printf 'SMTP test server\n' ;;
    emulator) printf 'Microsoft 365 emulator\n' ;;
    *) printf '%s\n' "$1" ;;
  esac
}

# Stops the components named as arguments, all at once: TERM, then KILL after 10 seconds.
stop_components() {
  local name pid i
  local -a pids=()
  for name in "$@"; do
    if pid="$(running_pid "$name")"; then
      say "stopping the $(label "$name") (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$DEMO/$name.pid"
  done
  for pid in "${pids[@]}"; do
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "pid $pid did not stop after 10s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

# Waits up to $3 seconds for file $2 written by component $1, which must stay alive meanwhile.
wait_for_file() {
  local name="$1" file="$2" timeout="$3" deadline
  deadline=$((SECONDS + timeout))
  until [[ -s "$file" ]]; do
    running_pid "$name" >/dev/null || die "the $(label "$name") exited during start-up"
    ((SECONDS < deadline)) || die "the $(label "$name") wrote no ${file#"$REPO_ROOT/"} within ${timeout}s"
    sleep 0.2
  done
}

# Prints two free TCP ports on 127.0.0.1, chosen by the kernel.
free_ports() {
  "$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
'
}

# --- small HTTP and JSON helpers (the venv's Python; no curl or jq needed) ------------------------

# Prints JSON field $2 of file $1.
json_field() {
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

# POSTs stdin as JSON to $1, trusting CA file $2; prints the answer, fails on a non-2xx status.
post_json() {
  "$PY" -c '
import ssl, sys, urllib.error, urllib.request
url, ca = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, data=sys.stdin.buffer.read(), method="POST",
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=ca), timeout=10) as r:
        print(r.read().decode())
except urllib.error.HTTPError as e:
    sys.exit(f"{url}: HTTP {e.code}: {e.read().decode()[:500]}")
except OSError as e:
    sys.exit(f"{url}: {e}")
' "$1" "$2"
}

# Exits 0 when GET $1 (plain HTTP) answers 200.
http_ok() {
  "$PY" -c '
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
' "$1"
}

# Prints template $1 with each ${NAME} replaced by VALUE, for the NAME=VALUE arguments after it;
# fails if a placeholder is left.
render() {
  local file="$1" text pair
  shift
  text="$(cat "$file")"
  for pair in "$@"; do
    text="${text//"\${${pair%%=*}}"/"${pair#*=}"}"
  done
  if [[ "$text" =~ \$\{[A-Z_]+\} ]]; then
    die "${file#"$REPO_ROOT/"}: placeholder ${BASH_REMATCH[0]} has no value"
  fi
  printf '%s\n' "$text"
}

# --- up -----------------------------------------------------------------------------------------

# Set by load_state from demo.env, which up_locked writes once everything has started.
DEMO_STARTED="" DEMO_PYTHON="" SMTP_PORT="" SMTP_CONTROL_PORT="" EMULATOR_URL="" METRICS_PORT="" HEALTH_PORT=""
# The venv's Python, set by up_locked or from demo.env.
PY=""

# The saved addresses (demo.env) of a running demo.
load_state() {
  # shellcheck source=/dev/null # written by up_locked.
  source "$DEMO/demo.env"
}

# The background processes of a demo in mode $1.
components() {
  if [[ "$1" == cluster ]]; then echo emulator smtp; else echo operator emulator smtp; fi
}

demo_running() {
  [[ -f "$MARKER" && -f "$DEMO/demo.env" ]] || return 1
  local name mode
  mode="$(sed -n 's/^DEMO_MODE=//p' "$DEMO/demo.env")"
  for name in $(components "$mode"); do
    running_pid "$name" >/dev/null || return 1
  done
  if [[ "$mode" == cluster ]]; then
    MAILROOM_CLUSTER_DIR="$CLUSTER_DIR" bash hack/cluster.sh status >/dev/null 2>&1 8>&-
  else
    bash hack/testenv.sh status >/dev/null 2>&1 8>&-
  fi
}

use_kubectl() {
  if [[ "$DEMO_MODE" == cluster ]]; then
    eval "$(MAILROOM_CLUSTER_DIR="$CLUSTER_DIR" bash hack/cluster.sh env 2>/dev/null 8>&-)"
  else
    eval "$(bash hack/testenv.sh env 2>/dev/null 8>&-)"
  fi
}

cmd_up() {
  mkdir -p "$REPO_ROOT/target"
  exec 8>"$LOCK"
  if command -v flock >/dev/null 2>&1 && ! flock -n 8; then
    say "waiting for another 'hack/demo.sh' to finish"
    flock 8
  fi
  if demo_running; then
    load_state
    PY="$DEMO_PYTHON"
    use_kubectl
    say "the demo is already running (started $DEMO_STARTED); nothing to do"
    if [[ "$DEMO_MODE" == local && "$MAILROOM_BIN" -nt "$DEMO/operator.pid" ]]; then
      say "note: ${MAILROOM_BIN#"$REPO_ROOT/"} was rebuilt since the operator started; to run the new build: make demo-down && make demo"
    else
      say "to start it afresh: make demo-down && make demo"
    fi
    summary
    return 0
  fi
  if [[ -f "$MARKER" ]]; then
    say "found a demo that is only partly running in $DEMO_REL; stopping what is left of it"
    down_locked
  elif [[ -e "$DEMO" ]]; then
    die "$DEMO_REL exists but was not created by this script; remove it and run 'make demo' again"
  fi
  if [[ "${MAILROOM_DEMO_LOCAL:-}" == 1 ]]; then
    DEMO_MODE=local
  elif bash hack/cluster.sh preflight 8>&-; then
    DEMO_MODE=cluster
    STEPS=10
  else
    say "this host cannot run the one-node cluster that the demo installs mailroom into (see above)"
    say "the demo with the operator as a process beside a bare kube-apiserver runs anywhere: make demo-local"
    exit 1
  fi
  trap on_up_exit EXIT
  up_locked
}

# Starts the operator as a process (the local demo), and waits until it is ready.
start_operator() {
  step "starting the operator (target/debug/mailroom run, log in $DEMO_REL/operator.log)" operator
  ports="$(free_ports)"
  metrics_port="${ports% *}"
  health_port="${ports#* }"
  launch operator env KUBECONFIG="$MAILROOM_TESTENV_DIR/kubeconfig" RUST_LOG="info,kube=warn" \
    "$MAILROOM_BIN" run --ca-bundle "$DEMO/emulator/ca.pem" --allow-custom-endpoints \
    --metrics-addr "127.0.0.1:$metrics_port" --health-addr "127.0.0.1:$health_port"
  local deadline=$((SECONDS + 60))
  until http_ok "http://127.0.0.1:$health_port/readyz"; do
    running_pid operator >/dev/null || die "the operator exited during start-up"
    ((SECONDS < deadline)) || die "the operator was not ready within 60s"
    sleep 0.3
  done
  say "operator ready; metrics on http://127.0.0.1:$metrics_port/metrics"
}

up_locked() {
  local started deadline
  started="$(now_ms)"

  step "building mailroom and m365-emulator: cargo build --workspace --bins (a few minutes the first time)"
  cargo build --workspace --bins 8>&-
  [[ -x "$MAILROOM_BIN" && -x "$EMULATOR_BIN" ]] || die "cargo built no $MAILROOM_BIN or $EMULATOR_BIN"

  step "preparing the Python environment for the SMTP test server (hack/pyenv.sh)"
  PY="$(bash hack/pyenv.sh 8>&- | tail -n 1)"
  [[ -x "$PY" ]] || die "hack/pyenv.sh printed no Python interpreter"

  mkdir -p "$DEMO"
  : >"$MARKER"

  # Where the peers listen: loopback for a local operator, the address Pods reach the host on for
  # the cluster's.
  local peer_ip=127.0.0.1
  local -a private=()
  if [[ "$DEMO_MODE" == cluster ]]; then
    step "building the operator image from the debug binary (hack/image.sh build, as make image does from the release binary)"
    MAILROOM_IMAGE_BINARY="$MAILROOM_BIN" bash hack/image.sh build 8>&-
    step "starting the one-node cluster, state in $DEMO_REL/cluster (hack/cluster.sh; the first time, it builds the Kubernetes pieces and containerd into ~/.cache/mailroom: about 15 minutes)"
    MAILROOM_CLUSTER_DIR="$CLUSTER_DIR" bash hack/cluster.sh up 8>&-
    use_kubectl
    MAILROOM_CLUSTER_DIR="$CLUSTER_DIR" bash hack/cluster.sh import "target/image/mailroom-$(bash hack/image.sh name | sed 's/.*://').oci.tar" 8>&-
    peer_ip="$MAILROOM_CLUSTER_HOST_IP"
    private=(--allow-private)
  else
    step "starting the Kubernetes control plane, state in $DEMO_REL/testenv (hack/testenv.sh; the first time, it builds kube-apiserver and etcd into ~/.cache/mailroom: about 10 minutes)"
    bash hack/testenv.sh up 8>&-
    use_kubectl
  fi

  step "starting the SMTP test server, a plain relay (tests/peers/smtp_server.py, state in $DEMO_REL/smtp)" smtp
  launch smtp "$PY" tests/peers/smtp_server.py --listen "$peer_ip:0" "${private[@]}" --control-listen 127.0.0.1:0 \
    --state-dir "$DEMO/smtp" --hostname relay.contoso.com
  wait_for_file smtp "$DEMO/smtp/ready.json" 30
  local smtp_port smtp_control_port
  smtp_port="$(json_field "$DEMO/smtp/ready.json" smtp_port)"
  smtp_control_port="$(json_field "$DEMO/smtp/ready.json" control_port)"
  say "SMTP on $peer_ip:$smtp_port, control API on http://127.0.0.1:$smtp_control_port"

  step "starting the Microsoft 365 emulator (state in $DEMO_REL/emulator) and registering the demo's app" emulator
  mkdir -p "$DEMO/emulator"
  # A signing key made by openssl spares the debug build a slow RSA key generation at start.
  local -a key_args=()
  if command -v openssl >/dev/null 2>&1 &&
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$DEMO/emulator/signing-key.pem" 2>/dev/null; then
    chmod 600 "$DEMO/emulator/signing-key.pem"
    key_args=(--signing-key "$DEMO/emulator/signing-key.pem")
  fi
  launch emulator "$EMULATOR_BIN" --listen "$peer_ip:0" "${private[@]}" --state-dir "$DEMO/emulator" "${key_args[@]}"
  wait_for_file emulator "$DEMO/emulator/url" 60
  local emulator_url client_secret
  emulator_url="$(cat "$DEMO/emulator/url")"
  client_secret="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(30))')"
  # The secret goes through stdin, never a command line.
  printf '{"tenantId":"%s","clientId":"%s","displayName":"mailroom demo","secrets":["%s"],"roles":["Mail.Send"]}' \
    "$TENANT_ID" "$CLIENT_ID" "$client_secret" |
    post_json "$emulator_url/_emulator/apps" "$DEMO/emulator/ca.pem" >/dev/null
  say "emulator at $emulator_url; app $CLIENT_ID registered in tenant $TENANT_ID with the role Mail.Send"

  local ports metrics_port="" health_port=""
  if [[ "$DEMO_MODE" == cluster ]]; then
    step "installing mailroom with its Helm chart: helm install mailroom deploy/helm/mailroom -n mailroom-system (the CRDs, RBAC, two replicas with leader election, trusting the emulator's CA)"
    local helm_bin image
    helm_bin="$(bash hack/helm.sh 8>&- | tail -n 1)"
    image="$(bash hack/image.sh name)"
    "$helm_bin" install mailroom deploy/helm/mailroom --namespace mailroom-system --create-namespace \
      --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=Never \
      --set replicas=2 --set allowCustomEndpoints=true --set-file caBundle.pem="$DEMO/emulator/ca.pem" \
      --wait --timeout 180s >&2
    kubectl -n mailroom-system get pods -o wide >&2
  else
    step "installing the CRDs (crds/mailroom.dev.yaml)"
    kubectl apply --server-side --field-manager=mailroom-demo -f crds/mailroom.dev.yaml >/dev/null
    kubectl wait --for=condition=Established --timeout=60s \
      crd/mailprofiles.mailroom.dev crd/clustermailprofiles.mailroom.dev crd/emailmessages.mailroom.dev >/dev/null
    start_operator
  fi
  {
    printf 'DEMO_MODE=%q\n' "$DEMO_MODE"
    printf 'DEMO_STARTED=%q\n' "$(date '+%Y-%m-%d %H:%M:%S')"
    printf 'DEMO_PYTHON=%q\n' "$PY"
    printf 'SMTP_PORT=%q\nSMTP_CONTROL_PORT=%q\n' "$smtp_port" "$smtp_control_port"
    printf 'EMULATOR_URL=%q\n' "$emulator_url"
    printf 'METRICS_PORT=%q\nHEALTH_PORT=%q\n' "$metrics_port" "$health_port"
  } >"$DEMO/demo.env"

  step "applying demo/profiles.yaml: namespace $NAMESPACE, the client secret, MailProfiles m365-graph and m365-relay" operator emulator
  # Server-side apply keeps the Secret out of the last-applied annotation that client-side apply writes.
  render demo/profiles.yaml CLIENT_SECRET="$client_secret" EMULATOR_URL="$emulator_url" SMTP_HOST="$peer_ip" SMTP_PORT="$smtp_port" |
    kubectl apply --server-side --field-manager=mailroom-demo -f - >&2
  kubectl wait --for=condition=Ready mp --all -n "$NAMESPACE" --timeout=60s >&2

  step "sending demo/messages.yaml and waiting until every message is Sent (at most ${MESSAGE_TIMEOUT}s)" operator emulator smtp
  kubectl apply --server-side --field-manager=mailroom-demo -f demo/messages.yaml >&2
  # Like `kubectl wait --for=condition=Sent em --all`, but a Failed message ends the wait at once.
  local phases
  deadline=$((SECONDS + MESSAGE_TIMEOUT))
  while :; do
    phases="$(kubectl get em -n "$NAMESPACE" -o jsonpath='{range .items[*]}{.status.phase}{" "}{end}')"
    if [[ " $phases" == *" Failed "* ]]; then
      report_messages
      die "a message failed; its status and Events above say why"
    fi
    [[ -n "$phases" && -z "${phases//Sent /}" ]] && break
    if ((SECONDS >= deadline)); then
      report_messages
      die "not every message was sent within ${MESSAGE_TIMEOUT}s"
    fi
    sleep 0.5
  done
  say "every message is Sent: $(kubectl get em -n "$NAMESPACE" -o name | wc -l | tr -d ' ') of them"
  end_step
  trap - EXIT

  load_state
  say "the demo is up in $(duration $(($(now_ms) - started)))"
  summary
}

# Shows the messages and the namespace's recent Events, after a failure.
report_messages() {
  kubectl get mp,em -n "$NAMESPACE" -o wide >&2 || true
  kubectl get events -n "$NAMESPACE" --sort-by=.lastTimestamp 2>/dev/null | tail -n 15 >&2 || true
}

# Prints what runs and where to look.
summary() {
  if [[ "$DEMO_MODE" == cluster ]]; then
    cluster_summary
    return
  fi
  local ca="$DEMO_REL/emulator/ca.pem"
  cat <<EOF

==> mailroom runs locally with its peers, all on 127.0.0.1. Where to look:

Kubernetes: the demo's own kube-apiserver (kubectl comes with it):
  eval "\$(MAILROOM_TESTENV_DIR=$DEMO_REL/testenv bash hack/testenv.sh env)"
  kubectl get mp,em -n $NAMESPACE

EOF
  kubectl get mp,em -n "$NAMESPACE" 2>&1 | sed 's/^./    &/'
  cat <<EOF

  kubectl describe em deploy-finished -n $NAMESPACE     # status, conditions, Events

Mail sent through the SMTP relay (profile m365-relay) to the SMTP test server (port $SMTP_PORT):
  ls $DEMO_REL/smtp/messages/                           # <n>.eml, the message as received
  curl -s http://127.0.0.1:$SMTP_CONTROL_PORT/messages

Mail sent through Microsoft Graph (profile m365-graph) to the Microsoft 365 emulator, which stands
in for login.microsoftonline.com and graph.microsoft.com:
  curl -s --cacert $ca $EMULATOR_URL/_emulator/messages
  curl -s --cacert $ca $EMULATOR_URL/_emulator/token-requests

The operator:
  log       $DEMO_REL/operator.log (emulator.log, smtp.log beside it; testenv/logs/)
  metrics   curl -s http://127.0.0.1:$METRICS_PORT/metrics
  health    curl -s http://127.0.0.1:$HEALTH_PORT/readyz

Send one more (a new name each time):
  kubectl create -f demo/another-message.yaml && kubectl get em -n $NAMESPACE -w

Stop it all: make demo-down
EOF
}

# Prints what runs in the cluster demo and where to look.
cluster_summary() {
  local ca="$DEMO_REL/emulator/ca.pem"
  cat <<EOF

==> mailroom runs as users run it: its image, installed by its Helm chart into a one-node cluster
on this host. The peers listen on $MAILROOM_CLUSTER_HOST_IP, the address its Pods reach the host on.

Kubernetes (kubectl comes with it):
  eval "\$(MAILROOM_CLUSTER_DIR=$DEMO_REL/cluster bash hack/cluster.sh env)"
  kubectl get pods -n mailroom-system -o wide          # two replicas; one holds the Lease
  kubectl get mp,em -n $NAMESPACE

EOF
  kubectl get pods -n mailroom-system 2>&1 | sed 's/^./    &/'
  echo
  kubectl get mp,em -n "$NAMESPACE" 2>&1 | sed 's/^./    &/'
  cat <<EOF

  kubectl describe em deploy-finished -n $NAMESPACE     # status, conditions, Events
  kubectl logs -n mailroom-system deploy/mailroom       # the operator's log

Mail sent through the SMTP relay (profile m365-relay) to the SMTP test server ($MAILROOM_CLUSTER_HOST_IP:$SMTP_PORT):
  ls $DEMO_REL/smtp/messages/
  curl -s http://127.0.0.1:$SMTP_CONTROL_PORT/messages

Mail sent through Microsoft Graph (profile m365-graph) to the Microsoft 365 emulator:
  curl -s --cacert $ca $EMULATOR_URL/_emulator/messages

Send one more (a new name each time):
  kubectl create -f demo/another-message.yaml && kubectl get em -n $NAMESPACE -w

Stop it all, the cluster included (the host is restored): make demo-down
EOF
}

# --- down ---------------------------------------------------------------------------------------

cmd_down() {
  mkdir -p "$REPO_ROOT/target"
  exec 8>"$LOCK"
  if command -v flock >/dev/null 2>&1 && ! flock -n 8; then
    say "waiting for another 'hack/demo.sh' to finish"
    flock 8
  fi
  if [[ ! -e "$DEMO" ]]; then
    say "not running (no $DEMO_REL)"
    return 0
  fi
  if [[ ! -f "$MARKER" ]]; then
    die "$DEMO_REL was not created by this script; not removing it"
  fi
  local start
  start="$(now_ms)"
  down_locked
  say "stopped the demo and removed $DEMO_REL in $(duration $(($(now_ms) - start)))"
}

down_locked() {
  # shellcheck disable=SC2046 # the names of the components
  stop_components $(components local)
  if [[ -d "$CLUSTER_DIR" ]]; then
    MAILROOM_CLUSTER_DIR="$CLUSTER_DIR" bash hack/cluster.sh down 8>&-
  fi
  if [[ -d "$MAILROOM_TESTENV_DIR" ]]; then
    bash hack/testenv.sh down 8>&-
  fi
  rm -rf "$DEMO"
}

usage() {
  cat >&2 <<EOF
usage: $0 up|down
  up    build, start the demo in the background (state in $DEMO_REL), send the demo messages
  down  stop the demo and remove $DEMO_REL
EOF
}

main() {
  case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
