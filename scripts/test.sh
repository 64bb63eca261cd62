#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: same setup as quickstart.sh, then every test
# of the workspace (release profile: the tests run real training steps).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source scripts/env.sh
# Formatting is part of the contract (rustfmt.toml); a diff fails the suite before anything builds.
if ! cargo fmt --all --check >/dev/null; then
  echo "error: the code is not formatted as rustfmt.toml says: run cargo fmt --all" >&2
  exit 1
fi
# Lints too (Cargo.toml's [workspace.lints]: every unsafe block says why it is sound); release
# profile, so it shares the dependencies the tests build.
if ! cargo clippy --release --workspace --all-targets -q -- -D warnings; then
  echo "error: clippy found warnings (above): fix them, or allow one on the smallest item and say why" >&2
  exit 1
fi
# Examples assert their own results; run them first so cargo test's summary closes the log.
cargo run --release -q -p fabbrica-examples --example overfit_one_batch
log="$(mktemp)"
# Tests that need hardware this machine lacks (a GPU) append one line each here and return early.
export FABBRICA_SKIP_LOG="$(mktemp)"
trap 'rm -f "$log" "$FABBRICA_SKIP_LOG"' EXIT
cargo test --release --workspace "$@" 2>&1 | tee "$log"
# One closing line over every test binary (cargo's own last line is the last crate's doc-tests).
# cargo counts a skipped test as passed; the skip log corrects that.
skipped=$(wc -l < "$FABBRICA_SKIP_LOG")
sed 's/^/skipped: /' "$FABBRICA_SKIP_LOG"
awk -v k="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) s += $(i-1) } }
     END { printf "all tests: %d passed, %d failed, %d skipped\n", p - k, f, s + k }' "$log"
