#!/usr/bin/env bash
# The benchmark (`make bench`): the release operator against a private local control plane, N
# EmailMessages through the Microsoft 365 emulator and through the SMTP test server.
#
#   make bench                          N=2000, both transports, the open-loop run, 100,000 finished
#   make bench N=10000                  one size
#   make bench BENCH_SIZES=1000,2000,5000
#   hack/bench.sh --transports smtp --no-ceiling     (flags go to mailroom-bench; --help lists them)
#
# Builds the operator, the emulator and bench/ (mailroom-bench) in release mode, starts a control
# plane of its own (MAILROOM_TESTENV_DIR, default target/bench/testenv; stopped again at the end
# unless it was already running), installs the CRDs, and runs mailroom-bench, which starts the
# peers and the operator, shows progress, prints the table and writes target/bench/results.json.
# Figures are printed, never asserted: the machine's load shows in them.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
cd "$REPO_ROOT"

say() { printf 'bench: %s\n' "$*" >&2; }

TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
case "$TARGET_DIR" in
  /*) ;;
  *) TARGET_DIR="$REPO_ROOT/$TARGET_DIR" ;;
esac
export MAILROOM_TESTENV_DIR="${MAILROOM_TESTENV_DIR:-$REPO_ROOT/target/bench/testenv}"
export BENCH_SIZES="${BENCH_SIZES:-${N:-2000}}"
# The retained-history run (100,000 finished messages; BENCH_HISTORY=0 skips it) and the open-loop
# latency run (BENCH_OPEN_LOOP_SECONDS, default 120; 0 skips it).
export BENCH_HISTORY="${BENCH_HISTORY:-100000}"

say "building the operator, the emulator and the benchmark (release)"
cargo build --release -p mailroom -p m365-emulator -p mailroom-bench --bins

started_here=0
if ! bash hack/testenv.sh status >/dev/null 2>&1; then
  say "starting a control plane in $MAILROOM_TESTENV_DIR"
  bash hack/testenv.sh up
  started_here=1
fi
stop_testenv() {
  if ((started_here)) && [[ -z "${BENCH_KEEP_TESTENV:-}" ]]; then
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
export BENCH_COMMAND="make bench BENCH_SIZES=$BENCH_SIZES BENCH_HISTORY=$BENCH_HISTORY${*:+ ARGS=\"$*\"}"
"$TARGET_DIR/release/mailroom-bench" --out "$TARGET_DIR/bench" "$@"
