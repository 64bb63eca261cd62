#!/usr/bin/env bash
# Mutation fuzzing on a stable toolchain: runs the four fuzz tests (config parser, data files,
# pipeline schedule IR, checkpoint files) for about MINUTES in total, split evenly, in release.
#
#   scripts/fuzz.sh MINUTES            e.g. scripts/fuzz.sh 10
#   FABBRICA_FUZZ_SEED=0x1234 scripts/fuzz.sh 2    (replay one stream; default: a seed per run)
#   FABBRICA_FUZZ_OUT=/tmp/ff scripts/fuzz.sh 5     (where failing inputs go)
#
# Prints, per target, the iterations run and the failures. A failing input is written to
# $FABBRICA_FUZZ_OUT/<target>/<seed>-<iteration>/ (default target/fuzz-failures); copy that
# directory into the crate's tests/fuzz_regressions/<target>/ to replay it on every test run:
#   config     -> crates/train/tests/fuzz_regressions/config/
#   data       -> crates/data/tests/fuzz_regressions/data/
#   pipeline   -> crates/pipeline/tests/fuzz_regressions/pipeline/
#   checkpoint -> crates/train/tests/fuzz_regressions/checkpoint/
# Exit status: 0 when no target failed, 1 otherwise, 2 on a usage error.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() { echo "usage: scripts/fuzz.sh MINUTES   (e.g. scripts/fuzz.sh 10; MINUTES is a positive whole number)" >&2; exit 2; }
[ $# -eq 1 ] || usage
[[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ] || { echo "error: MINUTES must be a positive whole number, got '$1' (e.g. scripts/fuzz.sh 10)" >&2; exit 2; }

source scripts/env.sh
export FABBRICA_FUZZ_OUT="${FABBRICA_FUZZ_OUT:-$ROOT/target/fuzz-failures}"
unset FABBRICA_FUZZ_ITERS
# package, test target, fuzz target name
targets=(
  "fabbrica-train fuzz_config config"
  "fabbrica-data fuzz data"
  "fabbrica-pipeline fuzz pipeline"
  "fabbrica-train fuzz_checkpoint checkpoint"
)
per=$(( $1 * 60 / ${#targets[@]} ))
[ "$per" -ge 1 ] || per=1

echo "fuzz: building the fuzz tests (release)"
cargo test --release -q --no-run -p fabbrica-train -p fabbrica-data -p fabbrica-pipeline \
  --test fuzz_config --test fuzz --test fuzz_checkpoint 2>&1 | grep -v '^\s*Executable' || true

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
failed=0
summary=()
for t in "${targets[@]}"; do
  set -- $t
  echo "fuzz: $3 for ${per}s"
  if FABBRICA_FUZZ_SECONDS=$per cargo test --release -q -p "$1" --test "$2" -- --nocapture >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed=1
    grep -E '^fuzz .*FAILURE|input saved in' "$log" | head -40 || true
  fi
  line=$(grep -E "^fuzz $3: [0-9]+ iterations" "$log" | tail -1 || true)
  if [ -z "$line" ]; then
    # No summary: the test did not get that far (a build error, or a crash such as an abort).
    tail -20 "$log"
    line="fuzz $3: no summary (the test crashed or did not build; see above)"
    failed=1
  fi
  summary+=("$status  $line")
done
echo
echo "fuzz summary (failing inputs, if any, are under $FABBRICA_FUZZ_OUT):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
