"""Seconds per training step with 1 and 2 processes for each distributed engine, against 1-process plain training.

    python -m bench.distributed [--steps 6] [--hidden 256] [--layers 4] [--method full] [--threads N] [--json F]

The model is a random-weight Llama built here (SmolLM2's tokenizer and vocabulary, `--hidden` wide, `--layers`
deep), so the numbers depend on no download. Every run is the real `tunesmith train` in its own subprocess on
identity.json with the same global batch of 4 rows (4 per device x 1 process, or 2 per device x 2 processes), full
fine-tuning by default (so that ZeRO's sharding of weights, gradients and optimizer state has something to shard).

The time per step is read from the run's metrics.jsonl (Trainer's `train_runtime` at each logged step): the time
from the end of step 1 to the end of the last step, over those steps. Process start, model loading, the first step
(warm-up, DeepSpeed's first allocations) and the final save are left out. On a CPU the processes share its cores:
2 processes are not expected to be faster, and the ratios show what each engine's communication and bookkeeping
cost; on GPUs the same command measures the speed-up. A 1-process run uses every core for its threads, while
torchrun gives each of several processes 1 thread (OMP_NUM_THREADS); `--threads` sets the same for all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.runs import REPO

# engine name → tunesmith keys; DeepSpeed rows need deepspeed, offload rows its compiled cpu_adam (~1-3 min once)
ENGINES: dict[str, tuple[str, ...]] = {
    "plain / DDP": (),
    "ZeRO-0": ("deepspeed=ds_z0",),
    "ZeRO-1": ("deepspeed=ds_z1",),
    "ZeRO-2": ("deepspeed=ds_z2",),
    "ZeRO-2 offload": ("deepspeed=ds_z2_offload",),
    "ZeRO-3": ("deepspeed=ds_z3",),
    "ZeRO-3 offload": ("deepspeed=ds_z3_offload",),
    "FSDP": ("fsdp=full_shard",),
    "FSDP grad-op": ("fsdp=shard_grad_op",),
    "FSDP offload": ("fsdp=full_shard offload",),
}


@dataclass
class Row:
    engine: str
    processes: int
    seconds_per_step: float | None  # None: the run failed (error kept)
    loss: float | None
    wall_seconds: float  # the whole command: start, load, train, save
    error: str | None = None


def build_model(target: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunesmith.model.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def available(engine_keys: tuple[str, ...]) -> str | None:
    """Why this engine cannot run here, or None."""
    if any(key.startswith("deepspeed=") for key in engine_keys) and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError

    try:
        load_config(None, ["dataset=identity", *engine_keys])
    except TunesmithError as error:  # e.g. a key this version refuses
        return str(error).splitlines()[0]
    return None


def run_once(model: Path, work: Path, engine: str, keys: tuple[str, ...], processes: int, args) -> Row:
    output_dir = work / f"{engine.replace(' ', '_').replace('/', '')}-{processes}"
    per_device = 4 // processes
    command = [
        sys.executable,
        "-m",
        "tunesmith",
        "train",
        f"model_name_or_path={model}",
        f"dataset_dir={REPO / 'data'}",
        "dataset=identity",
        "name=Tunesmith",
        "author=the tunesmith team",
        f"finetuning_type={args.method}",
        f"per_device_train_batch_size={per_device}",
        f"max_steps={args.steps}",
        f"save_steps={args.steps}",
        f"max_samples={4 * args.steps}",
        "cutoff_len=256",
        "logging_steps=1",
        "learning_rate=1e-4",
        "plot_loss=false",
        "overwrite_output_dir=true",
        f"output_dir={output_dir}",
        *keys,
    ]
    if processes > 1 or keys:
        command.append(f"nproc_per_node={processes}")
    environ = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
    if args.threads:
        environ["OMP_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        error = (completed.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return Row(engine, processes, None, None, wall, error)
    if f"x {processes} process(es)" not in completed.stdout:  # a silent fallback would make the row meaningless
        return Row(engine, processes, None, None, wall, f"did not run on {processes} process(es)")
    if any(key.startswith("fsdp=") for key in keys) and "fsdp: FSDP2 over" not in completed.stdout:
        return Row(engine, processes, None, None, wall, "FSDP was not applied")  # ShardingCheck's line is missing
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "train_runtime" in r]
    first, last = steps[0], steps[-1]
    per_step = (last["train_runtime"] - first["train_runtime"]) / max(last["step"] - first["step"], 1)
    return Row(engine, processes, per_step, last["loss"], wall)


def print_table(rows: list[Row]) -> None:
    baseline = next((r.seconds_per_step for r in rows if r.engine == "plain / DDP" and r.processes == 1), None)
    print(f"{'engine':<16} {'processes':>9} {'s/step':>8} {'vs 1-proc plain':>16} {'loss':>8} {'wall s':>7}")
    for row in rows:
        if row.seconds_per_step is None:
            print(f"{row.engine:<16} {row.processes:>9}  failed: {row.error}")
            continue
        ratio = f"{row.seconds_per_step / baseline:.2f}x" if baseline else "-"
        print(
            f"{row.engine:<16} {row.processes:>9} {row.seconds_per_step:>8.3f} {ratio:>16} {row.loss:>8.4f} "
            f"{row.wall_seconds:>7.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (the first is not timed)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--method", default="full", choices=["full", "lora"], help="finetuning_type")
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), help="which rows (names as in the table)")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for every run; by default torch uses every core in a 1-process run, and torchrun "
        "sets 1 thread per process when it starts several",
    )
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-distributed-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model", args.hidden, args.layers)
        for engine in args.engines:
            keys = ENGINES[engine]
            reason = available(keys)
            if reason:
                print(f"skip {engine}: {reason}")
                continue
            for processes in (1, 2):
                rows.append(run_once(model, work, engine, keys, processes, args))
                row = rows[-1]
                print(f"  {engine}, {processes} process(es): {row.seconds_per_step or row.error}", flush=True)
    print(f"\nrandom Llama hidden {args.hidden} x {args.layers} layers, {args.method}, global batch 4, cutoff_len 256")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return 0 if all(row.seconds_per_step is not None for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
