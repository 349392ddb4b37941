#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) and activate it.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (fast when up to date).
# Versions come from constraints.txt, the one place where the environment is pinned.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PTLM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[ptlm] creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.ptlm-installed"
WANT="$(cat "$ROOT/constraints.txt" "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[ptlm] installing ptlm and its dependencies (constraints.txt)" >&2
  python -m pip install -q --upgrade pip
  # torch first: deepspeed's setup imports it.
  python -m pip install -q -c "$ROOT/constraints.txt" torch
  python -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev,plots,bench]"
  # Build the DeepSpeed ops ptlm uses (CPU Adam; on CPU also the shared-memory collectives) now,
  # not in the first run (minutes on a small machine, and a run killed meanwhile left a lock that
  # hung the next ones: see ptlm/run/machine/oplocks.py). PTLM_PREBUILD_OPS=0 skips; a failure here only
  # warns (the op is then built on first use). The image (docker/Dockerfile) builds them with
  # DS_BUILD_CPU_ADAM/DS_BUILD_FUSED_ADAM at install instead.
  if [ "${PTLM_PREBUILD_OPS:-1}" != "0" ]; then
    echo "[ptlm] building DeepSpeed ops (PTLM_PREBUILD_OPS=0 skips)" >&2
    python -m ptlm.run.machine.prebuild >&2 || echo "[ptlm] warning: DeepSpeed ops not prebuilt; they are built on first use" >&2
  fi
  echo "$WANT" > "$STAMP"
fi
