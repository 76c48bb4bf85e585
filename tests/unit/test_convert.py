"""`tunesmith data convert`: converting A → B → A gives back the same examples, or the row is refused by name.

Two properties: every example a reader can produce (drawn by hypothesis) survives each format that can hold it and
is refused by the others; and each of LLaMA-Factory's demo sets (cut down in tests/fixtures/demo_data) goes through
every format and back unchanged.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO
from tunesmith.cli import main
from tunesmith.data.command import FORMATS, reading_stage, to_format
from tunesmith.data.dataset import RowReader
from tunesmith.data.formats import Example, Row, detect_format, row_to_example
from tunesmith.data.registry import load_registry, resolve_datasets
from tunesmith.errors import DataError

DEMO = REPO / "tests" / "fixtures" / "demo_data"
PLACEHOLDERS = {"name": "Tunesmith", "author": "us"}


def content(example: Example) -> dict:
    """Everything an example holds but where it was read from."""
    return {key: value for key, value in asdict(example).items() if key != "where"}


# --- any example --------------------------------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
names = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=8)
arguments = st.dictionaries(names, st.integers() | texts | st.lists(texts, max_size=2), max_size=3)


@st.composite
def tool_calls(draw) -> list[dict]:
    calls = []
    for _ in range(draw(st.integers(1, 3))):
        call = {"type": "function", "function": {"name": draw(names), "arguments": json.dumps(draw(arguments))}}
        if draw(st.booleans()):
            call["id"] = draw(names)
        calls.append(call)
    # the readers keep arguments in json.dumps' spelling
    for call in calls:
        call["function"]["arguments"] = json.dumps(json.loads(call["function"]["arguments"]), ensure_ascii=False)
    return calls


@st.composite
def answers(draw) -> dict:
    message = {"role": "assistant", "content": draw(texts)}
    if draw(st.integers(0, 3)) == 0:
        message["tool_calls"] = draw(tool_calls())
    return message


@st.composite
def examples(draw) -> Example:
    """What the readers produce: an optional system message, then prompt turns (a user message, or tool results
    after a tool call) alternating with answers; a preference pair ends on a prompt and holds its two answers."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(texts.filter(bool))})
    for turn in range(draw(st.integers(1, 3))):
        called = turn > 0 and messages[-1].get("tool_calls")
        if called and draw(st.booleans()):
            messages += [{"role": "tool", "content": draw(texts)} for _ in range(draw(st.integers(1, 2)))]
        else:
            messages.append({"role": "user", "content": draw(texts)})
        messages.append(draw(answers()))
    example = Example("generated row 1", messages)
    if draw(st.booleans()):
        example.messages = messages[:-1]
        example.chosen, example.rejected = draw(answers()), draw(answers())
    if draw(st.booleans()):
        function = {"name": draw(names), "description": draw(texts), "parameters": {"type": "object"}}
        example.tools = [{"type": "function", "function": function}]
    example.kto_tag = draw(st.none() | st.booleans())
    return example


def refusal(example: Example, target: str) -> str | None:
    """What `target` cannot hold in this example, if anything: the limits of each format, stated once here."""
    answers = [m for m in (example.chosen, example.rejected) if m is not None]
    everything = [*example.messages, *answers]
    if target == "sharegpt" and any(m.get("tool_calls") and m["content"] for m in everything):
        return "both text and tool calls"
    if target == "alpaca":
        if any(m["role"] == "tool" or m.get("tool_calls") for m in everything):
            return "tool calls and tool results have no alpaca form"
        prompt = [m for m in example.messages if m["role"] != "system"][-1 if answers else -2]
        if not prompt["content"]:
            return "non-empty last user message"
        if not all(m["content"] for m in answers or example.messages[-1:]):
            return "empty answer"
    return None


def read_back(row: dict) -> Example:
    row = json.loads(json.dumps(row, ensure_ascii=False))  # as a file holds it
    raw = Row(row, "converted", 1)
    return row_to_example(raw, detect_format(raw, "chat"), "chat")


@settings(max_examples=300, deadline=None)
@given(examples(), st.sampled_from(FORMATS))
def test_every_example_survives_each_format_that_can_hold_it(example, target):
    expected = refusal(example, target)
    if expected is None:
        assert content(read_back(to_format(example, target))) == content(example)
    else:
        with pytest.raises(DataError, match=f"^{example.where}.*{expected}"):
            to_format(example, target)


# --- LLaMA-Factory's demo sets ------------------------------------------------------------------------------------

DEMO_SETS = sorted(  # the registry names more sets than the fixtures hold (mllm audio and video)
    name for name, entry in load_registry(DEMO).items() if "file_name" in entry and (DEMO / entry["file_name"]).exists()
)


def read_examples(name: str, dataset_dir: Path) -> list[dict]:
    (spec,) = resolve_datasets([name], str(dataset_dir))
    reader = RowReader(spec, reading_stage(spec), None, PLACEHOLDERS)
    return [content(example) for example in reader.examples(reader.rows())]


def write_as(examples: list[Example], target: str, path: Path) -> Path:
    path.write_text("".join(json.dumps(to_format(e, target), ensure_ascii=False) + "\n" for e in examples), "utf-8")
    return path


def source_format(name: str) -> str:
    entry = load_registry(DEMO)[name]
    if entry.get("formatting") != "sharegpt":
        return "alpaca"
    return "openai" if entry.get("tags", {}).get("role_tag") == "role" else "sharegpt"


@pytest.mark.parametrize("target", FORMATS)
@pytest.mark.parametrize("name", DEMO_SETS)
def test_demo_sets_convert_there_and_back_unchanged(name, target, tmp_path):
    original = read_examples(name, DEMO)
    assert len(original) >= 3
    examples = [Example("", **fields) for fields in original]
    if name.startswith("glaive_toolcall") and target == "alpaca":  # the one pair a format cannot hold
        with pytest.raises(DataError, match="tool calls and tool results have no alpaca form"):
            write_as(examples, target, tmp_path / "b.jsonl")
        return
    there = write_as(examples, target, tmp_path / f"{target}.jsonl")
    assert read_examples(str(there), tmp_path) == original
    back = write_as(examples, source_format(name), tmp_path / "back.jsonl")
    assert read_examples(str(back), tmp_path) == original


# --- through the command ------------------------------------------------------------------------------------------


def convert_cli(tiny_model_dir: Path, *args: str) -> int:
    return main(["data", "convert", f"model_name_or_path={tiny_model_dir}", *args])


def test_convert_keeps_preference_pairs_of_single_turn_prompts(tmp_path, tiny_model_dir):
    """dpo_en_demo's prompts are one user message; its pairs go to alpaca and back to ShareGPT whole."""
    alpaca = tmp_path / "dpo_alpaca.jsonl"
    assert (
        convert_cli(tiny_model_dir, f"dataset_dir={DEMO}", "dataset=dpo_en_demo", "--to", "alpaca", "-o", str(alpaca))
        == 0
    )
    rows = [json.loads(line) for line in alpaca.read_text().splitlines()]
    assert all(row["chosen"] and row["rejected"] and "output" not in row for row in rows)
    sharegpt = tmp_path / "dpo_sharegpt.jsonl"
    assert convert_cli(tiny_model_dir, f"dataset={alpaca}", "--to", "sharegpt", "-o", str(sharegpt)) == 0
    assert read_examples(str(sharegpt), tmp_path) == read_examples("dpo_en_demo", DEMO)


def test_convert_refuses_every_row_a_format_cannot_hold_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    output = tmp_path / "out.jsonl"
    code = convert_cli(
        tiny_model_dir, f"dataset_dir={DEMO}", "dataset=glaive_toolcall_en_demo", "--to", "alpaca", "-o", str(output)
    )
    out = capsys.readouterr().out
    assert code == 1 and not output.exists()
    refused = [line for line in out.splitlines() if "cannot convert:" in line]
    rows = json.loads((DEMO / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    calling = [n for n, row in enumerate(rows, 1) if any(t["from"] == "function_call" for t in row["conversations"])]
    assert len(refused) == len(calling) > 1  # each row with tool calls, by name
    for line, number in zip(refused, calling, strict=True):
        assert f"glaive_toolcall_en_demo.json row {number}: tool calls and tool results have no alpaca form" in line
