"""Padding and tokenizing throughput (cold, cached) with and without packing; training speed too, on SmolLM2.

    python -m bench.packing [--cutoff-len 1024] [--batch-size 4] [--train-steps N] [--json out.json]

Padding (always; data only, no model): alpaca_en_demo.json is tokenized by tunesmith's own data step with
SmolLM2's tokenizer and chat template, and cut into batches the way training does: rows in a seeded random order
(as Trainer's sampler), `batch-size` rows per batch, each batch padded to its longest row. Without packing a row is
one example; with packing it is a packed row of whole examples (`tunesmith.data.packing`). The padding share of a
batch is its padding positions over all its positions. With flash attention (GPU) a packed batch is flattened into
one row and has no padding at all.

Tokenizing (always): rows/s of the whole data step (read, convert, encode, write the cache) into an empty cache,
then the same call again, served from the cache.

Training (`--train-steps N`): `tunesmith train` on SmolLM2 (LoRA on every linear layer, batch 4, cutoff_len 1024,
alpaca_en_demo) for N steps, packing off and on, each in its own subprocess measured by bench.probe (the same
wrapper bench.identity uses). Supervised tokens (labels != -100) are counted from the batches given to
`Trainer.training_step`, over the wall time of `Trainer.train()` minus checkpoint writes; positions/s counts every
position of every batch, padding included; the loss is read from the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.probe import Measurement
from bench.runs import LOADS, MODEL_ALIAS, REPO, describe_loads, run_logged

DATASET = "alpaca_en_demo"
SEED = 42


@dataclass
class Padding:
    rows: int  # examples, or packed rows
    batches: int
    positions: int  # every position of every batch, padding included
    padding: int
    mean_batch_share: float  # the padding share of a batch, averaged over batches
    max_batch_share: float

    @property
    def share(self) -> float:
        return self.padding / max(self.positions, 1)


def padding_of(lengths: list[int], batch_size: int, seed: int) -> Padding:
    """Batches of `batch_size` rows in a seeded random order, each padded to its longest row."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    positions = padding = 0
    shares = []
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        size = max(batch) * len(batch)
        positions += size
        padding += size - sum(batch)
        shares.append((size - sum(batch)) / size)
    return Padding(len(lengths), len(shares), positions, padding, sum(shares) / len(shares), max(shares))


def measure_data(cutoff_len: int, batch_size: int) -> tuple[dict[str, Padding], dict[str, float]]:
    """Padding without and with packing, and tokenizing throughput (rows/s) cold and from the cache."""
    from tunesmith.config import load_config
    from tunesmith.data.dataset import load_sft_data
    from tunesmith.data.packing import pack_dataset
    from tunesmith.data.templates import use_chat_format
    from tunesmith.model.load import load_tokenizer
    from tunesmith.model.resolve import resolve_model

    config = load_config(None, [f"dataset={DATASET}", f"dataset_dir={REPO / 'data'}", f"cutoff_len={cutoff_len}"])
    tokenizer = load_tokenizer(resolve_model(MODEL_ALIAS))
    chat_format = use_chat_format(tokenizer, None)
    throughput = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-cache-") as cache:  # cold: an empty cache
        for attempt in ("cold", "cached"):
            start = time.perf_counter()
            data = load_sft_data(config.data, tokenizer, chat_format.jinja, SEED, cache_dir=cache)
            throughput[attempt] = data.rows / (time.perf_counter() - start)
        packed, stats = pack_dataset(data.train, cutoff_len, SEED)
        print(stats.summary())
        padding = {
            "unpacked": padding_of([len(ids) for ids in data.train["input_ids"]], batch_size, SEED),
            "packed": padding_of([len(ids) for ids in packed["input_ids"]], batch_size, SEED),
        }
    return padding, throughput


def print_throughput(throughput: dict[str, float]) -> None:
    print(
        f"\nTokenizing {DATASET} (rows/s): cold {throughput['cold']:.0f}, cached {throughput['cached']:.0f} "
        f"(x{throughput['cached'] / throughput['cold']:.1f})"
    )


def print_padding(results: dict[str, Padding], cutoff_len: int, batch_size: int) -> None:
    header = f"{'':<10}{'rows':>7}{'batches':>9}{'positions':>11}{'padding':>9}{'share':>8}{'mean/batch':>12}"
    header += f"{'max/batch':>11}"
    print(f"\nPadding, {DATASET}, cutoff_len {cutoff_len}, batch size {batch_size} (sdpa/eager layout)")
    print(header + "\n" + "-" * len(header))
    for name, p in results.items():
        print(
            f"{name:<10}{p.rows:>7}{p.batches:>9}{p.positions:>11}{p.padding:>9}{p.share:>8.1%}"
            f"{p.mean_batch_share:>12.1%}{p.max_batch_share:>11.1%}"
        )
    print("share: padding over all positions of the epoch; flash attention's flat packed layout has none.")


def run_training(name: str, packing: bool, steps: int, cutoff_len: int, batch_size: int, workdir: Path) -> dict:
    out, output_dir = workdir / f"{name}.json", workdir / name
    overrides = [
        f"model_name_or_path={MODEL_ALIAS}",
        f"dataset={DATASET}",
        f"dataset_dir={REPO / 'data'}",
        f"cutoff_len={cutoff_len}",
        "finetuning_type=lora",
        "lora_target=all",
        f"per_device_train_batch_size={batch_size}",
        f"max_steps={steps}",
        "learning_rate=1e-4",
        "logging_steps=1",
        f"save_steps={steps}",
        f"seed={SEED}",
        f"packing={str(packing).lower()}",
        f"output_dir={output_dir}",
        "overwrite_output_dir=true",
        "plot_loss=false",
    ]
    command = [sys.executable, "-m", "bench.tunesmith_run", "--json", str(out), "--", "train", *overrides]
    run_logged(name, command)
    m = Measurement.read(out)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    seconds = max(m.step_seconds, 1e-9)
    return {
        "steps": m.steps,
        "train_seconds": m.step_seconds,
        "positions": m.padded_tokens,
        "supervised_tokens": m.supervised_tokens,
        "supervised_tokens_per_second": m.supervised_tokens / seconds,
        "positions_per_second": m.padded_tokens / seconds,
        "seconds_per_step": seconds / max(m.steps, 1),
        "mean_loss": sum(losses) / len(losses),
    }


def print_training(runs: dict[str, dict]) -> None:
    header = f"{'run':<10}{'steps':>6}{'train s':>9}{'s/step':>8}{'positions':>11}{'superv.':>9}{'sup tok/s':>11}"
    header += f"{'pos/s':>8}{'mean loss':>11}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in runs.items():
        print(
            f"{name:<10}{r['steps']:>6}{r['train_seconds']:>9.1f}{r['seconds_per_step']:>8.2f}{r['positions']:>11}"
            f"{r['supervised_tokens']:>9}{r['supervised_tokens_per_second']:>11.0f}{r['positions_per_second']:>8.0f}"
            f"{r['mean_loss']:>11.4f}"
        )
    ratio = runs["packed"]["supervised_tokens_per_second"] / runs["unpacked"]["supervised_tokens_per_second"]
    print(f"\npacked / unpacked supervised tokens/s: x{ratio:.2f}")
    print(describe_loads())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=0, help="also train N steps with packing off and on")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    padding, throughput = measure_data(args.cutoff_len, args.batch_size)
    print_padding(padding, args.cutoff_len, args.batch_size)
    print_throughput(throughput)
    report: dict = {"cutoff_len": args.cutoff_len, "batch_size": args.batch_size, "tokenizing_rows_per_s": throughput}
    report["padding"] = {name: asdict(p) | {"share": p.share} for name, p in padding.items()}
    if args.train_steps:
        with tempfile.TemporaryDirectory(prefix="tunesmith-bench-packing-") as tmp:
            runs = {
                name: run_training(name, packing, args.train_steps, args.cutoff_len, args.batch_size, Path(tmp))
                for name, packing in (("unpacked", False), ("packed", True))
            }
        print_training(runs)
        report |= {"training": runs, "cpus": os.cpu_count(), "load_average": LOADS}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
