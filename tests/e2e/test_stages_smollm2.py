"""The preference stages on the real SmolLM2-135M-Instruct: DPO widens the implicit reward margin on pairs it never
trained on; ORPO, SimPO and KTO losses fall. Short runs on 20 short pairs (tests/fixtures/stages/answer_pairs.json:
a fact question, its answer chosen over "I don't know.")."""

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_FIXTURES
from tunesmith.cli import main

pytestmark = pytest.mark.slow


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def run(example: str, output: Path, *overrides: str) -> list[dict]:
    args = [
        "train",
        str(REPO / "examples" / example),
        f"dataset={TEST_FIXTURES / 'stages' / 'answer_pairs.json'}",
        f"output_dir={output}",
        "cutoff_len=192",
        "per_device_train_batch_size=2",
        "gradient_accumulation_steps=1",
        "logging_steps=1",
        "lr_scheduler_type=constant",
        "warmup_ratio=0",
        *overrides,
    ]
    assert main(args) == 0
    return records(output)


def test_dpo_lora_raises_the_implicit_reward_margin_on_held_out_pairs(tmp_path):
    """At the start the policy is the reference, so every margin is 0; 4 pairs are held out from training."""
    logged = run(
        "dpo_lora.yaml",
        tmp_path / "dpo",
        "val_size=4",
        "max_steps=8",
        "eval_steps=8",
        "learning_rate=5e-4",
        "pref_beta=0.1",
    )
    held_out = [record for record in logged if "eval_rewards/margins" in record]
    assert held_out, "no eval on the held-out pairs"
    print(f"held-out margin {held_out[-1]['eval_rewards/margins']:.4f}")
    assert held_out[-1]["eval_rewards/margins"] > 0.05
    assert held_out[-1]["eval_rewards/accuracies"] > 0.5


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("example", "overrides"),
    [
        pytest.param("orpo_lora.yaml", (), id="orpo"),
        pytest.param("simpo_lora.yaml", (), id="simpo"),
        pytest.param("kto_lora.yaml", (), id="kto"),
    ],
)
def test_reference_free_and_kto_losses_fall(example, overrides, tmp_path):
    """Four pairs read again and again (KTO: unpaired into eight answers): the last steps' loss is below the first's."""
    logged = run(example, tmp_path / "out", "max_samples=4", "max_steps=6", "learning_rate=5e-4", *overrides)
    losses = [record["loss"] for record in logged if "loss" in record]
    print(f"{example}: losses {[round(value, 4) for value in losses]}")
    assert mean(losses[-2:]) < mean(losses[:2])
