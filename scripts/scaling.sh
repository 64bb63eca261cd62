#!/usr/bin/env bash
# Weak-scaling sweep of data-parallel training: the same per-rank work (micro-batch) at
# np = 1, 2, 4, ... up to N, with `fabbrica bench ddp`; writes a Markdown table and a plot of
# tokens/s and efficiency X(N) / (N * X(1)).
#
#   scripts/scaling.sh [N=4] [OUT=runs/scaling] [-- extra bench ddp arguments]
#   e.g. scripts/scaling.sh 8 runs/scaling -- --preset tiny --set run.threads=1 --steps 10
#
# Ranks beyond the core count are oversubscribed (and efficiency then measures the machine, not
# the communication). Each rank uses run.threads libtorch threads (default here: 1).
# FABBRICA_BIN names another fabbrica binary (scripts/device/check.sh runs the carried one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${1:-4}"; OUT="${2:-runs/scaling}"
shift $(( $# < 2 ? $# : 2 )) || true
[ "${1:-}" = "--" ] && shift
case "$N" in ''|*[!0-9]*|0) echo "error: N must be a positive integer, got '$N'" >&2; exit 2;; esac
source scripts/env.sh
FAB="${FABBRICA_BIN:-target/release/fabbrica}"
if [ -z "${FABBRICA_BIN:-}" ] && [ ! -x "$FAB" ]; then cargo build --release -q -p fabbrica-cli; fi
mkdir -p "$OUT"
extra=("$@")
[ ${#extra[@]} -gt 0 ] || extra=(--set run.threads=1 --steps 10 --rounds 3)
inputs=()
np=1
while [ "$np" -le "$N" ]; do
  echo "== np=$np" >&2
  if [ "$np" -eq 1 ]; then
    "$FAB" bench ddp "${extra[@]}" --json "$OUT/np$np.json" >&2
  else
    mpirun -np "$np" --oversubscribe "$FAB" bench ddp "${extra[@]}" --json "$OUT/np$np.json" >&2
  fi
  inputs+=("$OUT/np$np.json")
  np=$(( np * 2 ))
done
"$FAB" bench scaling --inputs "${inputs[@]}" --table "$OUT/scaling.md" --plot "$OUT/scaling.svg"
echo "table: $OUT/scaling.md  plot: $OUT/scaling.svg" >&2
