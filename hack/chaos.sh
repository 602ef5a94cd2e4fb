#!/usr/bin/env bash
# The full chaos run (`make chaos`): tests/chaos.rs at full scale on its own private control
# plane, printing progress while it runs and a summary table at the end. The short form of the
# same test runs in `make test`.
#
# Environment (defaults are the full run; see tests/chaos.rs):
#   MAILROOM_CHAOS_MESSAGES            1000
#   MAILROOM_CHAOS_REPLICAS            3 (operator processes with --leader-elect)
#   MAILROOM_CHAOS_KILLS               6 (SIGKILLs of the leader)
#   MAILROOM_CHAOS_APISERVER_RESTARTS  1 (quick restarts of kube-apiserver)
#   MAILROOM_CHAOS_OUTAGES             2 (kube-apiserver stopped until the leader steps down)
#   MAILROOM_CHAOS_LOST_ANSWERS        0.15 (share of claims whose answer the proxy withholds)
#   MAILROOM_CHAOS_SEED                random (printed at the start; set it to replay a run)
#   MAILROOM_CHAOS_TIMEOUT_SECS        900 (the run fails if messages are unfinished by then)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
say() { printf '==> %s\n' "$*" >&2; }

export MAILROOM_CHAOS_MESSAGES="${MAILROOM_CHAOS_MESSAGES:-1000}"
export MAILROOM_CHAOS_REPLICAS="${MAILROOM_CHAOS_REPLICAS:-3}"
export MAILROOM_CHAOS_KILLS="${MAILROOM_CHAOS_KILLS:-6}"
export MAILROOM_CHAOS_APISERVER_RESTARTS="${MAILROOM_CHAOS_APISERVER_RESTARTS:-1}"
export MAILROOM_CHAOS_OUTAGES="${MAILROOM_CHAOS_OUTAGES:-2}"
export MAILROOM_CHAOS_TIMEOUT_SECS="${MAILROOM_CHAOS_TIMEOUT_SECS:-900}"

target="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
say "building mailroom, the emulator and the chaos test"
cargo build --quiet --workspace --bins
cargo test --quiet --no-run --test chaos
export MAILROOM_BIN="$target/debug/mailroom"
export MAILROOM_EMULATOR_BIN="$target/debug/m365-emulator"
MAILROOM_PYTHON="$(bash hack/pyenv.sh | tail -n 1)"
export MAILROOM_PYTHON

say "chaos run: $MAILROOM_CHAOS_MESSAGES messages, $MAILROOM_CHAOS_REPLICAS replicas, $MAILROOM_CHAOS_KILLS leader kills, $MAILROOM_CHAOS_APISERVER_RESTARTS API server restart(s), $MAILROOM_CHAOS_OUTAGES outage(s)"
# A hard bound on top of the test's own: the run always stops by itself.
timeout --kill-after=30 $((MAILROOM_CHAOS_TIMEOUT_SECS + 180)) \
  cargo test --quiet --test chaos -- --nocapture --test-threads 1
