"""Test processes only (on PYTHONPATH when PTLM_TEST_CPU_FP16=1): a CPU that DeepSpeed's CPU
accelerator calls fp16-capable. DeepSpeed refuses fp16 on a CPU without oneDNN fp16 kernels
(torch.ops.mkldnn._is_mkldnn_fp16_supported()), although torch computes fp16 on any CPU (more
slowly); the setting matrix uses this to train ptlm's fp16 path (loss scaling, overflow checks,
16-bit export) on such a host. Nothing in ptlm reads it."""

import os

if os.environ.get("PTLM_TEST_CPU_FP16") == "1":
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True
