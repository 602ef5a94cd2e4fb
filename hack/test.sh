#!/usr/bin/env bash
# The whole suite: format, clippy, unit tests, then integration tests against a real
# kube-apiserver and etcd, a real SMTP server and the Microsoft 365 emulator.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
say() { printf '==> %s\n' "$*" >&2; }

start=$(date +%s)
say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy --workspace --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "checking crds/ against 'mailroom crd'"
cargo build --quiet --workspace --bins
if ! diff -u crds/mailroom.dev.yaml <(target/debug/mailroom crd) >/dev/null; then
  diff -u crds/mailroom.dev.yaml <(target/debug/mailroom crd) | head -40 >&2 || true
  echo "crds/ is out of date: run 'make crds' and commit the result" >&2
  exit 1
fi

say "installing swaks for the SMTP listener's protocol tests (Debian packages, once per machine)"
# shellcheck source=hack/lib/debian-packages.sh
source hack/lib/debian-packages.sh
PREFIX="test:" require_debian_packages "the SMTP listener's tests" swaks=20201014.0-2 libnet-ssleay-perl=1.92-2+b1

say "preparing the Python environment for the SMTP test server"
MAILROOM_PYTHON="$(bash hack/pyenv.sh | tail -n 1)"
export MAILROOM_PYTHON
say "self-test of the SMTP test server"
"$MAILROOM_PYTHON" tests/peers/selftest.py

say "building helm for the chart tests (once per machine; a first build takes several minutes)"
MAILROOM_HELM="$(bash hack/helm.sh | tail -n 1)"
export MAILROOM_HELM
say "building promtool and Alertmanager for the alerting tests (once per machine; a first build takes several minutes)"
MAILROOM_PROMTOOL="$(bash hack/prom-tools.sh promtool | tail -n 1)"
MAILROOM_ALERTMANAGER="$(bash hack/prom-tools.sh alertmanager | tail -n 1)"
export MAILROOM_PROMTOOL MAILROOM_ALERTMANAGER
say "building Flux's notification-controller and argocd-notify for the GitOps notification tests (once per machine; a first build takes several minutes)"
MAILROOM_NOTIFICATION_CONTROLLER="$(bash hack/gitops-tools.sh notification-controller | tail -n 1)"
MAILROOM_ARGOCD_NOTIFY="$(bash hack/gitops-tools.sh argocd-notify | tail -n 1)"
export MAILROOM_NOTIFICATION_CONTROLLER MAILROOM_ARGOCD_NOTIFY

export MAILROOM_TESTENV_DIR="${MAILROOM_TESTENV_DIR:-$REPO_ROOT/target/testenv-test}"
say "starting the local control plane (state in $MAILROOM_TESTENV_DIR)"
bash hack/testenv.sh up
cleanup() {
  if [[ "${MAILROOM_KEEP_TESTENV:-}" != "1" ]]; then
    say "stopping the local control plane"
    bash hack/testenv.sh down || true
  fi
}
trap cleanup EXIT
eval "$(bash hack/testenv.sh env)"

say "installing the CRDs"
kubectl apply --server-side --force-conflicts -f crds/mailroom.dev.yaml >/dev/null
kubectl wait --for=condition=Established --timeout=60s \
  crd/mailprofiles.mailroom.dev crd/clustermailprofiles.mailroom.dev crd/emailmessages.mailroom.dev crd/emailtemplates.mailroom.dev \
  crd/alertroutes.mailroom.dev crd/sendrecords.mailroom.dev >/dev/null

export MAILROOM_BIN="$REPO_ROOT/target/debug/mailroom"
export MAILROOM_EMULATOR_BIN="$REPO_ROOT/target/debug/m365-emulator"
say "cargo test --workspace (unit and integration)"
cargo test --workspace --no-fail-fast -- --test-threads "${MAILROOM_TEST_THREADS:-2}"
cleanup
trap - EXIT

# The short form of the cluster tests: the operator's image installed by its Helm chart into a
# real one-node cluster (hack/e2e.sh). A host that cannot run the cluster (not root, not Linux)
# skips it, saying why; CI never does.
if bash hack/cluster.sh preflight; then
  say "the operator image: built without a container engine, its configuration compared with the Dockerfile's"
  bash hack/image.sh check
  say "the operator in a one-node cluster, short form (make e2e runs the full form)"
  bash hack/e2e.sh short
elif [[ "${CI:-}" == true ]]; then
  echo "CI must run the cluster tests, and this host cannot (see above)" >&2
  exit 1
else
  say "skipping the cluster tests: this host cannot run the one-node cluster (see above)"
fi
say "all tests passed in $(( $(date +%s) - start ))s"
