"""The command table, and bad input as a person meets it: a short message, a non-zero exit, no traceback."""

import importlib
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import at_once
from tunesmith.cli import COMMANDS, build_parser, main


def test_every_command_module_has_add_arguments_and_run():
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), name
        assert help_text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tunesmith" in capsys.readouterr().out


def test_version_prints_libraries(capsys):
    assert main(["version"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("tunesmith ") and "transformers " in output and "peft " in output


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )


def assert_clean_failure(completed: subprocess.CompletedProcess, expected: str) -> None:
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, completed.stderr
    assert expected in error_lines[0], error_lines[0]
    assert len(error_lines[0]) < 400  # one or two terminal lines


def test_bad_input_gives_a_clear_message(tmp_path: Path, tiny_model_dir: Path, identity_data: Path):
    def base(output: str) -> list[str]:
        return [
            f"model_name_or_path={tiny_model_dir}",
            f"dataset_dir={identity_data}",
            f"output_dir={tmp_path / output}",
        ]

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n')
    cases = {  # expected message: command line (independent commands, each with its own output_dir: run at once)
        "did you mean lora_rank": ("train", "dataset=identity", "lora_rnak=8"),
        "registered: alpaca_en_demo, ": ("train", *base("o1"), "dataset=alpaca_gpt5"),
        "broken.jsonl line 2: invalid JSON": ("train", *base("o2"), f"dataset={broken}"),
        "c_attn matches no linear layer of this model; its linear layers are: down_proj": (
            ("train", *base("o3"), "dataset=identity", "name=T", "author=A", "lora_target=c_attn")
        ),
        "config file missing.yaml does not exist": ("train", "missing.yaml"),
    }
    completed = at_once(*(partial(run_cli, *args) for args in cases.values()))
    for expected, result in zip(cases, completed, strict=True):
        assert_clean_failure(result, expected)


def test_hub_telemetry_is_off_unless_the_user_turned_it_on(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    assert main(["version"]) == 0
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")
    assert main(["version"]) == 0
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "0"
