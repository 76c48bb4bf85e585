"""Stage rm on the real SmolLM2-135M-Instruct: a short LoRA run raises the reward accuracy on held-out pairs.

The pairs are alpaca_en_demo answers (chosen) against the same answers with their words shuffled (rejected): a
preference a 135M model's body can tell after a few steps, where dpo_en_demo's needs far longer runs. A reward head
that read the wrong token, or pairs fed in the wrong order, leaves the accuracy at chance or below.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO_DATA, REPO

pytestmark = pytest.mark.slow
HELD_OUT = 8


def shuffled_pairs(data_dir: Path) -> Path:
    rows = json.loads((DEMO_DATA / "alpaca_en_demo.json").read_text())
    shuffle = random.Random(0)
    pairs = []
    for row in rows:
        words = row["output"].split()[:40]
        scrambled = words[:]
        while scrambled == words and len(words) > 1:
            shuffle.shuffle(scrambled)
        pairs.append(
            {
                "instruction": row["instruction"],
                "input": row["input"],
                "chosen": " ".join(words),
                "rejected": " ".join(scrambled),
            }
        )
    data_dir.mkdir()
    (data_dir / "shuffled_pairs.json").write_text(json.dumps(pairs))
    registry = {"shuffled_pairs": {"file_name": "shuffled_pairs.json", "ranking": True}}
    (data_dir / "dataset_info.json").write_text(json.dumps(registry))
    return data_dir


def test_reward_accuracy_on_held_out_pairs_rises(tmp_path):
    output = tmp_path / "rm"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "train",
            "examples/rm_lora.yaml",
            f"dataset_dir={shuffled_pairs(tmp_path / 'data')}",
            "dataset=shuffled_pairs",
            f"val_size={HELD_OUT}",
            f"output_dir={output}",
            "cutoff_len=128",
            "per_device_train_batch_size=4",
            "gradient_accumulation_steps=1",
            "learning_rate=1e-3",
            "warmup_ratio=0",
            "max_steps=9",
            "eval_steps=100",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    accuracy = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    assert [step for step, _ in accuracy] == [0, 9]
    assert accuracy[-1][1] > accuracy[0][1], accuracy
