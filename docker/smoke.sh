#!/usr/bin/env bash
# The ptlm image's smoke test (docs/docker.md). Two ways to run it:
#
#   docker/smoke.sh [IMAGE]          on the host (default image ptlm:latest): starts the image as its
#                                    non-root user with fresh /data and /runs folders bind-mounted
#                                    (kept in PTLM_SMOKE_DIR, default a new temp folder), runs the
#                                    checks below inside it, then checks the files it left on the
#                                    host; --gpus all is added when the host has nvidia-smi
#                                    (PTLM_SMOKE_GPUS=all|none overrides)
#   docker run --rm --shm-size=1g -v ...:/data -v ...:/runs ptlm ptlm-smoke
#                                    inside the image (it is /usr/local/bin/ptlm-smoke there)
#
# Inside, in order (each prints "== name" then "ok: ..." or stops the script with "FAIL: ..."):
#   user      not root; /data and /runs writable
#   cli       ptlm --help, ptlm --version
#   versions  torch (its CUDA), deepspeed, bitsandbytes, transformers, Python
#   ops       CPU Adam as prebuilt for the CUDA accelerator loads from site-packages; the CPU
#             accelerator's CPU Adam and shared-memory collectives load from the image's build
#             cache without compiling (their .so files unchanged); one CPU Adam step
#   data      ptlm prepare the demo corpus into /data/smoke-64, ptlm inspect reads it back
#   demo      ptlm demo on DeepSpeed's CPU accelerator (no GPU used) writes its report to /runs
#   resume    2 CPU ranks (deepspeed --num_gpus 2) train on /data/smoke-64 into /runs; killed
#             (SIGKILL, the whole process group) after their first complete checkpoint; the same
#             command again resumes from it and finishes with a report
#   gpu       only when a GPU is visible (else skipped, saying so): nvidia-smi, a bf16 matmul,
#             and a ZeRO-2 + optimizer-offload run (prebuilt CPU Adam, NCCL) on the GPU(s)
# Knobs: PTLM_SMOKE_DEMO_EPOCHS (default 3), PTLM_SMOKE_SKIP="demo resume ..." (names above).
set -euo pipefail

IMAGE_DEFAULT="ptlm:latest"

say() { printf '%s\n' "$*"; }
section() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
skipped() { case " ${PTLM_SMOKE_SKIP:-} " in *" $1 "*) say "skipped ($1 in PTLM_SMOKE_SKIP)"; return 0 ;; esac; return 1; }

# ------------------------------------------------------------------------------------------------
# On the host: run this script inside the image.
# ------------------------------------------------------------------------------------------------
host_main() {
  local image="${1:-${PTLM_IMAGE:-$IMAGE_DEFAULT}}"
  local docker="${DOCKER:-docker}"
  local dir="${PTLM_SMOKE_DIR:-}"
  if [ -z "$dir" ]; then dir="$(mktemp -d "${TMPDIR:-/tmp}/ptlm-smoke.XXXXXX")"; fi
  mkdir -p "$dir/data" "$dir/runs"
  # The image runs as its user (UID 1000 unless built with another PTLM_UID): it must own the
  # bind-mounted folders (docs/docker.md, "Mounts and the UID").
  local uid
  uid="$("$docker" image inspect -f '{{.Config.User}}' "$image" | cut -d: -f1)"
  if [ "$(id -u)" = 0 ]; then
    chown -R "$uid:$uid" "$dir/data" "$dir/runs"
  elif [ "$(id -u)" != "$uid" ]; then
    chmod 0777 "$dir/data" "$dir/runs"
  fi
  local gpus=()
  case "${PTLM_SMOKE_GPUS:-auto}" in
    all) gpus=(--gpus all) ;;
    none) ;;
    auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpus=(--gpus all); fi ;;
    *) fail "PTLM_SMOKE_GPUS=${PTLM_SMOKE_GPUS}: all, none or auto" ;;
  esac
  say "[host] image $image, volumes in $dir, GPUs: ${gpus[*]:-none}"
  local start
  start=$(date +%s)
  # --shm-size: DeepSpeed's CPU collectives and PyTorch's data loading use /dev/shm (Docker's
  # default 64 MB is too small); GPU runs use --ipc=host (docs/docker.md).
  "$docker" run --rm --shm-size=1g "${gpus[@]}" \
    -e PTLM_SMOKE_SKIP -e PTLM_SMOKE_DEMO_EPOCHS \
    -v "$dir/data:/data" -v "$dir/runs:/runs" "$image" ptlm-smoke
  section "host: what the container left on the volumes"
  local f
  for f in runs/smoke-demo/run/report.md runs/smoke-resume/report.md data/smoke-64; do
    case " ${PTLM_SMOKE_SKIP:-} " in
      *" demo "*) [[ $f == runs/smoke-demo/* ]] && continue ;;
    esac
    case " ${PTLM_SMOKE_SKIP:-} " in
      *" resume "*) [[ $f == runs/smoke-resume/* ]] && continue ;;
    esac
    [ -e "$dir/$f" ] || fail "$dir/$f is missing"
    say "$(stat -c '%U(%u):%G(%g) %n' "$dir/$f")"
  done
  ok "smoke test passed in $(( $(date +%s) - start )) s"
}

# ------------------------------------------------------------------------------------------------
# Inside the image.
# ------------------------------------------------------------------------------------------------
py() { python - "$@"; }

check_user() {
  section "user"
  say "$(id)"
  [ "$(id -u)" != 0 ] || fail "running as root"
  local d
  for d in /data /runs; do
    touch "$d/.ptlm-smoke-write" && rm "$d/.ptlm-smoke-write" || fail "$d is not writable by $(id -un)"
  done
  ok "UID $(id -u) (not root) writes /data and /runs"
  local shm
  shm=$(df -k --output=size /dev/shm | tail -1 | tr -d ' ')
  if [ "$shm" -lt 524288 ]; then
    say "warning: /dev/shm is $((shm / 1024)) MB: give the container --shm-size=1g or --ipc=host"
  fi
}

check_cli() {
  section "cli"
  ptlm --help | head -4
  ptlm --help | grep -q "prepare" || fail "ptlm --help lists no prepare"
  ptlm --version
  ok "ptlm --help, ptlm --version"
}

check_versions() {
  section "versions"
  py <<'EOF'
import platform, sys
import torch, deepspeed, bitsandbytes, transformers
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}); GPUs visible: {torch.cuda.device_count()}")
print(f"deepspeed {deepspeed.__version__}; bitsandbytes {bitsandbytes.__version__}; "
      f"transformers {transformers.__version__}")
EOF
  ok "imports"
}

check_ops() {
  section "ops"
  # 1. CPU Adam installed (pip, DS_BUILD_CPU_ADAM=1) for the CUDA accelerator: GPU runs load it
  #    from site-packages (no GPU is needed to load it).
  DS_ACCELERATOR=cuda py <<'EOF'
import sysconfig, time
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import installed_ops, accelerator_name
t0 = time.perf_counter()
mod = get_accelerator().create_op_builder("CPUAdamBuilder").load(verbose=False)
site = sysconfig.get_paths()["purelib"]
print(f"installed ops: {sorted(k for k, v in installed_ops.items() if v)} for accelerator {accelerator_name!r}")
print(f"CUDA accelerator: cpu_adam from {mod.__file__} in {time.perf_counter() - t0:.2f} s")
assert mod.__file__.startswith(site), "cpu_adam was not the prebuilt one"
EOF
  # 2. The CPU accelerator's ops, built into this user's torch extensions cache when the image was
  #    built: loading them must not compile (no .so changes) and is quick.
  local cache="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
  local before after
  before=$(find "$cache" -name '*.so' -printf '%p %T@\n' 2>/dev/null | sort)
  [ -n "$before" ] || fail "no prebuilt CPU-accelerator ops in $cache"
  DS_ACCELERATOR=cpu py <<'EOF'
import time
import torch
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
assert acc.device_name() == "cpu", acc.device_name()
for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
    t0 = time.perf_counter()
    mod = acc.create_op_builder(name).load(verbose=False)
    dt = time.perf_counter() - t0
    print(f"CPU accelerator: {name} from {mod.__file__} in {dt:.2f} s")
    assert dt < 60, f"{name} took {dt:.0f} s to load: compiled?"
from deepspeed.ops.adam import DeepSpeedCPUAdam
p = torch.nn.Parameter(torch.ones(1000))
opt = DeepSpeedCPUAdam([p], lr=0.1, adamw_mode=True)
p.grad = torch.ones(1000)
opt.step()
assert torch.allclose(p.detach(), torch.full((1000,), 0.9)), p[:3]
print("DeepSpeedCPUAdam step: ok (1.0 -> 0.9)")
EOF
  after=$(find "$cache" -name '*.so' -printf '%p %T@\n' 2>/dev/null | sort)
  [ "$before" = "$after" ] || fail "the CPU ops in $cache were rebuilt"
  say "$(echo "$before" | awk '{print $1}' | sed "s|^$HOME|~|")"
  ok "prebuilt ops load without compiling"
}

DEMO_CORPUS() { python -c "import ptlm, pathlib; print(pathlib.Path(ptlm.__file__).parent / 'assets' / 'demo_corpus_pt.jsonl')"; }

check_data() {
  section "data"
  ptlm prepare "$(DEMO_CORPUS)" --train-tokenizer 1024 --seq-len 64 --out /data/smoke-64 \
    --overwrite --no-progress | tail -3
  ptlm inspect /data/smoke-64 | head -12
  ok "prepared /data/smoke-64 and read it back"
}

check_demo() {
  section "demo"
  skipped demo && return 0
  local epochs="${PTLM_SMOKE_DEMO_EPOCHS:-3}" t0
  t0=$(date +%s)
  # CUDA_VISIBLE_DEVICES="": the demo picks the GPU when one is visible; this is the CPU run.
  CUDA_VISIBLE_DEVICES="" ptlm demo --out /runs/smoke-demo --epochs "$epochs" > /runs/smoke-demo.log 2>&1 \
    || { tail -40 /runs/smoke-demo.log; fail "ptlm demo failed (log: /runs/smoke-demo.log)"; }
  tr '\r' '\n' < /runs/smoke-demo.log | grep -E "^=== |^\| |eval \(|demo finished" | grep -v "^train:" \
    | sed 's/^\[[0-9:]* rank [0-9/]* INFO [a-z._]*\] //' | tail -14
  [ -s /runs/smoke-demo/run/report.md ] || fail "no /runs/smoke-demo/run/report.md"
  ok "ptlm demo (CPU, $epochs epochs) in $(( $(date +%s) - t0 )) s; report /runs/smoke-demo/run/report.md"
}

write_tiny_model() {
  py "$1" <<'EOF'
import sys
from transformers import OPTConfig
OPTConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
          max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0,
          attention_dropout=0.0).save_pretrained(sys.argv[1])
EOF
}

check_resume() {
  section "resume"
  skipped resume && return 0
  [ -f /data/smoke-64/manifest.json ] || [ -d /data/smoke-64 ] || fail "no /data/smoke-64 (data step)"
  write_tiny_model /runs/smoke-model
  rm -rf /runs/smoke-resume
  local cmd=(deepspeed --num_gpus 2 --master_port 29517 launch/train.py --model /runs/smoke-model
             --from-scratch --data data/smoke-64 --out runs/smoke-resume --epochs 4
             --global-batch 8 --lr 3e-3 --seed 0 --save-every 3 --keep-last 2 --log-every 5)
  say "\$ DS_ACCELERATOR=cpu ${cmd[*]}"
  # Its own process group (setsid), so that one kill reaches the launcher and both ranks.
  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 setsid "${cmd[@]}" > /runs/smoke-resume-1.log 2>&1 &
  local pid=$! waited=0
  until compgen -G "/runs/smoke-resume/checkpoints/step*/ptlm_complete.json" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || { tail -30 /runs/smoke-resume-1.log; fail "the run ended before its first checkpoint"; }
    [ "$waited" -lt 600 ] || { kill -KILL -- "-$pid"; fail "no checkpoint after 600 s"; }
    sleep 1; waited=$((waited + 1))
  done
  kill -KILL -- "-$pid"
  wait "$pid" 2>/dev/null || true
  local last
  last=$(find /runs/smoke-resume/checkpoints -name ptlm_complete.json | sort | tail -1)
  say "killed (SIGKILL, launcher and ranks) after ${waited} s, at ${last%/ptlm_complete.json}"
  [ ! -e /runs/smoke-resume/report.md ] || fail "the run had finished before the kill: nothing to resume"
  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 "${cmd[@]}" > /runs/smoke-resume-2.log 2>&1 \
    || { tail -40 /runs/smoke-resume-2.log; fail "the resumed run failed"; }
  grep -h "resumed from" /runs/smoke-resume-2.log | head -2 | sed 's/^.*\] //' | cut -c1-200
  grep -q "resumed from" /runs/smoke-resume-2.log || fail "the second run did not resume"
  grep -h "^done: " /runs/smoke-resume-2.log | tail -1
  [ -s /runs/smoke-resume/report.md ] || fail "no report after the resumed run"
  ok "2 CPU ranks killed after a checkpoint, resumed, finished (logs /runs/smoke-resume-{1,2}.log)"
}

check_gpu() {
  section "gpu"
  local n
  n=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "$n" = 0 ]; then
    say "skipped: no GPU visible (docker run --gpus all on a host with the NVIDIA Container Toolkit)"
    return 0
  fi
  skipped gpu && return 0
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
  py <<'EOF'
import torch
from deepspeed.accelerator import get_accelerator
print("DeepSpeed accelerator:", get_accelerator().device_name(), "| GPU 0:", torch.cuda.get_device_name(0),
      "| capability", torch.cuda.get_device_capability(0))
a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
torch.testing.assert_close((a @ a).float(), a.float() @ a.float(), rtol=5e-2, atol=5e-1)
print("bf16 matmul on the GPU: ok")
EOF
  write_tiny_model /runs/smoke-model
  rm -rf /runs/smoke-gpu
  local cmd=(deepspeed --num_gpus "$n" --master_port 29518 launch/train.py --model /runs/smoke-model
             --from-scratch --data data/smoke-64 --out runs/smoke-gpu --max-steps 20 --global-batch 8
             --lr 3e-3 --zero 2 --offload optimizer --log-every 5)
  say "\$ ${cmd[*]}"
  "${cmd[@]}" > /runs/smoke-gpu.log 2>&1 || { tail -40 /runs/smoke-gpu.log; fail "GPU run failed"; }
  if grep -q "Building extension module cpu_adam" /runs/smoke-gpu.log; then
    fail "the GPU run compiled CPU Adam (the prebuilt op was not used)"
  fi
  [ -s /runs/smoke-gpu/report.md ] || fail "no report of the GPU run"
  ok "ZeRO-2 + optimizer offload on $n GPU(s) (log /runs/smoke-gpu.log)"
}

image_main() {
  local t0
  t0=$(date +%s)
  say "ptlm smoke test in the image, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  cd /workspace
  check_user
  check_cli
  check_versions
  check_ops
  check_data
  check_demo
  check_resume
  check_gpu
  printf '\n'
  ok "all smoke checks passed in $(( $(date +%s) - t0 )) s"
}

if [ "${PTLM_IN_IMAGE:-}" = 1 ]; then
  image_main "$@"
else
  host_main "$@"
fi
