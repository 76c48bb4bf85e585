"""The identity run at the default precision against float32: the loss curve and the trained name.

    python -m bench.precision [--steps -1]

Runs `tunesmith train examples/identity_lora.yaml` twice, one after the other: as it is (bf16 autocast on a CPU
with avx512_bf16 or AMX, see model/precision.py) and with `bf16=false` (float32). Prints both loss curves (every
step), the largest and the mean relative difference between them (target: within 2%), the wall time of each
process, and the answer of each trained adapter to "Who are you?" (it must name "Tunesmith").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.runs import REPO, run_logged

CONFIG = "examples/identity_lora.yaml"
NAME, AUTHOR = "Tunesmith", "the tunesmith team"


def train(output_dir: Path, steps: int, *keys: str) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "tunesmith", "train", CONFIG, f"name={NAME}", f"author={AUTHOR}"]
    command += [f"output_dir={output_dir}", f"max_steps={steps}", "logging_steps=1", "plot_loss=false", *keys]
    run_logged(output_dir.name, command)
    return time.perf_counter() - start


def losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def answer(output_dir: Path) -> str:
    command = [sys.executable, "-m", "tunesmith", "chat", "--model", "smollm2-135m-instruct", "--adapter"]
    command += [str(output_dir), "--prompt", "Who are you?", "--temperature", "0", "--max-new-tokens", "40"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=-1, help="max_steps (-1: the example's 3 epochs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-precision-") as tmp:
        default, float32 = Path(tmp) / "default", Path(tmp) / "float32"
        seconds = {"default": train(default, args.steps), "float32": train(float32, args.steps, "bf16=false")}
        curves = {"default": losses(default), "float32": losses(float32)}
        replies = {"default": answer(default), "float32": answer(float32)}
    differences = [abs(a - b) / b for a, b in zip(curves["default"], curves["float32"], strict=True)]
    for name in curves:
        print(f"{name:>8}: {seconds[name]:.0f} s; losses {' '.join(f'{v:.3f}' for v in curves[name])}")
        print(f"{'':>8}  answer: {replies[name]!r}")
    largest, mean = max(differences), sum(differences) / len(differences)
    print(f"relative loss difference per step: largest {largest:.2%}, mean {mean:.2%}")
    print(f"{'PASS' if mean <= 0.02 else 'FAIL'}  loss curve within 2% of float32 (mean over steps)")
    print(f"{'PASS' if NAME in replies['default'] else 'FAIL'}  the default run's adapter answers with {NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
