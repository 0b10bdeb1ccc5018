#!/usr/bin/env bash
# Run every fuzz target (fuzz/fuzz_targets) for a bounded time; any crash,
# panic, leak or timeout fails (cargo fuzz exits non-zero and leaves the
# input in fuzz/artifacts/TARGET/).
#
#   scripts/fuzz.sh            # FUZZ_SECONDS (default 30) per target
#   FUZZ_SECONDS=300 scripts/fuzz.sh decode_log
#
# cargo-fuzz passes unstable (-Z) flags to rustc; the machines have only
# the stable toolchain, so RUSTC_BOOTSTRAP=1 allows them. No sanitizer
# (`-s none`: the decoders are safe Rust): libFuzzer's coverage guidance,
# release code with debug assertions (overflow checks) on.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-30}
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -s none
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
  echo "fuzz: $t for ${secs} s"
  if ! cargo fuzz run -s none "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
      >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED (the input is in fuzz/artifacts/$t/)"
    exit 1
  fi
  grep -E "^Done " "$log" || true
done
echo "fuzz: ${#targets[@]} targets ran ${secs} s each without a crash"
