import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.conftest import write_rows
from tunesmith.config import load_config
from tunesmith.data.dataset import load_sft_data
from tunesmith.data.encode import IGNORE_INDEX, encode_conversation
from tunesmith.data.formats import (
    OPENAI_TAGS,
    AlpacaColumns,
    Row,
    ShareGPTTags,
    alpaca_to_messages,
    read_rows,
    sharegpt_to_messages,
)
from tunesmith.data.registry import resolve_datasets
from tunesmith.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def data_config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"dataset_dir={tmp_path}", *overrides]).data


def test_alpaca_row_with_system_history_and_input():
    row = Row(
        {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief", "history": [["hi", "hello"]]},
        "f.json",
        1,
    )
    assert alpaca_to_messages(row, AlpacaColumns()) == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_alpaca_missing_output_names_file_row_and_field():
    with pytest.raises(DataError, match=r"f.json row 7, field `output`: missing or empty"):
        alpaca_to_messages(Row({"instruction": "x"}, "f.json", 7), AlpacaColumns())


def test_openai_and_sharegpt_rows():
    openai = Row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "o.jsonl", 1)
    assert sharegpt_to_messages(openai, "messages", OPENAI_TAGS, None)[-1] == {"role": "assistant", "content": "a"}
    sharegpt = Row({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "s.json", 2)
    assert sharegpt_to_messages(sharegpt, "conversations", ShareGPTTags(), None)[0] == {"role": "user", "content": "q"}


def test_wrong_turn_order_and_non_string_content_are_reported():
    swapped = Row({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "o.json", 3)
    with pytest.raises(DataError, match=r"o.json row 3, field `messages`: turn 1 is 'assistant'"):
        sharegpt_to_messages(swapped, "messages", OPENAI_TAGS, None)
    bad = Row({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "o.json", 4)
    with pytest.raises(DataError, match=r"o.json row 4, field `messages` message 1: `content` must be a string"):
        sharegpt_to_messages(bad, "messages", OPENAI_TAGS, None)


def test_broken_json_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"broken.jsonl line 2: invalid JSON"):
        list(read_rows(path))
    listing = tmp_path / "broken.json"
    listing.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"broken.json line 3: invalid JSON"):
        list(read_rows(listing))


def test_unknown_dataset_lists_registered_names(identity_data: Path):
    with pytest.raises(DataError, match=r"dataset 'nope' .* registered: alpaca_en_demo, identity"):
        resolve_datasets(["nope"], str(identity_data))


def test_labels_mask_prompt_and_supervise_answer_and_end_of_turn(tokenizer):
    messages = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Tunesmith."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    encoded = encode_conversation(tokenizer, tokenizer.chat_template, messages, cutoff_len=1024)
    assert encoded.input_ids == tokenizer.apply_chat_template(messages)["input_ids"]
    supervised = tokenizer.decode(
        [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    )
    assert supervised == "I am Tunesmith.<|im_end|>\nYes.<|im_end|>\n"
    everything = encode_conversation(tokenizer, tokenizer.chat_template, messages, 1024, train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_cutoff_truncates(tokenizer):
    messages = [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "ok"}]
    encoded = encode_conversation(tokenizer, tokenizer.chat_template, messages, cutoff_len=16)
    assert len(encoded.input_ids) == len(encoded.labels) == 16 and encoded.truncated
    assert encoded.supervised_tokens == 0


def test_placeholders_filled_and_required(tokenizer, identity_data: Path):
    config = load_config(None, [f"dataset_dir={identity_data}", "dataset=identity", "name=Tunesmith", "author=us"])
    data = load_sft_data(config.data, tokenizer, tokenizer.chat_template, seed=1)
    text = tokenizer.decode(data.train[0]["input_ids"])
    assert "Tunesmith" in text and "{{name}}" not in text
    unset = load_config(None, [f"dataset_dir={identity_data}", "dataset=identity"])
    with pytest.raises(DataError, match=r"identity.json row 1 contains \{\{name\}\}; set it"):
        load_sft_data(unset.data, tokenizer, tokenizer.chat_template, seed=1)


def test_file_path_datasets_are_detected_and_split(tokenizer, tmp_path: Path):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(10)
    ]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    config = load_config(None, [f"dataset={path}", "val_size=0.2"])
    data = load_sft_data(config.data, tokenizer, tokenizer.chat_template, seed=3)
    assert (len(data.train), len(data.eval)) == (8, 2)
    assert data.rows == 10


def test_most_examples_without_supervised_tokens_is_an_error(tokenizer, tmp_path: Path):
    rows = [{"instruction": "long " * 100, "output": "x"} for _ in range(4)]
    path = write_rows(tmp_path / "long.jsonl", rows)
    config = load_config(None, [f"dataset={path}", "cutoff_len=32"])
    with pytest.raises(DataError, match=r"4 of 4 examples have no supervised token.*cutoff_len=32"):
        load_sft_data(config.data, tokenizer, tokenizer.chat_template, seed=0)


def test_registry_entry_with_columns(tokenizer, tmp_path: Path):
    write_rows(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}}})
    )
    config = load_config(None, [f"dataset_dir={tmp_path}", "dataset=qa"])
    data = load_sft_data(config.data, tokenizer, tokenizer.chat_template, seed=0)
    assert tokenizer.decode(data.train[0]["input_ids"]).endswith(
        "user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    )
