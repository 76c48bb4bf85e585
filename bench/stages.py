"""DPO on SmolLM2-135M-Instruct, LoRA, CPU: tunesmith against the same run written directly against TRL's
DPOTrainer as its documentation shows; then full DPO with and without precompute_ref_log_probs; with --per-stage,
every stage's example for a few steps.

    python -m bench.stages [--steps 8] [--cutoff-len 512] [--per-stage]

Each run is its own process (peak resident memory is the process's own; tunesmith runs as `tunesmith train`, which
on a CPU re-executes itself with tcmalloc where installed); steps/s is Trainer's train_runtime over the steps
(precompute_ref_log_probs's pass over the data comes before training and is not in it). Both LoRA runs use the same
pairs (LLaMA-Factory's dpo_en_demo), batch, steps, learning rate, LoRA shape, precision and max length; TRL renders
and tokenizes the pairs itself, tunesmith reads its data step's ids.

Two more runs say where the difference comes from: tunesmith with `pairs_per_forward: 2` (the whole batch in one
pass, as TRL runs it) and TRL with the batch split into passes by hand (batch 1, accumulation 2: the same gradient).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.runs import REPO, converted_model_dir, describe_loads, run_logged

DATA = REPO / "tests" / "fixtures" / "demo_data"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def tunesmith_child(
    output: str, steps: int, cutoff_len: int, *overrides: str, example: str = "dpo_lora", finetuning_type: str = "lora"
) -> dict:
    """`tunesmith train` as a user runs it (its own process: on a CPU it re-executes with tcmalloc where installed)."""
    config = REPO / "examples" / f"{example}.yaml"
    if finetuning_type != "lora":  # the example without its LoRA keys, which full training refuses
        from tests.conftest import example_for

        config = example_for(f"{example}.yaml", finetuning_type, Path(output).parent)
    args = [
        "train",
        str(config),
        f"dataset_dir={DATA}",
        f"output_dir={output}",
        f"max_steps={steps}",
        f"cutoff_len={cutoff_len}",
        "gradient_accumulation_steps=1",
        "logging_steps=1",
        "save_steps=100000",
        "learning_rate=5e-5",
        "lr_scheduler_type=constant",
        "warmup_ratio=0",
        *overrides,
    ]
    subprocess.run([sys.executable, "-m", "tunesmith", *args], cwd=REPO, check=True)
    logged = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    summary = next(record for record in reversed(logged) if "train_loss" in record)  # the run's last entry
    return {
        "runtime": summary["train_runtime"],
        "loss": [r["loss"] for r in logged if "loss" in r][-1],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def trl_child(output: str, steps: int, cutoff_len: int, batch: int = 2, accumulation: int = 1) -> dict:
    """TRL's documented DPO + LoRA script, with the settings of examples/dpo_lora.yaml as the bench runs it."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunesmith.model.precision import choose_precision

    model_dir = str(converted_model_dir())
    rows = []
    for row in json.loads((DATA / "dpo_en_demo.json").read_text(encoding="utf-8")):
        prompt = [{"role": ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
            }
        )
    precision = choose_precision(None, False, False, "lora")  # the precision tunesmith chooses on this machine
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=precision.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=output,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=100000,
        max_length=cutoff_len,
        bf16=precision.bf16,
        gradient_checkpointing=False,  # tunesmith's auto choice on this machine (the estimate says it fits)
        report_to=[],
        use_cpu=True,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    result = trainer.train()
    return {
        "runtime": result.metrics["train_runtime"],
        "loss": trainer.state.log_history[-2]["loss"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


DPO_RUNS = {
    "trl": ("TRL DPOTrainer + peft, as documented", lambda o, n, c: trl_child(o, n, c)),
    "trl-passes": ("  the same, batch split by hand (1 x 2 accumulation)", lambda o, n, c: trl_child(o, n, c, 1, 2)),
    "ours": ("tunesmith dpo, LoRA", lambda o, n, c: tunesmith_child(o, n, c)),
    "ours-one-pass": (
        "  the same, pairs_per_forward: 2 (TRL's one pass)",
        lambda o, n, c: tunesmith_child(o, n, c, "pairs_per_forward=2"),
    ),
    "full": (
        "tunesmith dpo, full, second copy as reference",
        lambda o, n, c: tunesmith_child(o, n, c, finetuning_type="full"),
    ),
    "full-precompute": (
        "tunesmith dpo, full, precompute_ref_log_probs",
        lambda o, n, c: tunesmith_child(o, n, c, "precompute_ref_log_probs=true", finetuning_type="full"),
    ),
}
# every stage's example, LoRA, as shipped but for the steps, cutoff_len and accumulation
STAGE_EXAMPLES = ("pt_c4", "rm_lora", "dpo_lora", "orpo_lora", "simpo_lora", "kto_lora", "grpo_lora")


def child(kind: str, output: str, steps: int, cutoff_len: int, result_path: str) -> None:
    start = time.perf_counter()
    if kind in DPO_RUNS:
        result = DPO_RUNS[kind][1](output, steps, cutoff_len)
    else:
        result = tunesmith_child(output, steps, cutoff_len, example=kind)
    result |= {"steps_per_second": steps / result["runtime"], "process_seconds": time.perf_counter() - start}
    Path(result_path).write_text(json.dumps(result))


def measure(kind: str, work: Path, steps: int, cutoff_len: int) -> dict:
    result_path = work / f"{kind}.json"
    command = [sys.executable, "-m", "bench.stages", "--child", kind, "--output", str(work / kind)]
    command += ["--result", str(result_path), "--steps", str(steps), "--cutoff-len", str(cutoff_len)]
    run_logged(kind, command)
    return json.loads(result_path.read_text())


def print_table(title: str, labels: dict[str, str], results: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'run':<55}{'steps/s':>9}{'peak RSS MiB':>14}{'last loss':>11}")
    for kind, label in labels.items():
        r = results[kind]
        print(f"{label:<55}{r['steps_per_second']:>9.3f}{r['peak_rss_mib']:>14.0f}{r['loss']:>11.4f}")


def ratio(results: dict[str, dict], ours: str, theirs: str) -> str:
    a, b = results[ours], results[theirs]
    speed, memory = a["steps_per_second"] / b["steps_per_second"], a["peak_rss_mib"] / b["peak_rss_mib"]
    return f"{ours} / {theirs}: speed x{speed:.2f}, peak memory x{memory:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--per-stage", action="store_true", help="also run every stage's example")
    parser.add_argument("--work-dir", default="/tmp/tunesmith-bench-stages")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.output, args.steps, args.cutoff_len, args.result)
        return
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = {kind: measure(kind, work, args.steps, args.cutoff_len) for kind in DPO_RUNS}
    title = f"DPO on SmolLM2-135M-Instruct, {args.steps} steps of 2 pairs, cutoff_len {args.cutoff_len}, CPU"
    print_table(title, {kind: label for kind, (label, _) in DPO_RUNS.items()}, results)
    for ours, theirs in (
        ("ours", "trl"),
        ("ours", "trl-passes"),
        ("ours-one-pass", "trl"),
        ("full-precompute", "full"),
    ):
        print(ratio(results, ours, theirs))
    if args.per_stage:
        stages = {example: measure(example, work, args.steps, args.cutoff_len) for example in STAGE_EXAMPLES}
        title = f"each stage's example, LoRA, {args.steps} steps, cutoff_len {args.cutoff_len}, no accumulation, CPU"
        print_table(title, {example: f"tunesmith train examples/{example}.yaml" for example in STAGE_EXAMPLES}, stages)
    print(describe_loads())
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
