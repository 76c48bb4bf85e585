"""`python -m bench.gpu_check` (or `scripts/gpu_check.sh`): proof that tunesmith's GPU paths work on this machine, in
one table, in under 8 minutes on one H100-class GPU.

1. The `gpu`-marked tests (tests/gpu: bf16, FlashAttention-2, QLoRA, Liger, Unsloth on a tiny model).
2. A short bench on a ~0.5B model (Qwen/Qwen2.5-0.5B-Instruct, or `--model` a hub id or folder): LoRA in bf16 mixed
   precision with sdpa attention, then with FlashAttention-2 and with Liger's kernels where installed, QLoRA (4-bit
   bitsandbytes); with 2 GPUs, the LoRA run again on both with DDP and with DeepSpeed ZeRO-2. Each run is
   `tunesmith train` itself, packed alpaca_en_demo rows of `--cutoff-len` tokens; its numbers come from the run's
   metrics.jsonl: tokens/s (the median over the logs after the first, which holds the warm-up), peak GPU memory (the
   highest `peak_memory_gib` logged, rank 0's), and MFU = 6 x N x tokens/s / (peak bf16 FLOP/s x GPUs), N being the
   parameters the matmuls use (all but the input embedding; the usual 6N convention, attention's own FLOPs left out;
   LoRA skips the frozen weights' gradients, so its real share of the 6N is about 2/3).

Refuses to start without CUDA (`--dry-run` prints the plan anywhere). Stops starting runs once `--budget-s` is
spent and marks the rest skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity), matched against the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM; the PCIe card is matched first
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


@dataclass(frozen=True)
class BenchRun:
    name: str
    overrides: tuple[str, ...]
    processes: int = 1


@dataclass(frozen=True)
class RunResult:
    name: str
    status: str  # "ok", "failed (exit N)", "skipped: why"
    tokens_per_second: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def plan_runs(gpu_count: int, available: set[str]) -> list[BenchRun | RunResult]:
    """The runs this machine can do; what it cannot, as a skipped result saying why."""
    plan: list[BenchRun | RunResult] = [BenchRun("LoRA bf16, sdpa", ("flash_attn=sdpa",))]
    optional = [
        ("LoRA bf16, FlashAttention-2", ("flash_attn=fa2",), "flash_attn"),
        ("LoRA bf16, Liger kernels", ("flash_attn=sdpa", "enable_liger_kernel=true"), "liger_kernel"),
        ("QLoRA 4-bit, bf16 compute", ("flash_attn=sdpa", "quantization_bit=4"), "bitsandbytes"),
    ]
    for name, overrides, package in optional:
        plan.append(BenchRun(name, overrides) if package in available else RunResult(name, f"skipped: no {package}"))
    for name, overrides, package in (
        ("LoRA bf16, 2-GPU DDP", ("flash_attn=sdpa",), None),
        ("LoRA bf16, 2-GPU ZeRO-2", ("flash_attn=sdpa", "deepspeed=ds_z2"), "deepspeed"),
    ):
        if gpu_count < 2:
            plan.append(RunResult(name, f"skipped: {gpu_count} GPU"))
        elif package is not None and package not in available:
            plan.append(RunResult(name, f"skipped: no {package}"))
        else:
            plan.append(BenchRun(name, overrides, processes=2))
    return plan


def train_command(run: BenchRun, model: str, output_dir: Path, steps: int, cutoff_len: int, batch: int) -> list[str]:
    """`tunesmith train` for one bench run: packed rows, LoRA r=16 on every linear layer, bf16, no checkpoints."""
    return [
        sys.executable,
        "-m",
        "tunesmith",
        "train",
        f"model_name_or_path={model}",
        f"dataset_dir={REPO / 'data'}",
        "dataset=alpaca_en_demo",
        "packing=true",
        f"cutoff_len={cutoff_len}",
        f"per_device_train_batch_size={batch}",
        "finetuning_type=lora",
        "lora_rank=16",
        "lora_target=all",
        "bf16=true",
        "gradient_checkpointing=false",
        "learning_rate=1e-4",
        f"max_steps={steps}",
        f"logging_steps={max(1, steps // 5)}",
        "save_steps=100000",
        "plot_loss=false",
        f"nproc_per_node={run.processes}",
        f"output_dir={output_dir}",
        "overwrite_output_dir=true",
        *run.overrides,
    ]


def read_result(
    name: str, metrics_file: Path, compute_params: int | None, peak_tflops: float | None, gpus: int
) -> RunResult:
    """One run's numbers from its metrics.jsonl (see the module docstring)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    logs = [record for record in records if "tokens_per_second" in record]
    if not logs:
        return RunResult(name, "failed: no training logs")
    steady = logs[1:] or logs  # the first interval holds the warm-up (kernels, allocator)
    tokens_per_second = statistics.median(record["tokens_per_second"] for record in steady)
    peaks = [record["peak_memory_gib"] for record in logs if "peak_memory_gib" in record]
    mfu = None
    if compute_params and peak_tflops:
        mfu = 6 * compute_params * tokens_per_second / (peak_tflops * 1e12 * gpus)
    return RunResult(name, "ok", tokens_per_second, mfu, max(peaks) if peaks else None)


def peak_tflops_of(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def format_table(title: list[str], results: list[RunResult]) -> str:
    header = ("run", "status", "tokens/s", "MFU", "peak GiB")
    rows = [
        (
            result.name,
            result.status,
            f"{result.tokens_per_second:,.0f}" if result.tokens_per_second is not None else "-",
            f"{100 * result.mfu:.1f}%" if result.mfu is not None else "-",
            f"{result.peak_memory_gib:.2f}" if result.peak_memory_gib is not None else "-",
        )
        for result in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([*title, "", line(header), separator, *(line(row) for row in rows)])


def compute_params_of(model_dir: Path) -> int | None:
    """Parameters a token's matmuls go through: the active ones, less the input embedding (a lookup), plus the output
    head's matrix (a matmul even when it is the embedding, tied)."""
    from tunesmith.estimate.shape import ModelShape

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return None
    shape = ModelShape.from_config(json.loads(config_file.read_text()))
    return shape.active_params - shape.embedding_params - shape.head_params + shape.vocab_size * shape.hidden_size


def run_gpu_tests(log_dir: Path, timeout: float) -> RunResult:
    """tests/gpu, marked `gpu`; pytest's own summary line is the status."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]
    log = log_dir / "gpu_tests.log"
    print(f"$ {' '.join(command)}  (log: {log})", flush=True)
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return RunResult("gpu-marked tests (tests/gpu)", f"failed: over {timeout:.0f} s")
    log.write_text(done.stdout + done.stderr)
    summary = next((line.strip("= ") for line in reversed(done.stdout.splitlines()) if line.startswith("=")), "")
    status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return RunResult("gpu-marked tests (tests/gpu)", f"{status}: {summary}" if summary else status)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder of a ~0.5B-1B model")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per bench run")
    parser.add_argument("--cutoff-len", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--batch", type=int, default=4, help="packed rows per GPU per step")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for runs and logs")
    parser.add_argument("--budget-s", type=float, default=450, help="start no run after this many seconds")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in list")
    parser.add_argument("--skip-tests", action="store_true", help="only the bench")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands; run nothing")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (the first log interval is warm-up)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    import torch

    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu_count == 0 and not args.dry_run:
        print(
            f"gpu_check needs a CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) "
            "sees none here. `--dry-run` prints the plan.",
            file=sys.stderr,
        )
        return 2
    available = {name for name in ("flash_attn", "liger_kernel", "bitsandbytes", "deepspeed") if installed(name)}
    plan = plan_runs(gpu_count, available)
    device = torch.cuda.get_device_name(0) if gpu_count else "no GPU (dry run)"
    peak = args.peak_tflops or peak_tflops_of(device)
    title = [
        f"tunesmith gpu_check: {gpu_count} x {device}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"model {args.model}; {args.steps} steps of {args.batch} x {args.cutoff_len} packed tokens per GPU",
        f"MFU: 6N x tokens/s / ({peak or '?'} TFLOP/s bf16 x GPUs)" + ("" if peak else "; pass --peak-tflops"),
    ]
    if args.dry_run:
        print("\n".join(title))
        print("plan:" + ("" if args.skip_tests else "\n  gpu-marked tests: python -m pytest -m gpu tests/gpu"))
        for item in plan:
            if isinstance(item, BenchRun):
                command = train_command(item, args.model, args.out / "run", args.steps, args.cutoff_len, args.batch)
                print(f"  {item.name}: {' '.join(command[2:])}")
            else:
                print(f"  {item.name}: {item.status}")
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = [] if args.skip_tests else [run_gpu_tests(args.out, timeout=args.budget_s / 2)]
    from tunesmith.model.resolve import resolve_model

    model_dir = Path(resolve_model(args.model))  # downloaded once here, not inside the first timed run
    compute_params = compute_params_of(model_dir)
    for index, item in enumerate(plan):
        if isinstance(item, RunResult):
            results.append(item)
            continue
        if time.monotonic() - started > args.budget_s:
            results.append(RunResult(item.name, f"skipped: --budget-s {args.budget_s:.0f} spent"))
            continue
        output_dir = args.out / f"run{index}"
        command = train_command(item, str(model_dir), output_dir, args.steps, args.cutoff_len, args.batch)
        log = args.out / f"run{index}.log"
        print(f"[{item.name}] $ {' '.join(command[2:])}  (log: {log})", flush=True)
        with log.open("w") as handle:
            done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            results.append(RunResult(item.name, f"failed (exit {done.returncode}; see {log})"))
            continue
        results.append(read_result(item.name, output_dir / "metrics.jsonl", compute_params, peak, item.processes))
    title.append(f"total {time.monotonic() - started:.0f} s")
    table = format_table(title, results)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    return 0 if all(result.status.startswith(("ok", "skipped")) for result in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
