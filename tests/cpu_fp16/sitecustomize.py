"""Test processes only (on PYTHONPATH when PTLM_TEST_CPU_FP16=1): a CPU that DeepSpeed's CPU
accelerator calls fp16-capable. DeepSpeed refuses fp16 on a CPU without oneDNN fp16 kernels
(torch.ops.mkldnn._is_mkldnn_fp16_supported()), although torch computes fp16 on any CPU (more
slowly); the setting matrix uses this to train ptlm's fp16 path (loss scaling, overflow checks,
16-bit export) on such a host. Nothing in ptlm reads it."""

import os

if os.environ.get("PTLM_TEST_CPU_FP16") == "1":
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True


# PTLM_TEST_INF_GRAD=STEP[,STEP...] (tests/test_fp16_overflow.py): rank 0 puts one inf into one
# gradient in the last backward of each optimizer step named (as an fp16 overflow would). Hooked on
# a parameter's gradient, so every reduction and overflow check DeepSpeed does sees it.
if os.environ.get("PTLM_TEST_INF_GRAD") and os.environ.get("RANK", "0") == "0":
    from deepspeed.runtime.engine import DeepSpeedEngine

    _inf_steps = {int(s) for s in os.environ["PTLM_TEST_INF_GRAD"].split(",")}
    _backward = DeepSpeedEngine.backward
    _fired = set()

    def _backward_with_inf(self, loss, *args, **kwargs):
        step = self.global_steps + 1  # DeepSpeed counts skipped steps too
        if step not in _inf_steps or step in _fired or not self.is_gradient_accumulation_boundary():
            return _backward(self, loss, *args, **kwargs)

        def poison(grad):
            _fired.add(step)
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
            return grad

        param = next(p for p in self.module.parameters() if p.requires_grad)
        handle = param.register_hook(poison)
        try:
            return _backward(self, loss, *args, **kwargs)
        finally:
            handle.remove()

    DeepSpeedEngine.backward = _backward_with_inf


# PTLM_TEST_BREAK_LOSS_SCALE=1 (tests/test_gpu_check.py): the fp16 ZeRO-0 step as it was before
# the loss-scale fix: ptlm no longer scales the loss, so with DeepSpeed 0.19 the gradients reach
# the optimizer 65,536x too small. The GPU check's rehearsal must then fail.
if os.environ.get("PTLM_TEST_BREAK_LOSS_SCALE") == "1":
    import ptlm.run.engine

    ptlm.run.engine._scale_loss_once = lambda engine: None


# PTLM_TEST_SPAWN_CHILD=DIR (tests/test_matrix.py): the process starts a long-lived child, as a
# rank's JIT op build starts compilers, and names it in DIR: a harness that kills the rank on a
# timeout must take it too.
if os.environ.get("PTLM_TEST_SPAWN_CHILD"):
    import subprocess

    _child = subprocess.Popen(["sleep", "600"])
    open(os.path.join(os.environ["PTLM_TEST_SPAWN_CHILD"], str(_child.pid)), "w").close()
    # ...and stays busy as long as asked (PTLM_TEST_HOLD_S), so that the harness's timeout, not
    # the speed of the machine, decides whether it is killed (a tiny run can finish in 8 s)
    import time

    time.sleep(float(os.environ.get("PTLM_TEST_HOLD_S", "0")))
