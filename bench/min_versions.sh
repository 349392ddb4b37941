#!/usr/bin/env bash
# The declared minimum versions, tested: the core tests run with the lower bound that setup.cfg
# states for each package listed in MIN_PACKAGES (default: transformers), everything else as
# constraints.txt pins it. Run it whenever setup.cfg's bounds change (docs/benchmarks.md,
# "Versions"); tests/test_min_versions.py runs it under --run-slow.
#
#   bash bench/min_versions.sh                 # -> prints the versions that ran, then pytest's tail
#   MIN_PACKAGES="transformers tokenizers" bash bench/min_versions.sh
#   MIN_SPECS="transformers==5.0.0" bash bench/min_versions.sh   # try a candidate bound
#
# How: the minimums are installed with pip, with what they need (constraints.txt's pins
# otherwise), into a scratch folder; a scratch virtual environment reads that
# folder first and then this project's .venv (a .pth file), so the tests' own child processes
# (sys.executable: the DeepSpeed ranks) see the same versions. torch is not in MIN_PACKAGES: its
# CPU wheels come from PyTorch's own index, not reachable here, so setup.cfg states the tested
# version as its minimum instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${PYTHON:-.venv/bin/python}
MIN_PACKAGES=${MIN_PACKAGES:-transformers}
TESTS=${MIN_TESTS:-"tests/test_model.py tests/test_model_config.py tests/test_loss.py
  tests/test_architecture.py tests/test_engine.py::test_fp16_zero0_gradients_carry_the_loss_scale_once
  tests/test_matrix.py::test_matrix_pairwise"}
WORK=$(mktemp -d /tmp/ptlm-min-versions.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

SPECS=()
[ -z "${MIN_SPECS:-}" ] || { read -r -a SPECS <<< "$MIN_SPECS"; MIN_PACKAGES=""; }
for p in $MIN_PACKAGES; do
  low=$("$VENV_PY" - "$p" <<'EOF'
import configparser, sys
from packaging.requirements import Requirement
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
for line in cfg.get("options", "install_requires").splitlines():
    if line.strip():
        req = Requirement(line.strip())
        if req.name == sys.argv[1]:
            lows = [s.version for s in req.specifier if s.operator == ">="]
            print(lows[0] if lows else "")
EOF
)
  [ -n "$low" ] || { echo "setup.cfg states no lower bound for $p" >&2; exit 1; }
  SPECS+=("$p==$low")
done
echo "[min_versions] installing ${SPECS[*]} into $WORK/min"
# with their dependencies at the versions they need (transformers 5.17 wants huggingface_hub 1.x
# and httpx), everything constraints.txt pins kept at its pin, except the packages under test
NAMES=$(printf '%s\n' "${SPECS[@]}" | sed 's/[<>=!~].*//' | paste -sd'|')
grep -v -i -E "^(${NAMES}|huggingface.hub)==" constraints.txt > "$WORK/constraints.txt"
if ! "$VENV_PY" -m pip install -q --target "$WORK/min" -c "$WORK/constraints.txt" "${SPECS[@]}" \
    > "$WORK/pip.log" 2>&1; then
  grep -v '^WARNING: Location' "$WORK/pip.log" >&2
  echo "[min_versions] ${SPECS[*]} cannot be installed beside constraints.txt's pins" >&2
  exit 2
fi

"$VENV_PY" -m venv --without-pip "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
HERE=$("$VENV_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# the minimums first; then the .venv as a site dir, so that its own .pth files (ptlm's editable
# install) are read too
printf '%s\nimport site; site.addsitedir(%s)\n' "$WORK/min" "'$HERE'" > "$SITE/ptlm-min-versions.pth"
PY="$WORK/venv/bin/python"
"$PY" - <<'EOF'
import importlib.metadata as md
print("[min_versions] versions that ran: " + ", ".join(
    f"{p} {md.version(p)}" for p in ("torch", "transformers", "deepspeed", "tokenizers",
                                     "huggingface_hub", "safetensors", "accelerate")))
EOF
# TORCH_EXTENSIONS_DIR: DeepSpeed's JIT ops are keyed by the Python version only; this scratch
# interpreter would rebuild the .venv's in place (and wait on other sessions' locks)
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
cp -a "${HOME}/.cache/torch_extensions/." "$TORCH_EXTENSIONS_DIR/" 2>/dev/null || true  # -a: mtimes kept, no rebuild
find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null || true  # another build's, not ours
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider $TESTS
