#!/usr/bin/env bash
# Runs each cargo-fuzz target of fuzz/ for a bounded time and prints how many inputs each ran.
#
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_TARGETS   targets to run (default: address mime headers)
#
# cargo-fuzz is installed into ~/.cache/mailroom/cargo-fuzz (MAILROOM_CACHE) when missing. The
# targets are built without a sanitizer (`-s none`): libFuzzer's coverage instrumentation is a
# stable rustc option, so stable Rust is enough. A crash stops the run and leaves its input in
# fuzz/artifacts/<target>/; turn it into a unit test in the crate, then fix it.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '==> %s\n' "$*" >&2; }

seconds="${FUZZ_SECONDS:-60}"
read -r -a targets <<<"${FUZZ_TARGETS:-address mime headers}"
fuzz_root="${MAILROOM_CACHE:-${HOME:?HOME must be set}/.cache/mailroom}/cargo-fuzz"
export PATH="$fuzz_root/bin:$PATH"
target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
  say "cargo-fuzz is missing: installing it with 'cargo install --locked cargo-fuzz --root $fuzz_root' (once per machine, a few minutes)"
  cargo install --locked cargo-fuzz --root "$fuzz_root"
fi

cd "$REPO_ROOT/fuzz"
# `cargo fuzz run` builds what it runs (release, debug assertions, coverage instrumentation); a
# separate `cargo fuzz build` would build everything a second time with other settings.
say "building and running the fuzz targets (cargo fuzz run -s none)"

summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="$target_dir/$t.log"
  say "fuzzing $t for ${seconds}s"
  if ! cargo fuzz run -s none --target-dir "$target_dir" "$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -max_len=4096 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    say "$t found a crash: its input is in fuzz/artifacts/$t/ (full log: $log)"
    exit 1
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
  summary+=("$(printf '%-8s %6ss %12s executions %8s/s' "$t" "$seconds" "${execs:-?}" "${rate:-?}")")
done
say "no crash found"
printf '%s\n' "${summary[@]}"
