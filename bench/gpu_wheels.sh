#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on the device machine, made HERE (it has pip and PyPI; the
# device has neither network nor DeepSpeed/bitsandbytes, but has torch, transformers, accelerate,
# pyarrow and tokenizers, which must stay as they are) into a git-ignored folder that travels with
# the device call (`carry`, 64 MiB per call with the working tree).
#
#   bash bench/gpu_wheels.sh            # -> .gpu_wheels/ (about 16 MiB)
#   bash bench/gpu_wheels.sh DIR        # elsewhere
#
# Then, on the device (one call; docs/benchmarks.md, "GPU check"):
#   python3 bench/gpu_check.py --wheels .gpu_wheels --out "$OUT"
# which installs the wheels the image lacks with `pip install --no-index --no-deps --target` (torch
# is never replaced) and puts that folder on the children's PYTHONPATH.
#
# What goes in:
#   deepspeed      built here from its sdist (pinned in constraints.txt), no ops compiled
#                  (DS_BUILD_OPS=0: CPU Adam etc. are JIT-built on the device, which has nvcc and
#                  ninja), accelerator "cuda" recorded
#   bitsandbytes   the PyPI manylinux x86_64 wheel (pinned in constraints.txt), slimmed to the CUDA
#                  builds named in BNB_CUDA (default 128 130 132: the image's torch is cu130) and
#                  the CPU one: the full wheel (43 MB) would crowd the 64 MiB out
#   pydantic, pydantic-core, annotated-types, typing-inspection, hjson, typing-extensions,
#   einops, msgpack, py-cpuinfo
#                  DeepSpeed's needs that the image may lack, at the versions installed here
#                  (gpu_check.py installs each only where the image has none or an older one):
#                  `import deepspeed` with ptlm's engine imports einops and msgpack, and CPU Adam
#                  (the offload rows) imports cpuinfo; torch and transformers are the image's own
#                  (2.11 and 5.17 on the lent machines; gpu_check prints which ran)
# The device's Python is 3.12 (GPU_PYTHON_VERSION to change it), x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYVER=${GPU_PYTHON_VERSION:-3.12}
BNB_CUDA=${BNB_CUDA:-"128 130 132"}
LIMIT_MIB=${LIMIT_MIB:-48}  # leave room for the working tree in the 64 MiB a call carries

pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" constraints.txt | head -1; }
here() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DS=$(pin deepspeed)
BNB=$(pin bitsandbytes)
[ -n "$DS" ] && [ -n "$BNB" ] || { echo "deepspeed/bitsandbytes not pinned in constraints.txt" >&2; exit 1; }

rm -rf "$DEST"
mkdir -p "$DEST"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "deepspeed==$DS: building the wheel from its sdist (DS_BUILD_OPS=0, DS_ACCELERATOR=cuda)"
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-binary deepspeed \
    --no-build-isolation --no-cache-dir -w "$DEST" "deepspeed==$DS" 2>&1 | grep -v '^WARNING: Location' || true
ls "$DEST"/deepspeed-"$DS"-*.whl >/dev/null

EXTRA=(pydantic pydantic_core annotated_types typing_inspection hjson typing_extensions einops msgpack
       py_cpuinfo)
SPECS=("bitsandbytes==$BNB")
for p in "${EXTRA[@]}"; do SPECS+=("$p==$(here "$p")"); done
echo "downloading for cp${PYVER/./} manylinux x86_64: ${SPECS[*]}"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${SPECS[@]}" 2>&1 | grep -v '^WARNING: Location' || true

echo "slimming bitsandbytes to CUDA ${BNB_CUDA} + CPU"
"$PY" - "$DEST" "$BNB_CUDA" <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path

dest, keep = Path(sys.argv[1]), {f"libbitsandbytes_cuda{v}.so" for v in sys.argv[2].split()}
keep.add("libbitsandbytes_cpu.so")
(whl,) = dest.glob("bitsandbytes-*.whl")
tmp = whl.with_suffix(".tmp")
with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    names = [n for n in src.namelist()
             if not re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", n) or n.split("/")[-1] in keep]
    missing = keep - {n.split("/")[-1] for n in names}
    if missing:
        sys.exit(f"bitsandbytes wheel lacks {sorted(missing)}")
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    rows = []
    for n in names:
        if n == record:
            continue
        data = src.read(n)
        out.writestr(src.getinfo(n), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{n},sha256={digest},{len(data)}")
    rows.append(f"{record},,")
    out.writestr(src.getinfo(record), "\n".join(rows) + "\n")
tmp.replace(whl)
print(f"  kept {sorted(keep)}")
EOF

ls -l "$DEST"
SIZE=$(du -sk "$DEST" | cut -f1)
echo "total: $((SIZE / 1024)) MiB in $DEST (limit ${LIMIT_MIB} MiB)"
if [ "$SIZE" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "too large to travel with the working tree: lower BNB_CUDA or split the call" >&2
    exit 1
fi
