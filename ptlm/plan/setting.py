"""The training setting: the knobs the planner chooses and every tool can force.

One vocabulary across `ptlm plan`, `ptlm probe` and `launch/train.py`: the CLI flags are the
field names (`--precision`, `--zero`, `--offload`, `--checkpointing`, `--optimizer`,
`--chunked-loss`, `--micro-batch`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ptlm.errors import PtlmError

PRECISIONS = ("bf16", "fp16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "optimizer", "parameters")  # "parameters" offloads optimizer states too
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class Setting:
    precision: str = "bf16"
    zero: int = 0
    offload: str = "none"
    checkpointing: bool = False
    optimizer: str = "adamw"
    chunked_loss: bool = True
    micro_batch: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PtlmError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.zero not in ZERO_STAGES:
            raise PtlmError(f"ZeRO stage {self.zero!r} is not one of {ZERO_STAGES}")
        if self.offload not in OFFLOADS:
            raise PtlmError(f"offload {self.offload!r} is not one of {OFFLOADS}")
        if self.optimizer not in OPTIMIZERS:
            raise PtlmError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.micro_batch < 1:
            raise PtlmError(f"micro-batch must be >= 1, got {self.micro_batch}")
        if self.offload == "optimizer" and self.zero == 0:
            raise PtlmError("optimizer offload needs ZeRO stage 1, 2 or 3 (use --zero 2)")
        if self.offload == "parameters" and self.zero != 3:
            raise PtlmError("parameter offload needs ZeRO stage 3 (use --zero 3)")
        if self.optimizer == "adamw8bit" and self.zero == 3:
            raise PtlmError(
                "adamw8bit with ZeRO-3 is refused: ZeRO-3 shards bitsandbytes' 8-bit states and "
                "quantization maps, which breaks saving/restoring them (DeepSpeed PR #1582, "
                "axolotl #1240). Use --zero 2 with adamw8bit, or --optimizer adamw with ZeRO-3.")
        if self.optimizer == "adamw8bit" and self.offload != "none":
            raise PtlmError(
                "adamw8bit with CPU offload is refused: offload runs DeepSpeed's CPU Adam on fp32 "
                "states in host memory, so 8-bit states buy nothing there. Use --offload none "
                "with adamw8bit, or --optimizer adamw with offload.")

    def with_(self, **changes) -> "Setting":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [self.precision, f"ZeRO-{self.zero}"]
        if self.offload != "none":
            parts.append(f"{self.offload} offload")
        parts.append("checkpointing" if self.checkpointing else "no checkpointing")
        parts.append(self.optimizer)
        parts.append("chunked loss" if self.chunked_loss else "full logits")
        parts.append(f"micro-batch {self.micro_batch}")
        return ", ".join(parts)


# The plain Hugging Face recipe, for side-by-side figures.
PLAIN_HF = Setting(precision="fp32", zero=0, offload="none", checkpointing=False,
                   optimizer="adamw", chunked_loss=False, micro_batch=1)
