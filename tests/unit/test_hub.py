"""Hub ids (`org/name`) resolve through the Hugging Face cache, offline: `train`, `chat` and `estimate` on a tiny
model placed in the cache layout, with HF_HUB_OFFLINE=1 and HF_HOME (or `cache_dir`) pointing at a temporary folder.

Each command runs in a subprocess, because huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import REPO, at_once
from tunesmith.errors import TunesmithError
from tunesmith.estimate.shape import ModelShape

HUB_ID = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(model_dir: Path, hub_cache: Path, repo_id: str = HUB_ID) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def tunesmith(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TUNESMITH_CACHE": str(home / "tunesmith")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, timeout=600, check=False, env=env
    )


@pytest.fixture
def hf_home(tmp_path: Path, tiny_model_dir: Path) -> Path:
    home = tmp_path / "hf-home"
    put_in_hub_cache(tiny_model_dir, home / "hub")
    return home


def test_train_chat_and_estimate_take_a_cached_hub_id_offline(tmp_path, hf_home, tiny_model_dir, identity_data):
    output = tmp_path / "out"
    train_args = (
        "train",
        f"model_name_or_path={HUB_ID}",
        f"dataset_dir={identity_data}",
        "dataset=identity",
        "name=Tunesmith",
        "author=the tunesmith team",
        f"output_dir={output}",
        "max_steps=2",
        "per_device_train_batch_size=2",
        "cutoff_len=64",
        "max_samples=8",
        "plot_loss=false",
    )
    chat_args = ("chat", "--model", HUB_ID, "--prompt", "Hi", "--max-new-tokens", "4")
    estimate_args = ("estimate", "--model", HUB_ID, "--device", "cpu", "--json")
    trained, chat, estimate = at_once(  # three independent commands on the cached model
        *(partial(tunesmith, *args, home=hf_home) for args in (train_args, chat_args, estimate_args))
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "gradient checkpointing: off (auto)" in trained.stdout  # auto read the cached snapshot's config.json
    assert (output / "adapter_model.safetensors").is_file()
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID

    assert chat.returncode == 0, chat.stderr[-3000:]
    assert f"model {HUB_ID} on cpu" in chat.stderr  # a random model's reply may be only whitespace

    assert estimate.returncode == 0, estimate.stderr[-3000:]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert json.loads(estimate.stdout)["params"] == ModelShape.from_config(config).total_params


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """In-process: huggingface_hub offline, its default cache an empty folder (both read at each call)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-hub-cache"))
    return tmp_path / "default-hub-cache"


def test_cache_dir_is_where_hub_models_are_looked_up(tmp_path, tiny_model_dir, offline_hub):
    """`cache_dir` plays transformers' role: the hub cache itself (cache_dir/models--org--name)."""
    from tunesmith.estimate.command import read_model_config
    from tunesmith.model.resolve import resolve_model

    cache_dir = tmp_path / "my-cache"
    snapshot = put_in_hub_cache(tiny_model_dir, cache_dir)
    assert resolve_model(HUB_ID, cache_dir=str(cache_dir)) == str(snapshot)
    assert read_model_config(HUB_ID, str(cache_dir))[1] == str(snapshot)
    with pytest.raises(TunesmithError, match=f"not .* in the Hugging Face cache {offline_hub}"):
        read_model_config(HUB_ID, None)


def test_an_uncached_hub_id_offline_is_one_line_that_says_what_to_do(offline_hub):
    from tunesmith.estimate.command import read_model_config
    from tunesmith.model.resolve import resolve_model

    for find in (resolve_model, read_model_config):
        with pytest.raises(TunesmithError) as error:
            find(HUB_ID, None)
        message = str(error.value)
        assert "\n" not in message and error.value.__cause__ is None
        assert message.startswith(f"hub model {HUB_ID} is not (completely) in the Hugging Face cache {offline_hub}")
        assert "HF_HUB_OFFLINE=1 forbids downloading it: run once without HF_HUB_OFFLINE" in message


def test_a_snapshot_with_pytorch_bin_weights_is_used_and_one_without_weights_is_refused(tmp_path, monkeypatch):
    """In-process: the offline switch and the endpoint are read from huggingface_hub.constants at each call."""
    from huggingface_hub import constants

    from tunesmith.errors import ModelError
    from tunesmith.model.resolve import resolve_model, with_hub_weights

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "pytorch_model.bin").write_bytes(b"weights")
    snapshot = put_in_hub_cache(source, tmp_path / "cache")
    assert resolve_model(HUB_ID, cache_dir=str(tmp_path / "cache")) == str(snapshot)

    assert with_hub_weights(str(snapshot)) == str(snapshot)

    (snapshot / "pytorch_model.bin").unlink()
    assert resolve_model(HUB_ID, cache_dir=str(tmp_path / "cache")) == str(snapshot)  # tokenizer and config: enough
    with pytest.raises(ModelError, match=r"has no \.safetensors or pytorch_model\*\.bin weights \(HF_HUB_OFFLINE"):
        with_hub_weights(str(snapshot))
    assert with_hub_weights(str(source)) == str(source)  # not a hub snapshot: as it is


def test_an_unreachable_hub_falls_back_to_the_cache_or_says_so(tmp_path, tiny_model_dir, monkeypatch):
    from huggingface_hub import constants

    from tunesmith.errors import ModelError
    from tunesmith.model.resolve import resolve_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    snapshot = put_in_hub_cache(tiny_model_dir, tmp_path / "cache")
    assert resolve_model(HUB_ID, cache_dir=str(tmp_path / "cache")) == str(snapshot)
    with pytest.raises(
        ModelError, match=r"cannot download hub model other-org/model: huggingface.co cannot be reached"
    ):
        resolve_model("other-org/model", cache_dir=str(tmp_path / "cache"))


def test_train_reads_the_data_before_a_hub_model_s_weights(tmp_path, tiny_model_dir, offline_hub, capsys):
    """Data before weights: a bad row fails the run before the weights would be downloaded."""
    from tunesmith.cli import main

    snapshot = put_in_hub_cache(tiny_model_dir, offline_hub)
    (snapshot / "model.safetensors").unlink()  # the weights are not here; config and tokenizer are
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "", "output": ""}\n')
    assert main(["train", f"model_name_or_path={HUB_ID}", f"dataset={rows}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert main(["data", "check", f"model_name_or_path={HUB_ID}", f"dataset={rows}"]) != 0
    printed = capsys.readouterr()
    shown = printed.out + printed.err
    assert shown.count("field `instruction`: missing or empty") >= 2, shown[-2000:]
    errors = [line for line in shown.splitlines() if line.startswith("error:")]
    assert errors and all("field `instruction`: missing or empty" in line for line in errors), shown[-2000:]
    assert "safetensors" not in shown and "download" not in shown.lower(), shown[-2000:]
