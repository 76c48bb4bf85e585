"""The real SmolLM2-135M-Instruct on 2 processes with the shipped ZeRO-2 config: a few steps, as short as it can be."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed"),
]


def test_smollm2_lora_on_two_processes_with_zero2(tmp_path):
    output_dir = tmp_path / "smollm2_z2"
    environ = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "train",
            "examples/identity_lora.yaml",  # model_name_or_path: smollm2-135m-instruct, LoRA on every linear layer
            "name=Tunesmith",
            "author=the tunesmith team",
            "nproc_per_node=2",
            "deepspeed=ds_z2",
            "max_steps=3",
            "max_samples=12",
            "cutoff_len=128",
            "per_device_train_batch_size=2",
            "logging_steps=1",
            "save_steps=3",
            "plot_loss=false",
            f"output_dir={output_dir}",
        ],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "x 2 process(es) = 4 rows per step" in completed.stdout  # the world size Trainer saw
    losses = [
        json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in adapter.items())
    assert (output_dir / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's engine saved its ZeRO state
