"""The one precision decision of a run: the dtype weights are loaded in, and how the Trainer computes.

| device                      | default (`bf16` unset)                     | `bf16: false` | `pure_bf16: true` |
| --------------------------- | ------------------------------------------ | ------------- | ----------------- |
| GPU with bfloat16           | bf16 autocast; trained weights float32 (1) | float32       | all bfloat16 (2)  |
| GPU without bfloat16        | fp16 autocast, float32 weights             | float32       | refused           |
| CPU with avx512_bf16 or AMX | bf16 autocast, float32 weights (3)         | float32       | all bfloat16      |
| CPU without                 | float32 (bf16 is emulated there, slower)   | float32       | all bfloat16 (4)  |

1. Full fine-tuning keeps float32 master weights, gradients and Adam state (mixed precision, as the README says);
   LoRA and QLoRA load the frozen base in bfloat16 (peft keeps the adapters in float32); freeze loads it in
   bfloat16 and the trained layers are upcast to float32 (`upcast_trainable`).
2. LLaMA-Factory's `pure_bf16`: weights, gradients and optimizer state all in bfloat16 (half the memory of
   mixed precision, less exact updates). The explicit opt-in, never a default.
3. On a CPU with avx512_bf16 a bf16 matmul runs ~4x faster than float32 (881 against 205 GFLOP/s at 2048x2048),
   and Trainer's CPU autocast took SmolLM2 LoRA steps from 6.34 to 2.95 s with the loss 1.6407 against 1.6382
   (issue 10's measurements). Here, `bench.allocator --layers 6 --precisions fp32,autocast` (tcmalloc): 0.35x
   the CPU time per step, the same loss to 4 decimals, peak +2%; bench/precision.py compares the identity run's
   loss curves. Weights stay float32:
   the frozen base too, as Trainer's own CPU autocast keeps it (a bfloat16 base on a CPU is not measured yet).
4. `bf16: true` (or `pure_bf16`) on a CPU without native bfloat16 is obeyed with a note that it will be slower.

The decision takes a `ComputeDevice` (what the machine can do) so that every branch is testable without the
hardware; `detect_device()` describes the machine the run is on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from tunesmith.errors import ConfigError

CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 matmuls


@dataclass(frozen=True)
class ComputeDevice:
    """What the precision depends on: the device type and whether it computes bfloat16 natively."""

    type: Literal["cpu", "cuda"]
    bf16: bool
    bf16_feature: str | None = None  # what says so: a CPU flag (avx512_bf16, amx_bf16) or the GPU's name


@dataclass(frozen=True)
class Precision:
    """How weights are stored (`dtype`), how the Trainer computes (`bf16`/`fp16` autocast) and what to print."""

    dtype: torch.dtype
    bf16: bool
    fp16: bool
    upcast_trainable: bool = False  # trained parameters to float32 after the method is applied (freeze)
    description: str = ""  # one line said at start
    note: str | None = None  # something the user asked for that runs differently, or slower, than they may expect

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls and attention run in: autocast's, else the weights'."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else self.dtype

    @property
    def pure_bf16(self) -> bool:
        return self.dtype == torch.bfloat16 and not self.upcast_trainable


def detect_device() -> ComputeDevice:
    if torch.cuda.is_available():
        return ComputeDevice("cuda", torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
    feature = cpu_bf16_feature()
    return ComputeDevice("cpu", feature is not None, feature)


def cpu_bf16_feature(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU flag that makes bfloat16 matmuls native (avx512_bf16 or AMX), or None."""
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: torch's own check of the same flag
        return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return next((feature for feature in CPU_BF16_FEATURES if feature in flags), None)


def choose_precision(
    bf16: bool | None = None,
    fp16: bool = False,
    pure_bf16: bool = False,
    finetuning_type: str = "lora",
    device: ComputeDevice | None = None,
) -> Precision:
    """The run's precision from the `bf16`/`fp16`/`pure_bf16` keys (`bf16: None` = choose) and the device."""
    device = device or detect_device()
    if pure_bf16:
        return _pure_bf16(device)
    if fp16 and device.type == "cuda":
        return Precision(torch.float32, bf16=False, fp16=True, description="fp16 autocast, float32 weights")
    if fp16:  # float16 autocast on a CPU is emulated: the CPU's best instead, said once
        chosen = _cpu_mixed(device, asked=False)
        return replace(chosen, note=f"fp16: true is a GPU setting; this CPU runs {chosen.description}")
    if bf16 is False:
        return Precision(torch.float32, bf16=False, fp16=False, description="float32 (bf16: false)")
    if device.type == "cuda":
        return _gpu_mixed(device, finetuning_type, asked=bf16 is True)
    return _cpu_mixed(device, asked=bf16 is True)


def _pure_bf16(device: ComputeDevice) -> Precision:
    if device.type == "cuda" and not device.bf16:
        raise ConfigError(f"pure_bf16: true needs a GPU with bfloat16; {device.bf16_feature or 'this GPU'} has none")
    note = None
    if not device.bf16:
        note = "pure_bf16 on a CPU without avx512_bf16 or AMX: bfloat16 is emulated there, slower than float32"
    description = "pure bf16: weights, gradients and optimizer state in bfloat16 (pure_bf16: true)"
    return Precision(torch.bfloat16, bf16=True, fp16=False, description=description, note=note)


def _gpu_mixed(device: ComputeDevice, finetuning_type: str, asked: bool) -> Precision:
    if not device.bf16:
        description = "fp16 autocast, float32 weights"
        note = f"{device.bf16_feature or 'this GPU'} has no bfloat16, so fp16 mixed precision is used"
        return Precision(torch.float32, bf16=False, fp16=True, description=description, note=note if asked else None)
    if finetuning_type == "full":
        description = "bf16 autocast; float32 master weights, gradients and optimizer state"
        return Precision(torch.float32, bf16=True, fp16=False, description=description)
    trained = "adapters" if finetuning_type == "lora" else "trained layers"
    return Precision(
        torch.bfloat16,
        bf16=True,
        fp16=False,
        upcast_trainable=finetuning_type == "freeze",
        description=f"bf16 autocast; frozen weights in bfloat16, {trained} in float32",
    )


def _cpu_mixed(device: ComputeDevice, asked: bool) -> Precision:
    if device.bf16:
        description = f"bf16 autocast, float32 weights (this CPU has {device.bf16_feature}; bf16: false for float32)"
        return Precision(torch.float32, bf16=True, fp16=False, description=description)
    if asked:
        note = "bf16: true on a CPU without avx512_bf16 or AMX: bfloat16 is emulated there, slower than float32"
        return Precision(torch.float32, bf16=True, fp16=False, description="bf16 autocast, float32 weights", note=note)
    return Precision(torch.float32, bf16=False, fp16=False, description="float32 (this CPU has no avx512_bf16 or AMX)")


def upcast_trainable_parameters(model: torch.nn.Module) -> int:
    """Trained parameters to float32 (master weights); returns how many tensors were cast."""
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast
