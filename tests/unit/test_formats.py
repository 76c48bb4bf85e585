"""Rows → examples: each input format, tool calls, media, preference and KTO rows, and the errors for bad rows.

Every bad row must fail with a DataError naming the file, the row and the field.
"""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data.files import Row, read_rows
from tunesmith.data.formats import (
    OPENAI_TAGS,
    Columns,
    RowFormat,
    ShareGPTTags,
    alpaca_to_messages,
    calls_as_content,
    detect_format,
    row_to_example,
    sharegpt_to_messages,
    tools_in_system,
)
from tunesmith.errors import DataError

SHAREGPT = RowFormat("sharegpt")
OPENAI = RowFormat("sharegpt", Columns(messages="messages"), OPENAI_TAGS)
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TOOLS = '[{"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}]'


def chat(row: dict, fmt: RowFormat = SHAREGPT, file: str = "f.json", number: int = 1):
    return row_to_example(Row(row, file, number), fmt, "chat")


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": tag, "value": value} for tag, value in pairs]


def test_alpaca_row_with_system_history_and_input():
    row = Row(
        {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief", "history": [["hi", "hello"]]},
        "f.json",
        1,
    )
    assert alpaca_to_messages(row, Columns()) == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_missing_output_names_file_row_and_field():
    with pytest.raises(DataError, match=r"f.json row 7, field `output`: missing or empty; every alpaca row needs"):
        chat({"instruction": "x"}, RowFormat("alpaca"), number=7)


def test_sharegpt_function_call_becomes_an_assistant_tool_call_and_tools_are_parsed():
    row = {
        "conversations": turns(
            ("human", "Weather in Paris?"), ("function_call", CALL), ("observation", '{"t": 20}'), ("gpt", "20 C")
        ),
        "tools": TOOLS,  # a JSON string, as in glaive
    }
    example = chat(row)
    assert example.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    }
    assert example.messages[2] == {"role": "tool", "content": '{"t": 20}'}
    assert example.tools == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}},
        }
    ]
    # For a template that ignores tool_calls, the call is written into the content (the original JSON).
    assert calls_as_content(example.messages)[1] == {"role": "assistant", "content": CALL}
    assert sharegpt_to_messages(Row(row, "f.json", 1), "conversations", ShareGPTTags(), None)[1]["content"] == CALL
    system = tools_in_system(example.messages, example.tools)[0]
    assert system["role"] == "system" and '"name": "get_weather"' in system["content"]


def test_openai_rows_with_tool_calls_and_parallel_tool_results():
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "done"},
    ]
    example = chat({"messages": messages}, OPENAI)
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert example.messages[2]["tool_calls"][0] == {
        "type": "function",
        "function": {"name": "f", "arguments": '{"x": 1}'},
        "id": "a",
    }
    assert (
        calls_as_content(example.messages)[2]["content"]
        == '{"name": "f", "arguments": {"x": 1}}\n{"name": "g", "arguments": {}}'
    )


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        (turns(("gpt", "a"), ("human", "q")), r"message 1 is 'gpt' but should be human \(or observation\)"),
        (turns(("human", "q"), ("human", "q2")), r"message 2 is 'human' but should be gpt \(or function_call\)"),
        (turns(("human", "q"), ("gpt", "a"), ("human", "q2")), r"must end with a gpt \(or function_call\) turn"),
        (turns(("human", "q"), ("gpt", "a"), ("system", "s")), r"message 3: a system message can only come first"),
    ],
)
def test_sharegpt_turns_in_the_wrong_order_name_the_row(conversation, message):
    with pytest.raises(DataError, match=r"s.json row 4, field `conversations`.*" + message):
        chat({"conversations": conversation}, file="s.json", number=4)


def test_non_string_content_and_unknown_role_are_reported():
    bad = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=r"o.json row 2, field `messages` message 1: `content` must be a string"):
        chat(bad, OPENAI, file="o.json", number=2)
    unknown = {"conversations": turns(("bot", "a"))}
    with pytest.raises(DataError, match=r"message 1: `from` is 'bot'; expected one of human, gpt, system"):
        chat(unknown)
    not_json = {"conversations": turns(("human", "q"), ("function_call", "get_weather(Paris)"))}
    with pytest.raises(DataError, match=r"message 2: a function call must be JSON"):
        chat(not_json)
    bad_tools = {"conversations": turns(("human", "q"), ("gpt", "a")), "tools": "[{"}
    with pytest.raises(DataError, match=r"f.json row 1, field `tools`: not valid JSON"):
        chat(bad_tools)


def test_images_are_resolved_checked_and_counted(tmp_path: Path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "1.jpg").write_bytes(b"jpg")
    fmt = RowFormat("sharegpt", Columns(messages="messages"), OPENAI_TAGS, media_dirs=(tmp_path,))
    messages = [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Me."}]
    example = chat({"messages": messages, "images": ["pics/1.jpg"]}, fmt)
    assert example.images == [str((tmp_path / "pics" / "1.jpg").resolve())]
    with pytest.raises(DataError, match=r"m.json row 3, field `images`: 2 file\(s\) but 1 <image> marker\(s\)"):
        chat({"messages": messages, "images": ["pics/1.jpg", "pics/1.jpg"]}, fmt, file="m.json", number=3)
    with pytest.raises(DataError, match=r"field `images`: file 'pics/2.jpg' does not exist"):
        chat({"messages": messages, "images": ["pics/2.jpg"]}, fmt)


def test_preference_rows_in_alpaca_and_sharegpt_form():
    pair = chat({"instruction": "q", "chosen": "good", "rejected": "bad"}, RowFormat("alpaca", ranking=True))
    assert pair.messages == [{"role": "user", "content": "q"}]
    assert (pair.chosen["content"], pair.rejected["content"]) == ("good", "bad")
    sharegpt = RowFormat("sharegpt", ranking=True)
    row = {"conversations": turns(("human", "q")), "chosen": {"from": "gpt", "value": "good"}}
    row["rejected"] = {"from": "gpt", "value": "bad"}
    assert chat(row, sharegpt).rejected == {"role": "assistant", "content": "bad"}
    with pytest.raises(DataError, match=r"field `conversations`: a preference row's conversation must end with"):
        chat({**row, "conversations": turns(("human", "q"), ("gpt", "a"))}, sharegpt)
    with pytest.raises(DataError, match=r"f.json row 1, field `rejected`: must be a gpt \(or function_call\) message"):
        chat({**row, "rejected": {"from": "human", "value": "x"}}, sharegpt)


def test_kto_labels():
    fmt = RowFormat("sharegpt", Columns(messages="messages", kto_tag="label"), OPENAI_TAGS)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert chat({"messages": messages, "label": False}, fmt).kto_tag is False
    assert chat({"messages": messages, "label": "true"}, fmt).kto_tag is True  # a CSV cell
    with pytest.raises(DataError, match=r"field `label`: a KTO label must be true .* or false; found 'maybe'"):
        chat({"messages": messages, "label": "maybe"}, fmt)


def test_empty_files_and_files_that_are_not_json(tmp_path: Path):
    for name in ("empty.json", "empty.jsonl", "empty.csv", "empty.txt"):
        (tmp_path / name).write_text("" if name != "empty.csv" else "instruction,output\n")
        with pytest.raises(DataError, match=rf"{name}: the file is empty \(no rows\); expected a .json list"):
            list(read_rows(tmp_path / name))
    (tmp_path / "prose.json").write_text("This is not JSON.\n")
    with pytest.raises(DataError, match=r"prose.json line 1: invalid JSON .*a .json dataset is a list of objects"):
        list(read_rows(tmp_path / "prose.json"))
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"broken.jsonl line 2: invalid JSON"):
        list(read_rows(tmp_path / "broken.jsonl"))
    (tmp_path / "listing.json").write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "o": 1}\n]'
    )
    with pytest.raises(DataError, match=r"listing.json line 3: invalid JSON"):
        list(read_rows(tmp_path / "listing.json"))
    (tmp_path / "numbers.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"numbers.json row 1: expected a JSON object, found int"):
        list(read_rows(tmp_path / "numbers.json"))


def test_csv_parquet_and_txt_rows(tmp_path: Path):
    rows = [{"instruction": "q1", "output": "a1"}, {"instruction": "q,2", "output": "a2"}]
    with (tmp_path / "t.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["instruction", "output"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    assert [row.data for row in read_rows(tmp_path / "t.csv")] == rows
    assert [row.data for row in read_rows(tmp_path / "t.parquet")] == rows
    assert [(row.data, row.number) for row in read_rows(tmp_path / "t.txt")] == [
        ({"text": "first line"}, 1),
        ({"text": "second line"}, 3),
    ]
    # A CSV cell holding JSON where a list is expected (ShareGPT conversations) is parsed.
    cell = json.dumps(turns(("human", "q"), ("gpt", "a")))
    assert chat({"conversations": cell}, file="t.csv").messages[1] == {"role": "assistant", "content": "a"}


def test_format_detection_for_files_given_by_path():
    def detect(row: dict, kind: str = "chat") -> RowFormat:
        return detect_format(Row(row, "d.jsonl", 1), kind)

    assert detect({"messages": [{"role": "user", "content": "q"}]}).tags == OPENAI_TAGS
    assert detect({"conversations": turns(("human", "q"))}).tags == ShareGPTTags()
    assert detect({"instruction": "q", "chosen": "a", "rejected": "b"}).ranking
    assert detect({"text": "t"}, "text").formatting == "alpaca"
    with pytest.raises(DataError, match=r"d.jsonl row 1: rows with a `text` column .* use `stage: pt`"):
        detect({"text": "t"})
    with pytest.raises(DataError, match=r"cannot tell the format from the columns \['prompt'\].*column_map"):
        detect({"prompt": "p"})
