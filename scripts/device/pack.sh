#!/usr/bin/env bash
# Packs what the lent GPU machine needs into .device/ (git-ignored), for the device tool's `carry`:
# stripped release binaries (fabbrica, comm_selftest, the NCCL, foreach and precision test binaries), shared/device/env.sh,
# the PyTorch throughput anchor, the default corpus, and (scripts/device/pack_mpi.sh) a relocatable
# Open MPI runtime with mpirun and the libraries a bare image may lack. The GPU machine has no
# Rust: build here, carry .device, run scripts/device/check.sh there. About 30 MB.
#
#   scripts/device/pack.sh            then, on the device:  bash scripts/device/check.sh PART
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/env.sh
SHARED="${FABBRICA_SHARED:-$ROOT/../shared}"
for f in "$SHARED/device/env.sh" "$SHARED/anchors/torch_gpt_bench.py"; do
  [ -f "$f" ] || { echo "error: $f is missing; set FABBRICA_SHARED to the shared/ folder" >&2; exit 2; }
done
cargo build --release -q -p fabbrica-cli -p fabbrica-comm --bins
# A test binary's path, from cargo's own report (its name carries a hash): test_binary CRATE TEST.
test_binary() {
  local path
  path=$(cargo test --release -q -p "$1" --test "$2" --no-run --message-format=json |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2" | tail -n 1)
  [ -x "$path" ] || { echo "error: could not find the test binary $1 --test $2" >&2; exit 1; }
  echo "$path"
}
nccl_test=$(test_binary fabbrica-comm nccl)
foreach_test=$(test_binary fabbrica-torch-ext foreach)
precision_test=$(test_binary fabbrica-torch-ext precision)
rm -rf .device && mkdir -p .device/bin
strip -o .device/bin/fabbrica target/release/fabbrica
strip -o .device/bin/comm_selftest target/release/comm_selftest
strip -o .device/bin/nccl_test "$nccl_test"
strip -o .device/bin/foreach_test "$foreach_test"
strip -o .device/bin/precision_test "$precision_test"
cp "$SHARED/device/env.sh" "$SHARED/anchors/torch_gpt_bench.py" .device/
# The default corpus (git-ignored data/, made by setup from the venv's stdlib) for the CUDA runs.
[ -f data/pystdlib.txt ] || .venv/bin/python scripts/make_corpus.py --out data/pystdlib.txt
cp data/pystdlib.txt .device/
# The binaries' own libraries (libmpi, libfreetype, ...) and mpirun, for an image without them.
scripts/device/pack_mpi.sh .device target/release/fabbrica target/release/comm_selftest "$nccl_test" "$foreach_test" "$precision_test"
git describe --always --dirty > .device/commit
du -sh .device | sed 's/^/packed: /'
