"""`tunesmith env [--check]`: everything a bug report needs, as a Markdown table to paste into an issue.

Without `--check` nothing runs on a device: versions, the torch build, the GPUs as torch sees them. `--check` adds a
one-second smoke test per device (a bf16 matmul compared with float32, an all-reduce across the visible GPUs) and says,
for this machine, whether QLoRA, FlashAttention-2, Liger, Unsloth and DeepSpeed's ops will work and why not.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import os
import platform
import time
from collections.abc import Callable

from tunesmith import __version__

# distribution name → how the table names it
LIBRARIES = {
    "transformers": "transformers",
    "peft": "peft",
    "trl": "trl",
    "accelerate": "accelerate",
    "datasets": "datasets",
    "deepspeed": "deepspeed",
    "bitsandbytes": "bitsandbytes",
    "flash-attn": "flash-attn",
    "liger-kernel": "liger-kernel",
    "unsloth": "unsloth",
    "vllm": "vllm",
}
SMOKE_SECONDS = 1.0  # each device's matmul loop stops after this long


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        action="store_true",
        help="also run a one-second smoke test per device and say which features will work here",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    rows = environment_rows(torch)
    if args.check:
        rows += smoke_rows(torch)
        rows += feature_rows(torch)
    print(markdown_table(rows))
    return 0


def markdown_table(rows: list[tuple[str, str]]) -> str:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in rows]
    return "\n".join(lines)


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_rows(torch) -> list[tuple[str, str]]:
    rows = [
        ("tunesmith", __version__),
        ("Python", f"{platform.python_version()} ({platform.platform()})"),
        ("torch", f"{torch.__version__} ({torch_build(torch)})"),
        ("CPU", f"{os.cpu_count()} cores, {platform.machine()}, bf16 {cpu_bf16()}"),
    ]
    rows += [(f"GPU {index}", description) for index, description in enumerate(gpu_descriptions(torch))] or [
        ("GPUs", "none visible (training runs on the CPU)")
    ]
    rows.append(("NCCL", nccl_version(torch)))
    rows += [(name, version_of(distribution)) for distribution, name in LIBRARIES.items()]
    return rows


def cpu_bf16() -> str:
    from tunesmith.model.precision import cpu_bf16_feature

    feature = cpu_bf16_feature()
    return f"native ({feature})" if feature else "emulated (slower than float32)"


def torch_build(torch) -> str:
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda} build"
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip} build"
    if torch.backends.mps.is_built():
        return f"MPS build, MPS {'available' if torch.backends.mps.is_available() else 'not available'}"
    return "CPU-only build"


def gpu_descriptions(torch) -> list[str]:
    if not torch.cuda.is_available():
        return []
    descriptions = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        bf16 = props.major >= 8 or bool(getattr(torch.version, "hip", None))  # Ampere+; ROCm GPUs torch runs have it
        descriptions.append(
            f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}, "
            f"bf16 {'yes' if bf16 else 'no'}"
        )
    return descriptions


def nccl_version(torch) -> str:
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        return "not available (this torch build has no NCCL; several processes use gloo)"
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


# --check: smoke tests


def smoke_rows(torch) -> list[tuple[str, str]]:
    devices = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    rows = [(f"bf16 matmul on {device}", bf16_matmul_check(torch, device)) for device in devices]
    rows.append(("all-reduce", all_reduce_check(torch)))
    return rows


def bf16_matmul_check(torch, device: str) -> str:
    """Repeated 1024x1024 bf16 matmuls for about a second: the speed, and the error against float32."""
    size = 1024
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    reference = a @ b
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    product, count, start = a16 @ b16, 0, time.perf_counter()
    while time.perf_counter() - start < SMOKE_SECONDS:
        product = a16 @ b16
        count += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    relative_error = ((product.float() - reference).norm() / reference.norm()).item()
    verdict = "ok" if relative_error < 2e-2 else f"WRONG (relative error {relative_error:.2g} against float32)"
    return f"{verdict}, {2 * size**3 * count / seconds / 1e9:.0f} GFLOP/s, relative error {relative_error:.1e}"


def all_reduce_check(torch) -> str:
    count = torch.cuda.device_count()
    if count >= 2:
        if not torch.distributed.is_nccl_available():
            return f"{count} GPUs but no NCCL in this torch build: multi-GPU training cannot run"
        tensors = [torch.full((1024,), float(index + 1), device=f"cuda:{index}") for index in range(count)]
        torch.cuda.nccl.all_reduce(tensors)
        expected = count * (count + 1) / 2
        sums = [tensor[0].item() for tensor in tensors]
        ok = all(value == expected for value in sums)
        return f"{'ok' if ok else 'WRONG'}: NCCL across {count} GPUs gave {sums[0]:g} on GPU 0 (expected {expected:g})"
    return gloo_check(torch) + (" (one GPU: nothing to reduce across GPUs)" if count == 1 else "")


def gloo_check(torch) -> str:
    """A one-process gloo group: what several CPU processes (nproc_per_node on a CPU) talk through."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "gloo not available in this torch build: several CPU processes cannot train together"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tensor = torch.ones(4)
        dist.all_reduce(tensor)
        return f"{'ok' if tensor.sum().item() == 4 else 'WRONG'}: gloo (CPU processes) in a one-process group"
    finally:
        dist.destroy_process_group()


def feature_rows(torch) -> list[tuple[str, str]]:
    checks: dict[str, Callable] = {
        "QLoRA / 8-bit (bitsandbytes)": qlora_check,
        "FlashAttention-2": flash_attention_check,
        "Liger kernels": lambda torch: gpu_library_check(torch, "liger_kernel", "liger-kernel"),
        "Unsloth": lambda torch: gpu_library_check(torch, "unsloth", "unsloth"),
        "DeepSpeed ops": deepspeed_check,
    }
    return [(f"will work: {feature}", check(torch)) for feature, check in checks.items()]


def qlora_check(torch) -> str:
    """Quantize a block to NF4 and back on the device training would use; the round trip must be close."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "no: bitsandbytes is not installed (pip install bitsandbytes)"
    from bitsandbytes import functional

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    weights = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    packed, state = functional.quantize_4bit(weights, quant_type="nf4")
    error = (functional.dequantize_4bit(packed, state, quant_type="nf4") - weights).abs().mean().item()
    if error > 0.2:  # NF4 of standard-normal weights is off by ~0.07 on average
        return f"no: the NF4 round trip on {device} is off by {error:.2f} on average"
    where = "on GPU 0" if device != "cpu" else "on this CPU (bitsandbytes' CPU path: slower than a GPU)"
    return f"yes, {where}; NF4 round trip error {error:.3f}"


def flash_attention_check(torch) -> str:
    if importlib.util.find_spec("flash_attn") is None:
        return "no: flash-attn is not installed (pip install flash-attn --no-build-isolation; NVIDIA GPUs only)"
    if not torch.cuda.is_available():
        return "no: FlashAttention-2 runs only on NVIDIA GPUs and none is visible (sdpa is used instead)"
    major, minor = torch.cuda.get_device_capability(0)
    if major < 8:
        return f"no: FlashAttention-2 needs compute capability 8.0 or newer, GPU 0 has {major}.{minor}"
    from flash_attn import flash_attn_func

    query = torch.randn(1, 16, 2, 64, device="cuda:0", dtype=torch.bfloat16)
    output = flash_attn_func(query, query, query, causal=True)
    return f"yes: a bf16 attention call on GPU 0 ran (output {tuple(output.shape)})"


def gpu_library_check(torch, module: str, distribution: str) -> str:
    if importlib.util.find_spec(module) is None:
        return f"no: {distribution} is not installed (pip install {distribution}; NVIDIA GPUs only)"
    if not torch.cuda.is_available():
        return f"no: {distribution} is installed ({version_of(distribution)}) but needs an NVIDIA GPU"
    return f"yes: {distribution} {version_of(distribution)} with a CUDA GPU"


def deepspeed_check(torch) -> str:
    """Which ZeRO optimizer ops can be used: CPU Adam (offload, CPU runs) and fused Adam (GPU), built or buildable."""
    if importlib.util.find_spec("deepspeed") is None:
        return "no: deepspeed is not installed (pip install deepspeed)"
    from deepspeed.ops.op_builder import CPUAdamBuilder

    states = [f"CPU Adam {op_state(CPUAdamBuilder())}"]
    if torch.cuda.is_available():
        from deepspeed.ops.op_builder import FusedAdamBuilder

        states.append(f"fused Adam {op_state(FusedAdamBuilder())}")
    return "; ".join(states)


def op_state(builder) -> str:
    if not builder.is_compatible(verbose=False):
        return "not compatible with this machine"
    if importlib.util.find_spec(builder.absolute_name()) is not None:
        return "pre-built"
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions/*"))
    if glob.glob(os.path.join(extensions, builder.name, "*.so")):
        return "built (cached)"
    return "compatible, compiled on first use (about a minute)"
