"""`detect()`: this machine's GPUs and host memory as `HardwareFacts`.

The only place in the planner that touches torch.cuda and psutil; everything downstream is pure.
With no CUDA GPU it returns gpus_per_node=0 and the planner asks for --gpu / --gpus --gpu-memory.
"""

from __future__ import annotations

from ptlm.plan.facts import UNKNOWN_GPU, HardwareFacts, lookup_gpu


def host_memory_bytes() -> int | None:
    try:
        import psutil
    except ImportError:  # psutil is a dependency, but a missing host figure only skips host checks
        return None
    return int(psutil.virtual_memory().total)


def detect() -> HardwareFacts:
    host = host_memory_bytes()
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no usable GPU" here
        count = 0
    if count == 0:
        return HardwareFacts(gpu_name="none", gpu_memory_bytes=0, gpus_per_node=0,
                             host_memory_bytes=host, bf16=False)
    props = torch.cuda.get_device_properties(0)
    spec = lookup_gpu(props.name, props.total_memory) or UNKNOWN_GPU
    hw = HardwareFacts.from_spec(spec, gpus_per_node=count, host_memory_bytes=host)
    # The device's own figures win over the table's (memory differs by driver / MIG slice).
    return HardwareFacts(**{**hw.to_dict(), "gpu_name": props.name,
                            "gpu_memory_bytes": int(props.total_memory),
                            "bf16": bool(torch.cuda.is_bf16_supported())})
