#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: same setup as quickstart.sh, then every test
# of the workspace (release profile: the tests run real training steps).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source scripts/env.sh
cargo test --release --workspace "$@"
