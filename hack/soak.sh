#!/usr/bin/env bash
# The soak (`make soak`): the release operator for SOAK_MINUTES (default 30) at a steady message
# rate through the Microsoft 365 emulator and the SMTP test server, every message deleted after its
# ttlSecondsAfterFinished, against a private local control plane. It samples the operator's RSS,
# its async tasks (mailroom_tasks), threads and open file descriptors, fits a line through each
# after a warm-up and prints the slopes per hour; samples go to target/soak/soak-samples.csv and
# everything to target/soak/soak.json. Figures are printed, never asserted.
#
#   make soak                          30 minutes, 2 messages/s
#   make soak SOAK_MINUTES=120 SOAK_RATE=5
#
# Environment: SOAK_MINUTES (30), SOAK_RATE (messages/s, 2), SOAK_TTL_SECONDS (30),
# SOAK_SAMPLE_SECONDS (10), SOAK_WARMUP_MINUTES (5, left out of the slopes).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
cd "$REPO_ROOT"

say() { printf 'soak: %s\n' "$*" >&2; }

TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
case "$TARGET_DIR" in
  /*) ;;
  *) TARGET_DIR="$REPO_ROOT/$TARGET_DIR" ;;
esac
export SOAK_MINUTES="${SOAK_MINUTES:-30}"
# Empty (as make passes an unset variable) means the default.
for v in SOAK_RATE SOAK_TTL_SECONDS SOAK_SAMPLE_SECONDS SOAK_WARMUP_MINUTES; do
  [[ -n "${!v:-}" ]] || unset "$v"
done
export MAILROOM_TESTENV_DIR="${MAILROOM_SOAK_TESTENV_DIR:-$REPO_ROOT/target/soak/testenv}"

say "building the operator, the emulator and the benchmark (release)"
cargo build --release -p mailroom -p m365-emulator -p mailroom-bench --bins

started_here=0
if ! bash hack/testenv.sh status >/dev/null 2>&1; then
  say "starting a control plane in $MAILROOM_TESTENV_DIR"
  bash hack/testenv.sh up
  started_here=1
fi
stop_testenv() {
  if ((started_here)) && [[ -z "${SOAK_KEEP_TESTENV:-}" ]]; then
    bash hack/testenv.sh down >/dev/null 2>&1 || true
  fi
}
trap stop_testenv EXIT
eval "$(bash hack/testenv.sh env)"
export KUBECONFIG

say "installing the CRDs"
kubectl apply --server-side --force-conflicts -f crds/mailroom.dev.yaml >/dev/null
kubectl wait --for condition=established --timeout=60s -f crds/mailroom.dev.yaml >/dev/null

MAILROOM_PYTHON="$(bash hack/pyenv.sh | tail -1)"
export MAILROOM_PYTHON
export MAILROOM_BIN="$TARGET_DIR/release/mailroom"
export MAILROOM_EMULATOR_BIN="$TARGET_DIR/release/m365-emulator"
export BENCH_COMMAND="make soak SOAK_MINUTES=$SOAK_MINUTES"
"$TARGET_DIR/release/mailroom-bench" --soak-minutes "$SOAK_MINUTES" --out "$TARGET_DIR/soak" "$@"
