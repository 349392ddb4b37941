"""The hardware to plan for, as `HardwareFacts`: `facts()` is the one builder (`ptlm plan`'s
flags, the run's and the probe's machine); `detect()` reads this machine's GPUs and host memory.

The only place in the planner that touches torch.cuda and psutil; everything downstream is pure.
With no CUDA GPU detect() returns gpus_per_node=0 and the planner asks for --gpu / --gpus
--gpu-memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ptlm.plan.facts import UNKNOWN_GPU, GpuSpec, HardwareFacts, lookup_gpu

CUSTOM_GPU_NAME = "custom GPU"  # a GPU known by its memory alone (figures of UNKNOWN_GPU)
CPU_DEVICE_NAME = "cpu"


def facts(spec: GpuSpec | None = None, gpus: int | None = None, gpu_memory: int | None = None,
          nodes: int = 1, host_memory: int | None = None, no_bf16: bool = False,
          cpu_bf16: Callable[[], bool] | None = None) -> HardwareFacts:
    """The hardware to plan for: GPU `spec` from the table, else a GPU of `gpu_memory` bytes
    with UNKNOWN_GPU's figures, else this machine's GPUs (detect()). `gpus` per node (default:
    1, or the detected count) on `nodes` nodes; `gpu_memory` also replaces a known or detected
    GPU's memory; `host_memory` per node (default: this machine's); `no_bf16`: the GPU has none.

    This machine without a GPU: with `cpu_bf16` its CPU ranks are the devices (a run on
    DeepSpeed's CPU accelerator: the host's memory split across the `gpus` local ranks, bf16 as
    cpu_bf16() says); without, gpus_per_node=0 (the planner asks which GPUs to plan for)."""
    if spec is None and gpu_memory:
        spec = replace(UNKNOWN_GPU, name=CUSTOM_GPU_NAME, memory_bytes=gpu_memory)
    if spec is not None:
        host = host_memory if host_memory is not None else host_memory_bytes()
        hw = HardwareFacts.from_spec(spec, gpus or 1, nodes, host)
    else:
        hw = detect()
        host = host_memory if host_memory is not None else hw.host_memory_bytes
        if hw.gpus_per_node == 0 and cpu_bf16 is not None:
            local = gpus or 1
            return HardwareFacts(gpu_name=CPU_DEVICE_NAME,
                                 gpu_memory_bytes=max((host or 0) // local, 1),
                                 gpus_per_node=local, nodes=nodes, host_memory_bytes=host or 0,
                                 bf16=cpu_bf16(), device_type="cpu")
        hw = replace(hw, nodes=nodes, host_memory_bytes=host)
        if gpus and hw.gpus_per_node:
            hw = replace(hw, gpus_per_node=gpus)
    if gpu_memory:
        hw = replace(hw, gpu_memory_bytes=gpu_memory)
    if no_bf16:
        hw = replace(hw, bf16=False)
    return hw


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
