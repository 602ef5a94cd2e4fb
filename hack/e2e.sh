#!/usr/bin/env bash
# The operator as users run it: its image, installed by its Helm chart and kustomize base into the
# one-node cluster of hack/cluster.sh, with the mail peers listening where Pods reach them.
#
#   hack/e2e.sh full     `make e2e`: the release image, batches of hundreds and thousands
#   hack/e2e.sh short    inside `make test`: the debug binary's image, small batches
#
# Brings the cluster up (and down again afterwards unless MAILROOM_KEEP_CLUSTER=1), imports the
# images, then runs the ignored tests of tests/cluster.rs one at a time.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
say() { printf '==> %s\n' "$*" >&2; }
mode="${1:-full}"
case "$mode" in
  full | short) ;;
  *)
    echo "usage: $0 full|short" >&2
    exit 2
    ;;
esac
start=$SECONDS

if ! bash hack/cluster.sh preflight; then
  say "this host cannot run the one-node cluster (see above)"
  exit 1
fi

MAILROOM_PYTHON="${MAILROOM_PYTHON:-$(bash hack/pyenv.sh | tail -n 1)}"
MAILROOM_HELM="${MAILROOM_HELM:-$(bash hack/helm.sh | tail -n 1)}"
export MAILROOM_PYTHON MAILROOM_HELM

say "building the binaries the tests run on the host (mailroom send, the emulator)"
cargo build --quiet --package mailroom --bin mailroom --package m365-emulator --bin m365-emulator
if [[ "$mode" == full ]]; then
  say "building the operator image from the release binary (make image)"
  bash hack/image.sh build
else
  # The debug binary spares `make test` a release build; the image is otherwise the same.
  say "building the operator image from the debug binary"
  MAILROOM_IMAGE_BINARY="$REPO_ROOT/target/debug/mailroom" bash hack/image.sh build
fi
bash hack/image.sh toolbox

# The Prometheus Operator's real ServiceMonitor CRD, for applying the chart's ServiceMonitor against
# its schema: from the Go module proxy, pinned (it is in the module's example/ tree).
readonly PROMETHEUS_OPERATOR=github.com/prometheus-operator/prometheus-operator@v0.85.0
say "fetching the ServiceMonitor CRD of $PROMETHEUS_OPERATOR from the Go module proxy"
# A failed download (the proxy or the network away for a moment) is said, with go's own words,
# and tried again: three attempts, 10 s apart.
module_dir=""
for attempt in 1 2 3; do
  if download="$(cd "$(mktemp -d)" && go mod download -json "$PROMETHEUS_OPERATOR" 2>&1)"; then
    module_dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$download")"
    break
  fi
  echo "go mod download $PROMETHEUS_OPERATOR failed (attempt $attempt of 3): $download" >&2
  if ((attempt < 3)); then sleep 10; fi
done
MAILROOM_E2E_SERVICEMONITOR_CRD="$module_dir/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
[[ -f "$MAILROOM_E2E_SERVICEMONITOR_CRD" ]] || {
  echo "no ServiceMonitor CRD in $module_dir" >&2
  exit 1
}
export MAILROOM_E2E_SERVICEMONITOR_CRD

# What the cluster may change on the host, before it starts: `down` must leave exactly this.
mkdir -p target/e2e
bash hack/cluster.sh host-state >target/e2e/host-before.txt

say "starting the one-node cluster"
bash hack/cluster.sh up
cleanup() {
  local rc=$?
  if ((rc != 0)); then
    bash hack/cluster.sh logs >&2 || true
  fi
  if [[ "${MAILROOM_KEEP_CLUSTER:-}" == 1 ]]; then
    say "leaving the cluster running (MAILROOM_KEEP_CLUSTER=1); stop it with: make cluster-down"
    exit "$rc"
  fi
  say "stopping the cluster"
  bash hack/cluster.sh down || rc=1
  # The host as it was: iptables, sysctls, links, routes, mounts, directories, cgroups, processes.
  bash hack/cluster.sh host-state >target/e2e/host-after.txt
  if ! diff -u target/e2e/host-before.txt target/e2e/host-after.txt >&2; then
    say "FAILED: the host is not as the cluster found it (the diff above)"
    rc=1
  fi
  # A second `down` finds nothing to do.
  if [[ "$(bash hack/cluster.sh down 2>&1)" != *"nothing to stop"* ]]; then
    say "FAILED: a second cluster down did not find the host clean"
    rc=1
  fi
  exit "$rc"
}
trap cleanup EXIT

# A run killed in the middle leaves its processes, mounts and rules behind; the next `up` takes
# them down first. Every cluster process is killed here as a crash would, then `up` runs again.
say "killing every cluster process (SIGKILL), as a crashed run would, and starting again"
bash hack/cluster.sh kill
bash hack/cluster.sh up
eval "$(bash hack/cluster.sh env)"

MAILROOM_E2E_IMAGE="$(bash hack/image.sh name)"
MAILROOM_E2E_TOOLBOX="$(bash hack/image.sh toolbox-name)"
export MAILROOM_E2E_IMAGE MAILROOM_E2E_TOOLBOX
bash hack/cluster.sh import "target/image/mailroom-${MAILROOM_E2E_IMAGE##*:}.oci.tar"
bash hack/cluster.sh import target/image/toolbox.oci.tar
export MAILROOM_E2E_MODE="$mode"
export MAILROOM_BIN="$REPO_ROOT/target/debug/mailroom"
export MAILROOM_EMULATOR_BIN="$REPO_ROOT/target/debug/m365-emulator"
say "running tests/cluster.rs ($mode form)"
cargo test --test cluster -- --ignored --test-threads 1 --nocapture
say "cluster tests ($mode) passed in $((SECONDS - start))s"
