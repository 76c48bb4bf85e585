"""The same work three ways, plus QLoRA: tunesmith at its best, tunesmith without packing, and a plain script.

    python -m bench.compare [--rows 8] [--max-steps -1] [--eval-rows 8] [--json out.json]
    python -m bench.compare --rows 200        # the full configuration: 200 rows, one epoch (~30+ min on 2 cores)

The work: SmolLM2-135M-Instruct, LoRA r=8 on every linear layer, the first `--rows` rows of alpaca_en_demo.json,
cutoff_len 512, batch 4, one epoch (or `--max-steps`), the same learning rate and schedule everywhere. Rows, one
subprocess each, one after the other (so that each peak is its own):

- `tunesmith`: its best settings for the machine: packing, the chunked supervised-only loss, and
  gradient_checkpointing: auto (off unless the run would not fit);
- `no packing`: the same with packing off (each batch padded to its longest row);
- `plain`: bench.plain_trainer_peft, a tutorial-style Transformers `Trainer` + peft script that pads every row to
  max_length 512 and uses the model's own loss;
- `qlora`: `tunesmith` with quantization_bit: 4 (NF4, double quantization).

Printed per row: supervised tokens/s (labels != -100, counted from the batches `Trainer.training_step` receives,
over the wall time of `Trainer.train()` less checkpoint writes), peak resident memory (VmHWM of the row's
process, loading included), model weight memory (from the estimate's weights term), the last logged training
loss, the loss on the same rows (after training, every row scores its trained model on the first `--eval-rows`
rows in one way, bench.probe.same_rows_loss), the `tunesmith estimate` prediction for the row and its error, and
the ratios to the plain script.

What packing changes: a packed row holds several examples, so an epoch is fewer optimizer steps (with batch 4 and
these rows about 2.5x fewer), each over more supervised tokens. Losses after one epoch therefore compare equal
work per example, not per step; with `--max-steps` the rows see different numbers of examples, and the losses do
not compare. The default `--rows 8` is a quick check (a few minutes); timings on a shared machine are noisy (the
load average before and after each row is printed).
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
from bench.runs import LOADS, MODEL_ALIAS, REPO, converted_model_dir, describe_loads, run_logged

DATA = REPO / "data" / "alpaca_en_demo.json"
CUTOFF_LEN, BATCH_SIZE, LORA_RANK, LEARNING_RATE, SEED = 512, 4, 8, 2e-4, 42


def tunesmith_overrides(rows: int, max_steps: int) -> list[str]:
    """The work as `tunesmith train` keys, shared by every tunesmith row and by the estimate of the plain row."""
    return [
        f"model_name_or_path={MODEL_ALIAS}",
        f"dataset={DATA}",
        f"max_samples={rows}",
        f"cutoff_len={CUTOFF_LEN}",
        "finetuning_type=lora",
        "lora_target=all",
        f"lora_rank={LORA_RANK}",
        f"lora_alpha={2 * LORA_RANK}",
        f"per_device_train_batch_size={BATCH_SIZE}",
        f"learning_rate={LEARNING_RATE}",
        "lr_scheduler_type=cosine",
        "warmup_ratio=0.1",
        "num_train_epochs=1",
        f"max_steps={max_steps}",
        f"seed={SEED}",
        "logging_steps=1",
        "plot_loss=false",
        "overwrite_output_dir=true",
    ]


ROWS: dict[str, list[str]] = {  # tunesmith rows: keys on top of tunesmith_overrides
    "tunesmith": ["packing=true"],
    "no packing": ["packing=false"],
    "qlora": ["packing=true", "quantization_bit=4"],
}
PLAIN_ESTIMATE_KEYS = ["packing=false", "chunked_loss=false", "gradient_checkpointing=false"]


def run_tunesmith(name: str, keys: list[str], eval_rows: int, workdir: Path) -> Measurement:
    out = workdir / f"{name.replace(' ', '_')}.json"
    scoring = ["--eval-data", str(DATA), "--eval-rows", str(eval_rows), "--max-length", str(CUTOFF_LEN)]
    command = [sys.executable, "-m", "bench.tunesmith_run", "--json", str(out), *scoring, "--", "train", *keys]
    run_logged(name, [*command, f"output_dir={workdir / name.replace(' ', '_')}"])
    return Measurement.read(out)


def run_plain(rows: int, max_steps: int, eval_rows: int, model_dir: Path, workdir: Path) -> Measurement:
    out = workdir / "plain.json"
    options = ["--model-dir", str(model_dir), "--data", str(DATA), "--rows", str(rows), "--steps", str(max_steps)]
    options += ["--epochs", "1", "--lr", str(LEARNING_RATE), "--batch-size", str(BATCH_SIZE)]
    options += ["--max-length", str(CUTOFF_LEN), "--eval-rows", str(eval_rows)]
    options += ["--output-dir", str(workdir / "plain_out"), "--json", str(out)]
    run_logged("plain", [sys.executable, "-m", "bench.plain_trainer_peft", *options])
    return Measurement.read(out)


def predict(keys: list[str], model_dir: Path, longest_batch: int) -> dict:
    """`tunesmith estimate` for a row's keys, at the longest batch the row met (a short run may not reach cutoff)."""
    from tunesmith.config import load_config
    from tunesmith.estimate.memory import estimate_peak_memory

    config = load_config(None, keys)
    if 0 < longest_batch < config.data.cutoff_len:
        config = load_config(None, [*keys, f"cutoff_len={longest_batch}"])
    model_config = json.loads((model_dir / "config.json").read_text())
    checkpointing = config.train.gradient_checkpointing
    if checkpointing == "auto":
        from tunesmith.estimate.memory import available_memory, choose_checkpointing

        checkpointing, _ = choose_checkpointing(config, model_config, device="cpu", available=available_memory("cpu"))
    return estimate_peak_memory(config, model_config, device="cpu", gradient_checkpointing=checkpointing).as_dict()


def summarize(m: Measurement, estimate: dict) -> dict:
    seconds = max(m.step_seconds, 1e-9)
    measured = m.peak_rss_hwm_mib or m.peak_rss_mib
    predicted = estimate["total_bytes"] / 2**20
    return asdict(m) | {
        "step_seconds": m.step_seconds,
        "supervised_tokens_per_second": m.supervised_tokens / seconds,
        "peak_mib": measured,
        "weights_mib": estimate["weights"] / 2**20,
        "estimate_mib": predicted,
        "estimate_error": (predicted - measured) / measured,
        "estimate": estimate,
    }


def print_table(results: dict[str, dict]) -> None:
    header = (
        f"{'row':<12}{'steps':>6}{'train s':>9}{'superv.':>9}{'sup tok/s':>10}{'peak MiB':>9}{'weights':>9}"
        f"{'last loss':>10}{'same-rows':>10}{'estimate':>9}{'error':>8}{'x tok/s':>8}{'x peak':>8}{'x loss':>8}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    plain = results.get("plain")
    for name, r in results.items():
        ratios = ""
        if plain:
            ratios = (
                f"{r['supervised_tokens_per_second'] / plain['supervised_tokens_per_second']:>8.2f}"
                f"{r['peak_mib'] / plain['peak_mib']:>8.2f}{r['same_rows_loss'] / plain['same_rows_loss']:>8.3f}"
            )
        print(
            f"{name:<12}{r['steps']:>6}{r['step_seconds']:>9.1f}{r['supervised_tokens']:>9}"
            f"{r['supervised_tokens_per_second']:>10.1f}{r['peak_mib']:>9.0f}{r['weights_mib']:>9.0f}"
            f"{r['final_loss']:>10.4f}{r['same_rows_loss']:>10.4f}{r['estimate_mib']:>9.0f}"
            f"{r['estimate_error']:>+8.1%}{ratios}"
        )


def print_targets(results: dict[str, dict]) -> None:
    best, plain, qlora = results["tunesmith"], results["plain"], results.get("qlora")
    loss_ratio = best["same_rows_loss"] / plain["same_rows_loss"]
    checks = [
        (
            "tunesmith supervised tokens/s >= 1.5x plain",
            best["supervised_tokens_per_second"] / plain["supervised_tokens_per_second"] >= 1.5,
        ),
        ("tunesmith peak <= 0.7x plain", best["peak_mib"] / plain["peak_mib"] <= 0.7),
        ("tunesmith same-rows loss within 2% of plain", abs(loss_ratio - 1) <= 0.02),
        ("estimate within 20% on every row", all(abs(r["estimate_error"]) <= 0.2 for r in results.values())),
    ]
    if qlora:
        checks += [
            ("qlora weights <= 0.3x tunesmith's fp32 LoRA", qlora["weights_mib"] / best["weights_mib"] <= 0.3),
            ("qlora peak below tunesmith's fp32 LoRA", qlora["peak_mib"] < best["peak_mib"]),
        ]
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="first N rows of alpaca_en_demo.json (full run: 200)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop each row after N steps (-1: one epoch)")
    parser.add_argument("--eval-rows", type=int, default=8, help="rows every trained model is scored on")
    parser.add_argument("--no-qlora", action="store_true", help="skip the QLoRA row (needs bitsandbytes)")
    parser.add_argument("--json", help="also write every row's numbers to this file")
    args = parser.parse_args()

    print(f"Converting {MODEL_ALIAS} (once; cached) ...", flush=True)
    model_dir = converted_model_dir()
    base = tunesmith_overrides(args.rows, args.max_steps)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-compare-") as tmp:
        workdir = Path(tmp)
        for name, keys in ROWS.items():
            if name == "qlora" and args.no_qlora:
                continue
            m = run_tunesmith(name, [*base, *keys], args.eval_rows, workdir)
            results[name] = summarize(m, predict([*base, *keys], model_dir, m.longest_batch))
        m = run_plain(args.rows, args.max_steps, args.eval_rows, model_dir, workdir)
        results["plain"] = summarize(m, predict([*base, *PLAIN_ESTIMATE_KEYS], model_dir, m.longest_batch))

    if args.json:
        report = {"rows": args.rows, "max_steps": args.max_steps, "cpus": os.cpu_count(), "load_average": LOADS}
        Path(args.json).write_text(json.dumps(report | {"results": results}, indent=2) + "\n")
    print(f"\n{args.rows} rows of {DATA.name}, cutoff_len {CUTOFF_LEN}, batch {BATCH_SIZE}, LoRA r={LORA_RANK} all")
    print_table(results)
    print(
        "sup tok/s: supervised tokens over train s (Trainer.train() less checkpoint writes); peak: VmHWM of the "
        "row's process; weights: base weights as kept (estimate); last loss: last logged training loss; "
        f"same-rows: loss per answer token on the first {args.eval_rows} rows after training; estimate: "
        "tunesmith estimate at the longest batch the row met; x: ratio to plain."
    )
    print(describe_loads())
    print_targets(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
