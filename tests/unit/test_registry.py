"""dataset_info.json: every entry of LLaMA-Factory's demo registry whose files are here loads and encodes for its
stage; entry fields, split syntax, folders and hub entries."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.conftest import DEMO_DATA, write_rows
from tunesmith.config import load_config
from tunesmith.data.dataset import RowReader, load_data
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.files import read_rows
from tunesmith.data.registry import resolve_datasets
from tunesmith.data.selection import Split, parse_split
from tunesmith.errors import DataError

LLAMAFACTORY = DEMO_DATA
REGISTRY = json.loads((LLAMAFACTORY / "dataset_info.json").read_text(encoding="utf-8"))


def files_present(entry: dict) -> bool:
    """A local entry whose data file is here. mllm_demo counts: its images are here (its rows name no video or
    audio); the video and audio samples' own files were not copied."""
    return "file_name" in entry and (LLAMAFACTORY / entry["file_name"]).exists()


PRESENT = sorted(name for name, entry in REGISTRY.items() if files_present(entry))


def stage_for(entry: dict) -> str:
    columns = entry.get("columns", {})
    if entry.get("ranking"):
        return "dpo"
    if "kto_tag" in columns:
        return "kto"
    if set(columns) == {"prompt"}:  # a text column only: pre-training text
        return "pt"
    return "sft"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_entries_with_files_here_are_the_ones_expected():
    assert PRESENT == [
        "alpaca_en_demo",
        "alpaca_zh_demo",
        "c4_demo",
        "dpo_en_demo",
        "dpo_zh_demo",
        "glaive_toolcall_en_demo",
        "glaive_toolcall_zh_demo",
        "identity",
        "kto_en_demo",
        "mllm_demo",
        "wiki_demo",
    ]
    local_but_absent = sorted(name for name, entry in REGISTRY.items() if "file_name" in entry)
    assert sorted(set(local_but_absent) - set(PRESENT)) == [
        "mllm_audio_demo",
        "mllm_video_audio_demo",
        "mllm_video_demo",
    ]


@pytest.mark.parametrize("name", PRESENT)
def test_every_entry_with_its_files_here_loads_and_encodes_for_its_stage(name, tokenizer, tmp_path):
    stage = stage_for(REGISTRY[name])
    (spec,) = resolve_datasets([name], str(LLAMAFACTORY))
    assert spec.natural_stage == stage  # what `tunesmith data check` uses for a whole registry
    # Every row converts (cheap); a few are encoded (the slow part).
    reader = RowReader(spec, stage, None, {"name": "Tuna", "author": "Smith"})
    examples = list(reader.examples(reader.rows()))
    assert len(examples) == sum(1 for file in spec.files for _ in read_rows(file))
    overrides = [f"dataset_dir={LLAMAFACTORY}", f"dataset={name}", "max_samples=3", "cutoff_len=1024"]
    config = load_config(None, [*overrides, "name=Tuna", "author=Smith"]).data
    if name == "mllm_demo":  # a text-only model refuses image rows; tests/unit/test_multimodal.py trains on them
        with pytest.raises(DataError, match=r"mllm_demo\.json row 1: has images, but the model .* is text-only"):
            load_data(config, tokenizer, tokenizer.chat_template, stage=stage, seed=0, cache_dir=str(tmp_path))
        return
    data = load_data(config, tokenizer, tokenizer.chat_template, stage=stage, seed=0, cache_dir=str(tmp_path))

    assert len(data.train) >= 3 and data.eval is None
    prefixes = ["chosen_", "rejected_"] if stage == "dpo" else [""]
    for row in data.train:
        for prefix in prefixes:
            ids, labels = row[f"{prefix}input_ids"], row[f"{prefix}labels"]
            assert len(ids) == len(labels) <= 1024
            assert any(label != IGNORE_INDEX for label in labels)
            if stage == "pt":
                assert labels == ids
            else:
                assert labels[0] == IGNORE_INDEX  # the prompt is never trained
    if stage == "kto":
        assert {type(row["kto_tag"]) for row in data.train} == {bool}
    if name.startswith("glaive"):
        assert any(m.get("tool_calls") for e in examples for m in e.messages) and any(e.tools for e in examples)


def test_glaive_tool_calls_are_supervised_even_with_a_template_that_ignores_them(tokenizer, tmp_path):
    """SmolLM2's template writes only role and content: the call must still be in the trained text."""
    config = load_config(None, [f"dataset_dir={LLAMAFACTORY}", "dataset=glaive_toolcall_en_demo", "max_samples=1"])
    data = load_data(config.data, tokenizer, tokenizer.chat_template, seed=0, cache_dir=str(tmp_path))
    row = data.train[0]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label >= 0])
    assert '{"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}' in trained
    assert "You have access to the following tools:" in tokenizer.decode(row["input_ids"])


def test_unknown_entry_fields_and_columns_are_errors(tmp_path: Path):
    write_rows(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    registry = {
        "typo": {"file_name": "a.jsonl", "colums": {}},
        "badcol": {"file_name": "a.jsonl", "columns": {"x": "y"}},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    with pytest.raises(DataError, match=r"dataset_info.json entry 'typo': colums: Extra inputs .*known fields are"):
        resolve_datasets(["typo"], str(tmp_path))
    with pytest.raises(DataError, match=r"entry 'badcol': columns.x: Extra inputs are not permitted"):
        resolve_datasets(["badcol"], str(tmp_path))


def test_split_syntax():
    assert parse_split("train", "x") == Split("train")
    assert parse_split("train[:2000]", "x").bounds(None) == (0, 2000)
    assert parse_split("train[10%:]", "x").bounds(50) == (5, None)
    assert parse_split("train[10:20]", "x").bounds(None) == (10, 20)
    assert parse_split("train[-5:]", "x").bounds(12) == (7, None)
    assert parse_split("train[:33%]", "x").bounds(10) == (0, 3)
    assert parse_split("train[10%:]", "x").needs_length and not parse_split("train[:7]", "x").needs_length
    for bad in ("train[", "train[1:2:3]", "train[x:]", "train[:150%]"):
        with pytest.raises(DataError, match=r"x: split .* percentage|x: split .* is not valid; use a split name"):
            parse_split(bad, "x")


def test_local_entries_have_only_the_train_split_and_folders_read_every_file(tmp_path: Path):
    (tmp_path / "parts").mkdir()
    write_rows(tmp_path / "parts" / "1.jsonl", [{"instruction": "q1", "output": "a1"}])
    write_rows(tmp_path / "parts" / "2.jsonl", [{"instruction": "q2", "output": "a2"}])
    registry = {"parts": {"file_name": "parts"}, "test": {"file_name": "parts", "split": "test"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    (spec,) = resolve_datasets(["parts"], str(tmp_path))
    assert [path.name for path in spec.files] == ["1.jsonl", "2.jsonl"]
    with pytest.raises(DataError, match=r"entry 'test': split 'test'; a local file has only the split `train`"):
        resolve_datasets(["test"], str(tmp_path))


def test_hub_entries_load_through_datasets_and_say_when_there_is_no_network(tmp_path, tokenizer, monkeypatch):
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'llamafactory/alpaca_en' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    registry = {"hub": {"hf_hub_url": "llamafactory/alpaca_en", "subset": "en", "split": "train[:10]"}}
    registry["modelscope"] = {"ms_hub_url": "llamafactory/alpaca_en"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    config = load_config(None, [f"dataset_dir={tmp_path}", "dataset=hub"]).data
    with pytest.raises(DataError, match=r"dataset 'hub': cannot download llamafactory/alpaca_en .*no network"):
        load_data(config, tokenizer, tokenizer.chat_template, cache_dir=str(tmp_path))
    assert calls == [(("llamafactory/alpaca_en", "en"), {"data_dir": None, "split": "train[:10]", "streaming": False})]
    with pytest.raises(DataError, match=r"entry 'modelscope': no `file_name` or `hf_hub_url` \(ms_hub_url: "):
        resolve_datasets(["modelscope"], str(tmp_path))
