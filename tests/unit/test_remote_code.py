"""`trust_remote_code`: a model that needs its own Python code is refused unless trusted, and when trusted, one line
says whose code runs, before anything is loaded."""

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import at_once
from tunesmith.errors import ModelError
from tunesmith.model import load
from tunesmith.model.load import check_remote_code, load_model, load_tokenizer


def with_auto_map(tiny_model_dir: Path, target: Path, model_type: str) -> Path:
    """The tiny model, its config naming classes in modeling_custom.py / configuration_custom.py."""
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(autouse=True)
def announce_again(monkeypatch):
    monkeypatch.setattr(load, "_announced_remote_code", set())


def test_code_the_model_needs_is_refused_unless_trusted(tiny_model_dir, tmp_path):
    custom = with_auto_map(tiny_model_dir, tmp_path / "custom", model_type="tunesmith_custom")
    expected = f"{custom} needs its own Python code to load (configuration_custom.py, modeling_custom.py); read it"
    with pytest.raises(ModelError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_tokenizer(str(custom))
    with pytest.raises(ModelError, match="if you trust it, set trust_remote_code: true"):
        load_model(str(custom), dtype=None)


def test_trusted_code_is_announced_once_with_the_files_that_run(tiny_model_dir, tmp_path, capsys):
    custom = with_auto_map(tiny_model_dir, tmp_path / "custom", model_type="tunesmith_custom")
    check_remote_code(str(custom), trust_remote_code=True)
    check_remote_code(str(custom), trust_remote_code=True)  # the model after the tokenizer: said once
    assert capsys.readouterr().out == (
        f"trust_remote_code: true: Python code from {custom} will run on this machine: "
        "configuration_custom.py, modeling_custom.py\n"
    )
    check_remote_code("org/not-downloaded", trust_remote_code=True)
    assert "Python code from org/not-downloaded will run on this machine if it ships any" in capsys.readouterr().out


def test_no_word_where_no_code_runs(tiny_model_dir, tmp_path, capsys):
    check_remote_code(str(tiny_model_dir), trust_remote_code=True)  # ships no code: none runs
    # transformers has its own class for a llama, so untrusted code is not needed and not run
    known = with_auto_map(tiny_model_dir, tmp_path / "known", model_type="llama")
    check_remote_code(str(known), trust_remote_code=False)
    assert capsys.readouterr().out == ""


CUSTOM_TOKENIZER = """
from transformers.tokenization_utils_tokenizers import TokenizersBackend

print("the model's own tokenizer code is running")


class CustomTokenizer(TokenizersBackend):
    pass
"""


def test_train_says_whose_code_runs_before_it_runs(tiny_model_dir, identity_data, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    (custom / "tokenization_custom.py").write_text(CUSTOM_TOKENIZER)
    tokenizer_config = json.loads((custom / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    tokenizer_config["tokenizer_class"] = "CustomTokenizer"
    (custom / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    def train(name: str, *more: str) -> subprocess.CompletedProcess:
        args = [
            *("train", f"model_name_or_path={custom}", f"dataset_dir={identity_data}", "dataset=identity", "name=T"),
            *("author=A", f"output_dir={tmp_path / name}", "max_steps=1", "max_samples=2", "cutoff_len=64"),
        ]
        # where transformers copies the code: each run its own, as each its own output_dir (the two run at once)
        environment = os.environ | {"HF_MODULES_CACHE": str(tmp_path / f"modules-{name}")}
        command = [sys.executable, "-m", "tunesmith", *args, *more]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, check=False)

    refused, trusted = at_once(partial(train, "refused"), partial(train, "trusted", "trust_remote_code=true"))
    assert refused.returncode == 2, refused.stderr
    assert f"error: {custom} needs its own Python code to load (tokenization_custom.py)" in refused.stderr
    assert "own tokenizer code is running" not in refused.stdout

    assert trusted.returncode == 0, trusted.stderr
    line = f"trust_remote_code: true: Python code from {custom} will run on this machine: tokenization_custom.py"
    assert trusted.stdout.count(line) == 1
    assert trusted.stdout.index(line) < trusted.stdout.index("the model's own tokenizer code is running")
