#!/usr/bin/env bash
# The main job on the built-in default: prepare -> plan -> train -> report on the shipped sample.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec ptlm demo "$@"
