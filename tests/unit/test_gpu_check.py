"""scripts/gpu_check.sh / bench/gpu_check.py, the parts a CPU can check: the plan for a machine, that every bench run is
a config tunesmith accepts, the numbers read from a run's metrics.jsonl, the table, the dry run, and the refusal
without CUDA."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import BenchRun, RunResult
from tests.conftest import REPO
from tunesmith.config import load_config

EVERYTHING = {"flash_attn", "liger_kernel", "bitsandbytes", "deepspeed"}


def names(plan) -> dict[str, str]:
    return {item.name: "run" if isinstance(item, BenchRun) else item.status for item in plan}


def test_the_plan_follows_the_gpus_and_packages_present():
    assert names(gpu_check.plan_runs(1, set())) == {
        "LoRA bf16, sdpa": "run",
        "LoRA bf16, FlashAttention-2": "skipped: no flash_attn",
        "LoRA bf16, Liger kernels": "skipped: no liger_kernel",
        "QLoRA 4-bit, bf16 compute": "skipped: no bitsandbytes",
        "LoRA bf16, 2-GPU DDP": "skipped: 1 GPU",
        "LoRA bf16, 2-GPU ZeRO-2": "skipped: 1 GPU",
    }
    full = gpu_check.plan_runs(2, EVERYTHING)
    assert all(isinstance(item, BenchRun) for item in full)
    assert {item.name: item.processes for item in full if item.processes == 2} == {
        "LoRA bf16, 2-GPU DDP": 2,
        "LoRA bf16, 2-GPU ZeRO-2": 2,
    }
    assert "skipped: no deepspeed" in names(gpu_check.plan_runs(2, EVERYTHING - {"deepspeed"})).values()


def test_every_bench_run_is_a_config_tunesmith_accepts(tmp_path):
    for run in gpu_check.plan_runs(2, EVERYTHING):
        command = gpu_check.train_command(run, "some/model", tmp_path / "run", steps=30, cutoff_len=1024, batch=4)
        assert command[1:4] == ["-m", "tunesmith", "train"]
        config = load_config(None, command[4:])  # every key exists and every value is valid
        assert config.train.nproc_per_node == run.processes and config.train.bf16 is True
        assert config.data.packing and config.train.max_steps == 30 and config.method.lora_rank == 16
        if "ZeRO-2" in run.name:
            assert json.loads(Path(config.train.deepspeed).read_text())["zero_optimization"]["stage"] == 2
        if "QLoRA" in run.name:
            assert config.model.quantization_bit == 4


def test_numbers_come_from_the_runs_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    logs = [  # the first interval is the warm-up and is left out of the median
        {"step": 6, "loss": 2.0, "tokens_per_second": 1000.0, "peak_memory_gib": 3.0},
        {"step": 12, "loss": 1.9, "tokens_per_second": 40000.0, "peak_memory_gib": 3.5},
        {"step": 18, "loss": 1.8, "tokens_per_second": 42000.0, "peak_memory_gib": 3.5},
        {"step": 24, "loss": 1.7, "tokens_per_second": 50000.0, "peak_memory_gib": 3.25},
        {"step": 24, "train_loss": 1.85},
    ]
    metrics.write_text("\n".join(json.dumps(record) for record in logs) + "\n")
    result = gpu_check.read_result("LoRA", metrics, compute_params=494_000_000, peak_tflops=989.0, gpus=2)
    assert result.status == "ok" and result.tokens_per_second == 42000.0 and result.peak_memory_gib == 3.5
    assert result.mfu == pytest.approx(6 * 494e6 * 42000.0 / (989e12 * 2))
    assert gpu_check.read_result("LoRA", metrics, None, 989.0, 1).mfu is None  # no model shape, no MFU


def test_compute_parameters_match_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # tied: the embedding matrix is a lookup as input and a matmul as the head, so it counts once
    assert model.config.tie_word_embeddings
    assert gpu_check.compute_params_of(tiny_model_dir) == sum(p.numel() for p in model.parameters())


def test_the_table_has_one_aligned_row_per_run():
    results = [
        RunResult("gpu-marked tests (tests/gpu)", "ok: 5 passed, 1 skipped"),
        RunResult("LoRA bf16, sdpa", "ok", 41234.5, 0.3812, 6.25),
        RunResult("LoRA bf16, 2-GPU DDP", "skipped: 1 GPU"),
    ]
    table = gpu_check.format_table(["title line"], results)
    lines = table.splitlines()
    assert lines[0] == "title line" and lines[2].startswith("| run ")
    rows = lines[4:]
    assert len(rows) == 3 and len({len(line) for line in lines[2:]}) == 1  # aligned
    assert "| 41,234 " in rows[1] and "| 38.1% " in rows[1] and "| 6.25 " in rows[1]
    assert rows[2].count("| - ") == 3


def test_dry_run_prints_the_plan(capsys, tmp_path):
    assert gpu_check.main(["--dry-run", "--model", "my/model", "--steps", "12", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "gpu-marked tests: python -m pytest -m gpu tests/gpu" in out
    assert "LoRA bf16, sdpa: tunesmith train model_name_or_path=my/model" in out and "max_steps=12" in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    with pytest.raises(SystemExit):
        gpu_check.parse_arguments(["--steps", "1"])
    assert "--steps 1: at least 2" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_script_refuses_to_start_without_cuda():
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "gpu_check needs a CUDA GPU" in done.stderr and "--dry-run" in done.stderr
