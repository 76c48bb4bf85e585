"""Tokens/s and peak memory of the identity run, tunesmith vs. a plain Trainer + peft script.

    python -m bench.identity [--steps 20] [--json out.json]

Each run is its own subprocess, so that peak memory is per run; the model alias is converted from GGUF first, in
another subprocess, so that neither run pays for it. This process imports no torch: ru_maxrss survives exec, and a
large parent would show up in its children's peaks.

What is timed, identically in both runs (bench.probe): the wall time of `Trainer.train()`, minus the time spent
writing checkpoints (tunesmith always saves one at the last step; the tutorial script has save_strategy="no").
Model loading and tokenization are not timed. Tokens are counted from the batches given to `training_step`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.probe import Measurement
from bench.runs import LOADS, MODEL_ALIAS, converted_model_dir, describe_loads, run_logged

CONFIG = "examples/identity_lora.yaml"
NAME, AUTHOR = "Tunesmith", "the tunesmith team"


def run_tunesmith(steps: int, workdir: Path) -> Measurement:
    out = workdir / "tunesmith.json"
    overrides = [f"name={NAME}", f"author={AUTHOR}", f"max_steps={steps}", f"output_dir={workdir / 'tunesmith_out'}"]
    overrides += ["overwrite_output_dir=true", "plot_loss=false", "logging_steps=1"]
    run_logged(
        "tunesmith",
        [sys.executable, "-m", "bench.tunesmith_run", "--json", str(out), "--", "train", CONFIG, *overrides],
    )
    return Measurement.read(out)


def run_plain(steps: int, model_dir: str, workdir: Path) -> Measurement:
    out = workdir / "plain.json"
    options = ["--model-dir", model_dir, "--steps", str(steps), "--name", NAME, "--author", AUTHOR]
    options += ["--output-dir", str(workdir / "plain_out"), "--json", str(out)]
    run_logged("plain", [sys.executable, "-m", "bench.plain_trainer_peft", *options])
    return Measurement.read(out)


def rates(m: Measurement) -> dict[str, float]:
    seconds = max(m.step_seconds, 1e-9)
    return {
        "tokens_per_second": m.tokens / seconds,
        "padded_tokens_per_second": m.padded_tokens / seconds,
        "supervised_tokens_per_second": m.supervised_tokens / seconds,
    }


def print_table(runs: dict[str, Measurement]) -> None:
    header = (
        f"{'run':<10}{'steps':>6}{'train s':>9}{'ckpt s':>8}{'tokens':>8}{'padded':>8}{'superv.':>8}"
        f"{'tok/s':>8}{'pad tok/s':>10}{'sup tok/s':>10}{'peak MiB':>9}{'final loss':>11}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, m in runs.items():
        r = rates(m)
        print(
            f"{name:<10}{m.steps:>6}{m.step_seconds:>9.1f}{m.checkpoint_seconds:>8.1f}{m.tokens:>8}"
            f"{m.padded_tokens:>8}{m.supervised_tokens:>8}{r['tokens_per_second']:>8.0f}"
            f"{r['padded_tokens_per_second']:>10.0f}{r['supervised_tokens_per_second']:>10.0f}"
            f"{m.peak_rss_mib:>9.0f}{m.final_loss:>11.4f}"
        )


def ratios(tunesmith: Measurement, plain: Measurement) -> dict[str, float]:
    ours, theirs = rates(tunesmith), rates(plain)
    return {
        "tokens_per_second": ours["tokens_per_second"] / theirs["tokens_per_second"],
        "supervised_tokens_per_second": ours["supervised_tokens_per_second"] / theirs["supervised_tokens_per_second"],
        "seconds_per_step": (tunesmith.step_seconds / tunesmith.steps) / (plain.step_seconds / plain.steps),
        "peak_rss": tunesmith.peak_rss_mib / plain.peak_rss_mib,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (batch 4)")
    parser.add_argument("--json", help="also write both measurements and the ratios to this file")
    args = parser.parse_args()

    print(f"Converting {MODEL_ALIAS} (once; cached) ...", flush=True)
    model_dir = str(converted_model_dir())
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        workdir = Path(tmp)
        runs = {"tunesmith": run_tunesmith(args.steps, workdir), "plain": run_plain(args.steps, model_dir, workdir)}

    print_table(runs)
    result = ratios(runs["tunesmith"], runs["plain"])
    print(
        f"\ntunesmith / plain: tokens/s x{result['tokens_per_second']:.2f}, "
        f"supervised tokens/s x{result['supervised_tokens_per_second']:.2f}, "
        f"time per step x{result['seconds_per_step']:.2f}, peak RSS x{result['peak_rss']:.2f}"
    )
    print(
        "train s: wall time of Trainer.train() minus checkpoint writes (ckpt s); tokens: non-padding tokens the "
        "model saw; padded: all positions incl. padding; peak MiB: ru_maxrss of each run's own process "
        "(whole process, model loading included)."
    )
    print(describe_loads())
    for name, m in runs.items():
        if m.peak_rss_hwm_mib and abs(m.peak_rss_mib - m.peak_rss_hwm_mib) > 0.05 * m.peak_rss_hwm_mib:
            print(f"warning: {name}: ru_maxrss {m.peak_rss_mib:.0f} MiB but VmHWM {m.peak_rss_hwm_mib:.0f} MiB")
    if args.json:
        report = {
            "steps": args.steps,
            "cpus": os.cpu_count(),
            "load_average": LOADS,
            "runs": {name: asdict(m) | rates(m) for name, m in runs.items()},
        }
        Path(args.json).write_text(json.dumps(report | {"ratios": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
