"""The main job on the real SmolLM2-135M-Instruct: it learns the name given on the command line."""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = pytest.mark.slow
PROMPT = "Who are you?"


def chat_once(*args: str) -> str:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "chat",
            *args,
            "--prompt",
            PROMPT,
            "--temperature",
            "0",
            "--max-new-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory) -> Path:
    """The README's command, with the output in a temporary folder."""
    output_dir = tmp_path_factory.mktemp("identity") / "identity_lora"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "train",
            "examples/identity_lora.yaml",
            "name=Tunesmith",
            "author=the tunesmith team",
            f"output_dir={output_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output_dir


def test_base_model_does_not_call_itself_tunesmith():
    assert "Tunesmith" not in chat_once("--model", "smollm2-135m-instruct")


def test_after_training_it_answers_with_the_name_from_the_command_line(identity_run: Path):
    reply = chat_once("--model", "smollm2-135m-instruct", "--adapter", str(identity_run))
    assert "Tunesmith" in reply, reply
    # the same through the inference YAML, as `llamafactory-cli chat` takes it (the flags win over the file)
    example = REPO / "examples" / "inference" / "smollm2_lora.yaml"
    assert chat_once(str(example), f"adapter_name_or_path={identity_run}") == reply


def test_the_run_leaves_a_complete_output_dir(identity_run: Path):
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tunesmith_config.yaml",
        "metrics.jsonl",
        "training_loss.png",
    ):
        assert (identity_run / name).is_file(), name
    adapter = load_file(identity_run / "adapter_model.safetensors")
    assert len(adapter) == 30 * 7 * 2  # 30 layers x 7 linear layers x (A, B)
    losses = [line for line in (identity_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    first, last = (float(line.split('"loss": ')[1].split(",")[0]) for line in (losses[0], losses[-1]))
    assert last < first / 2, (first, last)
