"""Each tool at its defaults on the same LoRA work, timed as a user would time it: the whole process.

    python -m bench.defaults [--rows 96] [--eval-rows 16] [--json out.json] [--only tunesmith,plain]

The work (issue 10): SmolLM2-135M-Instruct, LoRA r=8 on every linear layer, the first `--rows` rows of
alpaca_en_demo.json, cutoff_len 512, batch 4, one epoch, the same learning rate and schedule everywhere. Rows, one
subprocess each, one after the other (so that each peak is its own):

- `tunesmith`: `tunesmith train` with no performance key: whatever it chooses for this machine (precision,
  allocator, length grouping, gradient checkpointing);
- `plain dynamic`: bench.plain_trainer_peft as the tutorials run it on a CPU: float32, Trainer + peft,
  `DataCollatorForSeq2Seq(padding=True)` padding each batch to its longest row. The baseline;
- `plain max_length`: the same script with every row padded to cutoff_len when tokenized (the other recipe);
- `tunesmith packing`: tunesmith with packing: true (fewer, fuller steps: a different notion of a step).

Printed per row: supervised tokens (labels != -100) per second of whole-process wall time (start-up, loading,
data, training and saving included; the untimed same-rows scoring is taken out), the same for `Trainer.train()`
alone, peak resident memory (VmHWM), the epoch loss (Trainer's mean training loss), the loss on the same rows after
training (bench.probe.same_rows_loss on the first `--eval-rows` rows), and ratios to `plain dynamic`. The targets
of issue 10 are checked at the end: tunesmith ≥ 2x the baseline's supervised tokens/s, ≤ 0.7x its peak memory,
same-rows loss within 2%.

Timings need an otherwise idle machine: the load average around every row is printed; well above the CPU count
means another process competed and the figures are not the machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.compare import BATCH_SIZE, CUTOFF_LEN, DATA, LEARNING_RATE, tunesmith_overrides
from bench.probe import Measurement
from bench.runs import LOADS, converted_model_dir, describe_loads, run_logged

BASELINE = "plain dynamic"
ROWS = ("tunesmith", BASELINE, "plain max_length", "tunesmith packing")


def command_for(name: str, rows: int, eval_rows: int, model_dir: Path, workdir: Path, out: Path) -> list[str]:
    slug = name.replace(" ", "_")
    if name.startswith("tunesmith"):
        keys = [*tunesmith_overrides(rows, -1), f"output_dir={workdir / slug}"]
        keys += ["packing=true"] if name == "tunesmith packing" else []
        scoring = ["--eval-data", str(DATA), "--eval-rows", str(eval_rows), "--max-length", str(CUTOFF_LEN)]
        return [sys.executable, "-m", "bench.tunesmith_run", "--json", str(out), *scoring, "--", "train", *keys]
    padding = "dynamic" if name == BASELINE else "max_length"
    options = ["--model-dir", str(model_dir), "--data", str(DATA), "--rows", str(rows), "--steps", "-1"]
    options += ["--epochs", "1", "--lr", str(LEARNING_RATE), "--batch-size", str(BATCH_SIZE)]
    options += ["--max-length", str(CUTOFF_LEN), "--padding", padding, "--eval-rows", str(eval_rows)]
    options += ["--output-dir", str(workdir / slug), "--json", str(out)]
    return [sys.executable, "-m", "bench.plain_trainer_peft", *options]


def run_row(name: str, command: list[str], out: Path) -> dict:
    start = time.perf_counter()
    run_logged(name, command)
    wall = time.perf_counter() - start
    m = Measurement.read(out)
    working = max(wall - m.same_rows_seconds, 1e-9)
    return asdict(m) | {
        "wall_seconds": wall,
        "working_seconds": working,
        "supervised_tokens_per_second": m.supervised_tokens / working,
        "train_supervised_tokens_per_second": m.supervised_tokens / max(m.step_seconds, 1e-9),
        "peak_mib": m.peak_rss_hwm_mib or m.peak_rss_mib,
    }


def print_table(results: dict[str, dict]) -> None:
    header = (
        f"{'row':<18}{'steps':>6}{'wall s':>8}{'superv.':>9}{'sup tok/s':>10}{'train tok/s':>12}{'peak MiB':>9}"
        f"{'epoch loss':>11}{'same-rows':>10}{'x tok/s':>8}{'x peak':>8}{'x loss':>8}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    base = results.get(BASELINE)
    for name, r in results.items():
        ratios = ""
        if base:
            ratios = (
                f"{r['supervised_tokens_per_second'] / base['supervised_tokens_per_second']:>8.2f}"
                f"{r['peak_mib'] / base['peak_mib']:>8.2f}{r['same_rows_loss'] / base['same_rows_loss']:>8.3f}"
            )
        print(
            f"{name:<18}{r['steps']:>6}{r['working_seconds']:>8.1f}{r['supervised_tokens']:>9}"
            f"{r['supervised_tokens_per_second']:>10.1f}{r['train_supervised_tokens_per_second']:>12.1f}"
            f"{r['peak_mib']:>9.0f}{r['mean_loss']:>11.4f}{r['same_rows_loss']:>10.4f}{ratios}"
        )


def print_targets(results: dict[str, dict]) -> None:
    ours, base = results.get("tunesmith"), results.get(BASELINE)
    if not (ours and base):
        return
    speed = ours["supervised_tokens_per_second"] / base["supervised_tokens_per_second"]
    memory = ours["peak_mib"] / base["peak_mib"]
    loss = ours["same_rows_loss"] / base["same_rows_loss"]
    print()
    for text, ok in [
        (f"tunesmith supervised tokens/s >= 2x {BASELINE} (x{speed:.2f})", speed >= 2),
        (f"tunesmith peak <= 0.7x {BASELINE} (x{memory:.2f})", memory <= 0.7),
        (f"tunesmith same-rows loss within 2% of {BASELINE} ({loss - 1:+.1%})", abs(loss - 1) <= 0.02),
    ]:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96, help="first N rows of alpaca_en_demo.json")
    parser.add_argument("--eval-rows", type=int, default=16, help="rows every trained model is scored on")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--json", help="also write every row's numbers to this file")
    args = parser.parse_args()
    names = [name for name in ROWS if not args.only or name in args.only.split(",")]

    model_dir = converted_model_dir()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-defaults-") as tmp:
        workdir = Path(tmp)
        for name in names:
            out = workdir / f"{name.replace(' ', '_')}.json"
            results[name] = run_row(name, command_for(name, args.rows, args.eval_rows, model_dir, workdir, out), out)

    if args.json:
        report = {"rows": args.rows, "cpus": os.cpu_count(), "load_average": LOADS, "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.rows} rows of {DATA.name}, cutoff_len {CUTOFF_LEN}, batch {BATCH_SIZE}, LoRA r=8 all, one epoch")
    print_table(results)
    print(
        "wall s: whole process less same-rows scoring; sup tok/s: supervised tokens over it; train tok/s: over "
        "Trainer.train() alone; peak: VmHWM; epoch loss: mean training loss; same-rows: loss per answer token on "
        f"the first {args.eval_rows} rows after training; x: ratio to {BASELINE}."
    )
    print(describe_loads())
    print_targets(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
