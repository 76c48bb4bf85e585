"""`tunesmith data check | preview | convert`, driven through the CLI as a person would."""

import json
import re
from pathlib import Path

import pytest

from tests.conftest import write_rows
from tunesmith.cli import main

GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}
CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def data_cli(tiny_model_dir: Path, action: str, *args: str) -> int:
    return main(["data", action, f"model_name_or_path={tiny_model_dir}", *args])


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BAD_FILES = {
    "missing output": (
        "alpaca.jsonl",
        lambda d: write_rows(d / "alpaca.jsonl", [GOOD, {"instruction": "x", "input": ""}]),
        r"alpaca.jsonl row 2, field `output`",
    ),
    "turn order": (
        "sharegpt.json",
        lambda d: write_text(
            d / "sharegpt.json",
            json.dumps([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}]),
        ),
        r"sharegpt.json row 1, field `conversations`",
    ),
    "image count": (
        "mm.jsonl",
        lambda d: (
            write_text(d / "a.jpg", "x"),
            write_text(d / "b.jpg", "x"),
            write_rows(
                d / "mm.jsonl",
                [
                    {
                        "messages": [
                            {"role": "user", "content": "<image>What?"},
                            {"role": "assistant", "content": "A cat"},
                        ],
                        "images": ["a.jpg", "b.jpg"],
                    }
                ],
            ),
        ),
        r"mm.jsonl row 1, field `images`",
    ),
    "non-string content": (
        "openai.jsonl",
        lambda d: write_rows(d / "openai.jsonl", [{"messages": [{"role": "user", "content": 5}, CHAT[1]]}]),
        r"openai.jsonl row 1, field `messages`",
    ),
    "empty file": ("empty.jsonl", lambda d: write_text(d / "empty.jsonl", ""), r"empty.jsonl"),
    "not JSON": ("notjson.json", lambda d: write_text(d / "notjson.json", "name,output\na,b\n"), r"notjson.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_check_reports_each_bad_row_with_file_row_and_field(case, tmp_path, tiny_model_dir, capsys):
    file_name, make, expected = BAD_FILES[case]
    make(tmp_path)
    code = data_cli(tiny_model_dir, "check", f"dataset={tmp_path / file_name}")
    output = capsys.readouterr()
    assert code != 0, output.out
    bad_lines = [line for line in (output.out + output.err).splitlines() if "bad row:" in line or "error:" in line]
    assert bad_lines, output.out
    assert any(re.search(expected, line) for line in bad_lines), bad_lines


def test_check_collects_every_bad_row_and_reports_lengths(tmp_path, tiny_model_dir, capsys):
    rows = [
        GOOD,
        {"instruction": "x"},
        GOOD,
        {"instruction": "y", "output": 3},
        {"instruction": "long " * 300, "output": "z"},
    ]
    path = write_rows(tmp_path / "mixed.jsonl", rows)
    assert data_cli(tiny_model_dir, "check", f"dataset={path}", "cutoff_len=64") == 1
    out = capsys.readouterr().out
    assert "5 rows, 2 bad" in out
    assert "mixed.jsonl row 2, field `output`" in out and "mixed.jsonl row 4, field `output`" in out
    assert "3 examples; tokens min" in out and "truncated at cutoff_len=64: 33.3%" in out
    assert "no supervised token: 33.3%" in out
    assert "1 dataset(s), 5 rows, 2 bad row(s)" in out


def test_check_a_whole_registry_reads_each_entry_for_its_stage(tiny_model_dir, capsys):
    from tests.conftest import DEMO_DATA

    registry = DEMO_DATA
    code = data_cli(tiny_model_dir, "check", f"dataset_dir={registry}", "max_samples=5", "name=T", "author=A")
    out = capsys.readouterr().out
    assert code == 1, out  # mllm_demo's rows have images, which this text-only model refuses
    bad = [line for line in out.splitlines() if "bad row:" in line]
    assert len(bad) == 5 and all("mllm_demo.json row" in line and "is text-only" in line for line in bad)
    assert "dpo_en_demo" in out and "stage dpo" in out and "stage kto" in out and "stage pt" in out


def test_preview_json_shows_ids_and_masked_labels(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    path = write_rows(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    assert data_cli(tiny_model_dir, "preview", f"dataset={path}", "-n", "2", "--json") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert record["input_ids"] == tokenizer.apply_chat_template(CHAT)["input_ids"]
    trained = [t for t, label in zip(record["input_ids"], record["labels"], strict=True) if label != -100]
    assert tokenizer.decode(trained) == "a<|im_end|>\n"


def test_preview_marks_trained_text(tmp_path, tiny_model_dir, capsys):
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    assert data_cli(tiny_model_dir, "preview", f"dataset={path}") == 0
    assert "assistant\n[[a<|im_end|>\n]]" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["openai", "sharegpt", "alpaca"])
def test_convert_round_trips(target, tmp_path, tiny_model_dir, capsys):
    rows = [
        {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief", "history": [["hi", "hello"]]},
        GOOD,
    ]
    source = write_rows(tmp_path / "source.jsonl", rows)
    converted = tmp_path / f"converted_{target}.jsonl"
    assert data_cli(tiny_model_dir, "convert", f"dataset={source}", "--to", target, "-o", str(converted)) == 0
    again = tmp_path / "again.jsonl"
    assert data_cli(tiny_model_dir, "convert", f"dataset={converted}", "--to", "openai", "-o", str(again)) == 0
    original = tmp_path / "original.jsonl"
    assert data_cli(tiny_model_dir, "convert", f"dataset={source}", "--to", "openai", "-o", str(original)) == 0
    assert again.read_text() == original.read_text()
    assert len(original.read_text().splitlines()) == 2


def test_convert_tool_calls_to_alpaca_is_refused(tmp_path, tiny_model_dir, capsys):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    row = {
        "messages": [
            CHAT[0],
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "1"},
            {"role": "assistant", "content": "one"},
        ]
    }
    path = write_rows(tmp_path / "tools.jsonl", [row])
    assert data_cli(tiny_model_dir, "convert", f"dataset={path}", "--to", "alpaca") == 1
    out = capsys.readouterr().out
    assert "cannot convert: " in out and "tools.jsonl row 1: tool calls and tool results have no alpaca form" in out
    assert '"instruction"' not in out  # nothing written
