"""A user's mistake is one clear line; our own bug keeps its traceback and asks for a report. Each handler catches
the errors it names, never everything: a bug behind it must surface."""

import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.cli import BUG_NOTE, main
from tunesmith.errors import ConfigError, DataError, ModelError


def test_a_bug_keeps_its_traceback_and_ends_with_a_request_to_report_it():
    crash = (
        "import sys\n"
        "from tunesmith import cli, version_command\n"
        "def run(args):\n"
        "    return {}['missing']\n"
        "version_command.run = run\n"
        "sys.exit(cli.main(['version']))\n"
    )
    completed = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "KeyError: 'missing'" in completed.stderr
    assert lines[-1] == BUG_NOTE and "tunesmith version" in BUG_NOTE


def test_a_users_mistake_is_one_line_with_status_2(capsys):
    assert main(["train", "dataset=x", "learning_rate=[1,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: `learning_rate=[1,2` is not valid YAML")
    assert BUG_NOTE not in err


# --- tool support: a template that refuses falls back, one that is broken says so ---------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


RENDERS_ALL = (
    "{% for m in messages %}{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
)


def test_tool_support_falls_back_only_for_templates_that_cannot_render_tools(tokenizer):
    from tunesmith.data.stages import tool_support

    assert tool_support(tokenizer, RENDERS_ALL) == (True, True)
    assert tool_support(tokenizer, "{% for m in messages %}{{ m.content }}{% endfor %}") == (False, False)
    refusing = "{% if tools or messages[-1].tool_calls %}{{ raise_exception('no tools here') }}{% endif %}x"
    assert tool_support(tokenizer, refusing) == (False, False)
    with pytest.raises(ConfigError, match=r"the chat template does not compile: .* \(line 1\)"):
        tool_support(tokenizer, "{% for m in messages %}{{ m.content }")


def test_a_python_error_inside_a_template_is_not_taken_for_no_tool_support(tokenizer):
    from tunesmith.data.stages import tool_support

    with pytest.raises(TypeError):  # formerly swallowed: the tool calls were quietly rewritten into the text
        tool_support(tokenizer, "{{ messages | length + 'x' }}")


# --- the hub, the cache and GGUF files: their own errors become ours, anything else surfaces -----------------------


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (ConnectionError("offline"), "no network connection"),
        (FileNotFoundError("no such dataset"), "FileNotFoundError: no such dataset"),
        (ValueError('Unknown split "tain"'), 'ValueError: Unknown split "tain"'),
    ],
)
def test_hub_dataset_errors_name_the_dataset(monkeypatch, tmp_path: Path, raised, expected):
    import json

    import datasets

    from tunesmith.data.dataset import load_hub
    from tunesmith.data.registry import resolve_datasets

    def load_dataset(*args, **kwargs):
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"hub_set": {"hf_hub_url": "org/hub_set"}}))
    (spec,) = resolve_datasets(["hub_set"], str(tmp_path))
    with pytest.raises(DataError, match=f"dataset 'hub_set': .*{expected}"):
        load_hub(spec, streaming=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: None.split)
    with pytest.raises(AttributeError):  # a bug is not "loading from the hub failed"
        load_hub(spec, streaming=False)


def test_a_damaged_cache_entry_is_rebuilt_and_a_bug_is_not(tmp_path: Path, monkeypatch, capsys):
    import datasets
    from datasets import Dataset

    from tunesmith.data.cache import load_entry, save_entry

    entry = tmp_path / "entry"
    assert save_entry(Dataset.from_dict({"x": list(range(50))}), {"rows": 50}, entry, replace=False)
    assert load_entry(entry)[1] == {"rows": 50}
    arrow = next(entry.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:40])  # a disk that filled up while writing
    assert load_entry(entry) is None
    assert f"ignoring the unreadable cache entry {entry}" in capsys.readouterr().out

    monkeypatch.setattr(datasets, "load_from_disk", lambda path: None.split)
    with pytest.raises(AttributeError):
        load_entry(entry)


@pytest.mark.parametrize("content", [b"x" * 5000, b"GGUF\x03\x00\x00\x00" + b"\x00" * 20, b""])
def test_a_broken_gguf_file_is_a_model_error(tmp_path: Path, content: bytes):
    from tunesmith.model.gguf import convert_gguf

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(content)
    with pytest.raises(ModelError, match=f"cannot read GGUF file {broken}: "):
        convert_gguf(broken, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
