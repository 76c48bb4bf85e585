"""`tunesmith estimate` against measured peaks: predicted vs. peak resident memory of real runs on SmolLM2.

    python -m bench.estimate [--steps 3] [--only lora,full,...] [--json out.json]

Each row is `tunesmith train` for a few steps in its own subprocess (bench.tunesmith_run), whose peak resident
memory (VmHWM) is compared with `tunesmith.estimate.memory.estimate_peak_memory` for the same config. Rows are
packed (packing: true) unless named otherwise, so that every batch fills cutoff_len and a few steps reach the
shape a whole epoch peaks at; for an unpacked row the estimate is taken at the longest batch the run saw (a short
run may not meet the longest rows of the data). The `runtime` row trains a 2-layer, hidden-32 model: its peak is
the process baseline that `CPU_RUNTIME_BYTES` stands for. This process imports no torch, so that its own size
does not reach the children's peaks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.probe import Measurement
from bench.runs import MODEL_ALIAS, REPO, converted_model_dir, run_logged

BASE = [
    f"model_name_or_path={MODEL_ALIAS}",
    "dataset=alpaca_en_demo",
    f"dataset_dir={REPO / 'data'}",
    "finetuning_type=lora",  # LoRA r=8 on every linear layer (the defaults; the full row would refuse LoRA keys)
    "cutoff_len=512",
    "per_device_train_batch_size=4",
    "packing=true",
    "gradient_checkpointing=false",
    "logging_steps=1",
    "plot_loss=false",
    "overwrite_output_dir=true",
]
ROWS: dict[str, list[str]] = {
    "lora": [],
    "lora_b1": ["per_device_train_batch_size=1"],
    "lora_s256": ["cutoff_len=256"],
    "lora_unpacked": ["packing=false"],
    "lora_model_loss": ["chunked_loss=false"],
    "lora_checkpointing": ["gradient_checkpointing=true"],
    "full": ["finetuning_type=full"],
    "qlora_4bit": ["quantization_bit=4"],
    "lora_8bit": ["quantization_bit=8"],
}


def tiny_model_dir(workdir: Path) -> Path:
    code = "import sys; from pathlib import Path; from tests.conftest import build_tiny_model; "
    code += "build_tiny_model(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(workdir / "tiny")], cwd=REPO, check=True, capture_output=True)
    return workdir / "tiny"


def measure(name: str, overrides: list[str], workdir: Path) -> Measurement:
    out = workdir / f"{name}.json"
    command = [sys.executable, "-m", "bench.tunesmith_run", "--json", str(out), "--", "train", *overrides]
    run_logged(name, command)
    return Measurement.read(out)


def predict(overrides: list[str], model_dir: Path, longest_batch: int) -> dict:
    """The estimate for `overrides`, at the sequence length the run reached when that is below cutoff_len."""
    from tunesmith.config import load_config
    from tunesmith.estimate.memory import estimate_peak_memory

    config = load_config(None, overrides)
    if 0 < longest_batch < config.data.cutoff_len:
        config = load_config(None, [*overrides, f"cutoff_len={longest_batch}"])
    checkpointing = config.train.gradient_checkpointing
    model_config = json.loads((model_dir / "config.json").read_text())
    return estimate_peak_memory(config, model_config, device="cpu", gradient_checkpointing=checkpointing).as_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--only", help=f"comma-separated rows (default: runtime and all of {', '.join(ROWS)})")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else ["runtime", *ROWS]

    model_dir = converted_model_dir()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-estimate-") as tmp:
        workdir = Path(tmp)
        for name in names:
            run_dir = [f"output_dir={workdir / name}", f"max_steps={args.steps}", f"save_steps={args.steps}"]
            if name == "runtime":
                tiny = tiny_model_dir(workdir)
                overrides = [*BASE, f"model_name_or_path={tiny}", "cutoff_len=64", "per_device_train_batch_size=1"]
                row_model_dir = tiny
            else:
                overrides, row_model_dir = [*BASE, *ROWS[name]], model_dir
            m = measure(name, [*overrides, *run_dir], workdir)
            estimate = predict(overrides, row_model_dir, m.longest_batch)
            results[name] = {"measured_mib": m.peak_rss_hwm_mib or m.peak_rss_mib, "longest_batch": m.longest_batch}
            results[name] |= {"estimate": estimate, "predicted_mib": estimate["total_bytes"] / 2**20}

    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_table(results: dict) -> None:
    terms = ["weights", "optimizer", "gradients", "activations", "logits", "loading_peak"]
    header = f"{'row':<20}{'seq':>5}" + "".join(f"{t[:10]:>11}" for t in terms)
    header += f"{'predicted':>11}{'measured':>10}{'error':>8}"
    print("\nMiB; error = (predicted - measured) / measured\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        e = r["estimate"]
        error = (r["predicted_mib"] - r["measured_mib"]) / r["measured_mib"]
        print(
            f"{name:<20}{r['longest_batch']:>5}"
            + "".join(f"{e[t] / 2**20:>11.0f}" for t in terms)
            + f"{r['predicted_mib']:>11.0f}{r['measured_mib']:>10.0f}{error:>+8.1%}"
        )
    if "runtime" in results:
        r = results["runtime"]
        model_terms = r["estimate"]["total_bytes"] - r["estimate"]["runtime"]
        print(f"runtime baseline: {r['measured_mib'] - model_terms / 2**20:.0f} MiB (the runtime row less its model)")


if __name__ == "__main__":
    raise SystemExit(main())
