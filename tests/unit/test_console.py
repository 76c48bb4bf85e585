"""A clean console: library notices that do not concern the run are hidden; `--verbose` shows them."""

import logging
import subprocess
import sys
import warnings
from functools import partial

import pytest

from tests.conftest import at_once
from tunesmith import console
from tunesmith.config import load_config
from tunesmith.train.command import libraries_in_use

# What every CPU run printed before (bitsandbytes, transformers via peft, DeepSpeed), none of it about the run.
NOISE = (
    "Failed to load CPU gemm_4bit_forward",
    "`is_gradient_checkpointing` is deprecated",
    "Setting accelerator to CPU",
    "FutureWarning",
    "DeprecationWarning",
)


def test_a_cpu_run_prints_only_our_lines_and_verbose_shows_the_libraries(tmp_path, tiny_model_dir, identity_data):
    def train(output: str, *more: str) -> str:
        command = [
            *(sys.executable, "-m", "tunesmith", "train", f"model_name_or_path={tiny_model_dir}", "dataset=identity"),
            *(f"dataset_dir={identity_data}", "name=T", "author=A", f"output_dir={tmp_path / output}", "max_steps=2"),
            *("max_samples=4", "cutoff_len=64", *more),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert completed.returncode == 0, completed.stderr
        return completed.stdout + completed.stderr

    quiet, loud = at_once(partial(train, "quiet"), partial(train, "loud", "--verbose"))  # two runs, two output_dirs
    assert "Done: 2 steps" in quiet
    assert [text for text in NOISE if text in quiet] == []
    assert "Done: 2 steps" in loud
    assert [text for text in NOISE if text in loud]  # which ones depends on the machine and the libraries


@pytest.fixture
def restored_loggers():
    yield
    for name in console.QUIET_LOGGERS:
        console.show_library_warnings(name)


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("logger_name", ["bitsandbytes.backends.cpu.ops", "DeepSpeed"])
def test_library_warnings_are_hidden_until_the_run_uses_the_library(logger_name, restored_loggers):
    logger = logging.getLogger(logger_name)  # DeepSpeed's does not propagate once imported: collect right there
    collected = Collected()
    logger.addHandler(collected)
    try:
        console.configure(verbose=False)
        logger.warning("a notice")
        logger.error("a failure")
        assert collected.messages == ["a failure"]
        console.show_library_warnings(logger_name.split(".")[0])
        logger.warning("a notice that matters now")
        assert collected.messages == ["a failure", "a notice that matters now"]
    finally:
        logger.removeHandler(collected)


def test_deprecations_are_hidden_unless_verbose(restored_loggers):
    with warnings.catch_warnings(record=True) as caught:
        console.configure(verbose=False)
        warnings.warn("old name", FutureWarning, stacklevel=1)
        warnings.warn("a user warning", UserWarning, stacklevel=1)
        console.configure(verbose=True)
        warnings.warn("old name, shown", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["a user warning", "old name, shown"]


def test_the_libraries_a_run_uses_are_the_ones_heard():
    assert libraries_in_use(load_config(None, ["dataset=x"])) == []
    assert libraries_in_use(load_config(None, ["dataset=x", "quantization_bit=4"])) == ["bitsandbytes"]
    assert libraries_in_use(load_config(None, ["dataset=x", "optim=paged_adamw_8bit"])) == ["bitsandbytes"]
    assert libraries_in_use(load_config(None, ["dataset=x", "deepspeed=ds_z2"])) == ["DeepSpeed"]


def test_verbose_reaches_the_processes_torchrun_starts(monkeypatch):
    from tunesmith.cli import main
    from tunesmith.distributed import launch

    commands = []
    monkeypatch.setattr(launch, "run_torchrun", lambda command: commands.append(command) or 0)
    assert main(["train", "dataset=x", "nproc_per_node=2"]) == 0
    assert main(["train", "dataset=x", "nproc_per_node=2", "--verbose"]) == 0
    assert [command[-1] for command in commands] == ["nproc_per_node=2", "--verbose"]
