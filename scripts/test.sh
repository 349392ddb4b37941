#!/usr/bin/env bash
# The test suite (CPU only; `gpu` and `slow` tests are skipped unless --run-gpu / --run-slow).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
