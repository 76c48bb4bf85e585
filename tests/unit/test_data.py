"""The data step: files → tokenized train/eval sets for each stage; selection, mixing, streaming and the cache."""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tests.conftest import write_rows
from tunesmith.config import load_config
from tunesmith.data import stages
from tunesmith.data.cache import META_FILE, save_entry
from tunesmith.data.dataset import load_data, load_sft_data
from tunesmith.data.encode import IGNORE_INDEX, encode_conversation
from tunesmith.data.registry import resolve_datasets
from tunesmith.errors import ConfigError, DataError

END = "<|im_end|>\n"  # SmolLM2's end of turn, part of every trained answer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def load(tokenizer, tmp_path: Path, *overrides: str, stage: str = "sft", seed: int = 0, **options):
    """load_data with a config from `key=value` overrides and a cache inside tmp_path."""
    max_steps = [f"max_steps={options.pop('max_steps')}"] if "max_steps" in options else []
    config = load_config(None, [*overrides, *max_steps]).data
    options.setdefault("cache_dir", str(tmp_path / "cache"))
    return load_data(config, tokenizer, tokenizer.chat_template, stage=stage, seed=seed, **options)


def qa_rows(prefix: str, count: int) -> list[dict]:
    return [{"instruction": f"{prefix}{i}?", "output": f"{prefix}{i}"} for i in range(count)]


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def answers(tokenizer, dataset) -> list[str]:
    """Each row's trained text without the end-of-turn marker: which rows a dataset holds, in order."""
    return [trained_text(tokenizer, row["input_ids"], row["labels"]).replace(END, "") for row in dataset]


# --- encoding -----------------------------------------------------------------------------------------------------


def test_labels_mask_prompt_and_supervise_answer_and_end_of_turn(tokenizer):
    messages = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Tunesmith."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    encoded = encode_conversation(tokenizer, tokenizer.chat_template, messages, cutoff_len=1024)
    assert encoded.input_ids == tokenizer.apply_chat_template(messages)["input_ids"]
    assert trained_text(tokenizer, encoded.input_ids, encoded.labels) == f"I am Tunesmith.{END}Yes.{END}"
    everything = encode_conversation(tokenizer, tokenizer.chat_template, messages, 1024, train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_cutoff_truncates(tokenizer):
    messages = [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "ok"}]
    encoded = encode_conversation(tokenizer, tokenizer.chat_template, messages, cutoff_len=16)
    assert len(encoded.input_ids) == len(encoded.labels) == 16 and encoded.truncated
    assert encoded.supervised_tokens == 0


def test_placeholders_filled_and_required(tokenizer, identity_data: Path, tmp_path):
    config = load_config(None, [f"dataset_dir={identity_data}", "dataset=identity", "name=Tunesmith", "author=us"])
    data = load_sft_data(config.data, tokenizer, tokenizer.chat_template, seed=1, cache_dir=str(tmp_path))
    text = tokenizer.decode(data.train[0]["input_ids"])
    assert "Tunesmith" in text and "{{name}}" not in text
    unset = load_config(None, [f"dataset_dir={identity_data}", "dataset=identity"])
    with pytest.raises(DataError, match=r"identity.json row 1 contains \{\{name\}\}; set it"):
        load_sft_data(unset.data, tokenizer, tokenizer.chat_template, seed=1, cache_dir=str(tmp_path))


def test_file_path_datasets_are_detected_and_split(tokenizer, tmp_path: Path):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(10)
    ]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    data = load(tokenizer, tmp_path, f"dataset={path}", "val_size=0.2", seed=3)
    assert (len(data.train), len(data.eval)) == (8, 2)
    assert data.rows == 10 and data.train_rows == 8
    assert sorted(answers(tokenizer, data.train) + answers(tokenizer, data.eval)) == [f"a{i}" for i in range(10)]


def test_most_examples_without_supervised_tokens_is_an_error(tokenizer, tmp_path: Path):
    path = write_rows(tmp_path / "long.jsonl", [{"instruction": "long " * 100, "output": "x"} for _ in range(4)])
    with pytest.raises(DataError, match=r"'long': 4 of 4 examples have no supervised token.*cutoff_len=32"):
        load(tokenizer, tmp_path, f"dataset={path}", "cutoff_len=32")


def test_registry_entry_with_columns(tokenizer, tmp_path: Path):
    write_rows(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer"}}})
    )
    data = load(tokenizer, tmp_path, f"dataset_dir={tmp_path}", "dataset=qa")
    assert tokenizer.decode(data.train[0]["input_ids"]).endswith(f"user\nq{END}<|im_start|>assistant\na{END}")


def test_unknown_dataset_lists_registered_names(identity_data: Path):
    with pytest.raises(DataError, match=r"dataset 'nope' .* registered: alpaca_en_demo, (\w+, )*identity(, \w+)*$"):
        resolve_datasets(["nope"], str(identity_data))


def test_csv_and_parquet_give_the_same_examples_as_jsonl(tokenizer, tmp_path: Path):
    rows = [
        {"instruction": "Add", "input": "2, 3", "output": "5", "system": "Be brief", "history": [["hi", "hello"]]},
        {"instruction": 'Say "hi"\nplease', "input": "", "output": "hi", "system": "", "history": []},
    ]
    jsonl = write_rows(tmp_path / "rows.jsonl", rows)
    with (tmp_path / "rows.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "history": json.dumps(row["history"])} for row in rows)  # JSON in a cell
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    expected = load(tokenizer, tmp_path, f"dataset={jsonl}").train[:]
    for name in ("rows.csv", "rows.parquet"):
        got = load(tokenizer, tmp_path, f"dataset={tmp_path / name}").train[:]
        assert (got["input_ids"], got["labels"]) == (expected["input_ids"], expected["labels"]), name
    conversations = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    pq.write_table(pa.Table.from_pylist(conversations), tmp_path / "chat.parquet")  # nested lists of structs
    assert answers(tokenizer, load(tokenizer, tmp_path, f"dataset={tmp_path / 'chat.parquet'}").train) == ["a"]


# --- selection and mixing -----------------------------------------------------------------------------------------


def test_split_slices_num_samples_and_max_samples_select_rows(tokenizer, tmp_path: Path):
    write_rows(tmp_path / "q.jsonl", qa_rows("q", 10))
    registry = {
        "middle": {"file_name": "q.jsonl", "split": "train[2:5]"},
        "back_half": {"file_name": "q.jsonl", "split": "train[50%:]"},
        "upsampled": {"file_name": "q.jsonl", "num_samples": 13},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))

    def selected(name: str, *overrides: str, seed: int = 0) -> list[str]:
        data = load(tokenizer, tmp_path, f"dataset_dir={tmp_path}", f"dataset={name}", *overrides, seed=seed)
        return answers(tokenizer, data.train)

    assert selected("middle") == ["q2", "q3", "q4"]
    assert selected("back_half") == ["q5", "q6", "q7", "q8", "q9"]
    assert selected("back_half", "max_samples=2") == ["q5", "q6"]
    upsampled = selected("upsampled")
    assert len(upsampled) == 13 and set(upsampled) == {f"q{i}" for i in range(10)}  # every row once, then repeats
    assert selected("upsampled") == upsampled and selected("upsampled", seed=1) != upsampled


def test_mixing_strategies_give_reproducible_counts_and_order(tokenizer, tmp_path: Path):
    a = write_rows(tmp_path / "a.jsonl", qa_rows("A", 6))
    b = write_rows(tmp_path / "b.jsonl", qa_rows("B", 2))

    def mixed(*overrides: str, seed: int = 0) -> list[str]:
        return answers(tokenizer, load(tokenizer, tmp_path, f"dataset={a},{b}", *overrides, seed=seed).train)

    assert mixed() == [f"A{i}" for i in range(6)] + ["B0", "B1"]
    assert mixed("mix_strategy=interleave_under") == ["A0", "B0", "A1", "B1"]  # stops when b runs out
    over = mixed("mix_strategy=interleave_over")
    assert len(over) == 12 and over[:4] == ["A0", "B0", "A1", "B1"] and over.count("B0") == 3  # b repeats
    drawn = mixed("mix_strategy=interleave_over", "interleave_probs=0.75,0.25", seed=5)
    assert drawn == mixed("mix_strategy=interleave_over", "interleave_probs=0.75,0.25", seed=5)
    assert drawn != mixed("mix_strategy=interleave_over", "interleave_probs=0.75,0.25", seed=6)
    assert {f"A{i}" for i in range(6)} | {"B0", "B1"} <= set(drawn)
    once = mixed("mix_strategy=interleave_once", "interleave_probs=0.5,0.5", seed=2)
    assert sorted(once) == sorted(mixed())  # every row exactly once


def test_data_keys_are_checked_before_any_file_is_read():
    def config(*overrides: str):
        return load_config(None, ["dataset=a,b", *overrides])

    with pytest.raises(ConfigError, match=r"`interleave_probs`|interleave_probs has 3 values for 2 datasets"):
        config("mix_strategy=interleave_under", "interleave_probs=0.2,0.3,0.5")
    with pytest.raises(ConfigError, match=r"interleave_probs needs mix_strategy interleave_under"):
        config("interleave_probs=0.5,0.5")
    with pytest.raises(ConfigError, match=r"must be non-negative and add up to 1"):
        config("mix_strategy=interleave_over", "interleave_probs=0.5,0.6")
    with pytest.raises(ConfigError, match=r"`mix_strategy`: got 'random'"):
        config("mix_strategy=random")
    with pytest.raises(ConfigError, match=r"either val_size .* or eval_dataset"):
        config("eval_dataset=c", "val_size=0.1")
    with pytest.raises(ConfigError, match=r"with streaming, val_size must be a number of rows"):
        config("streaming=true", "val_size=0.1")
    with pytest.raises(ConfigError, match=r"tokenized_path saves a tokenized dataset, which streaming never builds"):
        config("streaming=true", "tokenized_path=t")


def test_column_map_renames_the_columns_of_a_file(tokenizer, tmp_path: Path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "instruction": "ignored"}])
    data = load(tokenizer, tmp_path, f"dataset={path}", "column_map={instruction: question, output: answer}")
    assert tokenizer.decode(data.train[0]["input_ids"]).endswith(f"user\nq{END}<|im_start|>assistant\na{END}")
    with pytest.raises(DataError, match=r"qa.jsonl row 1, field `reply`: no such column, but column_map maps `output`"):
        load(tokenizer, tmp_path, f"dataset={path}", "column_map={instruction: question, output: reply}")
    with pytest.raises(ConfigError, match=r"`column_map`: unknown column prompt; the keys are our column names"):
        load(tokenizer, tmp_path, f"dataset={path}", "column_map={prompt: question}")


def test_eval_dataset_and_tokenized_path(tokenizer, tmp_path: Path, monkeypatch, capsys):
    train = write_rows(tmp_path / "train.jsonl", qa_rows("t", 4))
    held = write_rows(tmp_path / "eval.jsonl", qa_rows("e", 2))
    saved = tmp_path / "tokenized"
    data = load(tokenizer, tmp_path, f"dataset={train}", f"eval_dataset={held}", f"tokenized_path={saved}")
    assert (answers(tokenizer, data.train), answers(tokenizer, data.eval)) == (["t0", "t1", "t2", "t3"], ["e0", "e1"])

    monkeypatch.setattr(stages, "encode_conversation", fail_if_called)
    again = load(tokenizer, tmp_path, "dataset=anything-else", f"tokenized_path={saved}")
    assert "using tokenized data from tokenized_path" in capsys.readouterr().out
    assert (answers(tokenizer, again.train), answers(tokenizer, again.eval)) == (["t0", "t1", "t2", "t3"], ["e0", "e1"])
    with pytest.raises(DataError, match=r"tokenized_path .* holds data for stage sft, not dpo"):
        load(tokenizer, tmp_path, "dataset=x", f"tokenized_path={saved}", stage="dpo")
    with pytest.raises(DataError, match=r"tokenized_path .* exists but holds no data saved by tunesmith"):
        load(tokenizer, tmp_path, "dataset=x", f"tokenized_path={tmp_path}")


# --- the cache ----------------------------------------------------------------------------------------------------


def fail_if_called(*args, **kwargs):
    raise AssertionError("tokenized again although the data is cached")


def test_a_second_load_uses_the_cache_and_overwrite_cache_rebuilds(tokenizer, tmp_path: Path, monkeypatch, capsys):
    path = write_rows(tmp_path / "q.jsonl", qa_rows("q", 5))
    first = load(tokenizer, tmp_path, f"dataset={path}", "val_size=1")
    assert "using cached" not in capsys.readouterr().out

    monkeypatch.setattr(stages, "encode_conversation", fail_if_called)
    second = load(tokenizer, tmp_path, f"dataset={path}", "val_size=1")
    out = capsys.readouterr().out
    assert f"using cached tokenized data: {tmp_path / 'cache' / 'datasets' / 'q-'}" in out
    assert second.train[:] == first.train[:] and second.eval[:] == first.eval[:]
    assert (second.rows, second.truncated, second.dropped) == (first.rows, first.truncated, first.dropped)
    for changed in ("overwrite_cache=true", "cutoff_len=64", "train_on_prompt=true", "max_samples=3"):
        with pytest.raises(AssertionError, match="tokenized again"):
            load(tokenizer, tmp_path, f"dataset={path}", changed)
    write_rows(path, qa_rows("r", 5))  # new contents under the same name
    with pytest.raises(AssertionError, match="tokenized again"):
        load(tokenizer, tmp_path, f"dataset={path}")

    monkeypatch.undo()
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return encode_conversation(*args, **kwargs)

    monkeypatch.setattr(stages, "encode_conversation", counting)
    rebuilt = load(tokenizer, tmp_path, f"dataset={path}", "overwrite_cache=true")
    assert len(calls) == 5 and answers(tokenizer, rebuilt.train) == [f"r{i}" for i in range(5)]
    entries = list((tmp_path / "cache" / "datasets").iterdir())
    assert not [entry for entry in entries if entry.name.startswith(".")]  # no temporary folders left


def test_a_cache_entry_another_process_finished_first_is_kept(tmp_path: Path):
    from datasets import Dataset

    entry = tmp_path / "entry"
    assert save_entry(Dataset.from_dict({"x": [1]}), {"by": "first"}, entry, replace=False)
    assert save_entry(Dataset.from_dict({"x": [2]}), {"by": "second"}, entry, replace=False)  # the rename loses
    assert json.loads((entry / META_FILE).read_text())["by"] == "first"
    assert save_entry(Dataset.from_dict({"x": [3]}), {"by": "rebuild"}, entry, replace=True)
    assert json.loads((entry / META_FILE).read_text())["by"] == "rebuild"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["entry"]


# --- streaming ----------------------------------------------------------------------------------------------------


def test_streaming_yields_encoded_rows(tokenizer, tmp_path: Path):
    a = write_rows(tmp_path / "a.jsonl", qa_rows("A", 6))
    b = write_rows(tmp_path / "b.jsonl", qa_rows("B", 2))
    with pytest.raises(ConfigError, match=r"`streaming: true` needs `max_steps`"):
        load(tokenizer, tmp_path, f"dataset={a}", "streaming=true")
    in_memory = load(tokenizer, tmp_path, f"dataset={a},{b}").train
    data = load(tokenizer, tmp_path, f"dataset={a},{b}", "streaming=true", max_steps=10, seed=4)
    assert data.train_rows is None and "streaming" in data.summary()
    rows = list(data.train)
    assert sorted(map(str, rows)) == sorted(map(str, in_memory))  # the same encoded rows, shuffled
    assert rows == list(data.train)  # reproducible with the seed

    held = load(tokenizer, tmp_path, f"dataset={a},{b}", "streaming=true", "val_size=2", max_steps=10)
    assert answers(tokenizer, held.eval) == ["A0", "A1"]  # the first rows of the stream, taken before the shuffle
    assert sorted(answers(tokenizer, held.train)) == ["A2", "A3", "A4", "A5", "B0", "B1"]
    mixing = ("streaming=true", "val_size=3", "mix_strategy=interleave_over", "interleave_probs=0.5,0.5")
    interleaved = load(tokenizer, tmp_path, f"dataset={a},{b}", *mixing, max_steps=10)
    assert answers(tokenizer, interleaved.eval) == ["A0", "A1", "A2"]
    for epoch in range(3):  # the Trainer reshuffles every pass: held-out rows must never come back
        interleaved.train.set_epoch(epoch)
        assert {"A0", "A1", "A2"}.isdisjoint(answers(tokenizer, interleaved.train))
    under = load(
        tokenizer, tmp_path, f"dataset={a},{b}", "streaming=true", "mix_strategy=interleave_under", max_steps=5
    )
    assert sorted(answers(tokenizer, under.train)) == ["A0", "A1", "B0", "B1"]


def test_streaming_refuses_percent_slices_and_reports_bad_rows_at_once(tokenizer, tmp_path: Path):
    write_rows(tmp_path / "q.jsonl", qa_rows("q", 4))
    registry = {
        "q": {"file_name": "q.jsonl", "split": "train[50%:]"},
        "first": {"file_name": "q.jsonl", "split": "train[:2]"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    common = (f"dataset_dir={tmp_path}", "streaming=true")
    with pytest.raises(DataError, match=r"dataset 'q': split slice \[50%:\] needs the number of rows"):
        load(tokenizer, tmp_path, *common, "dataset=q", max_steps=1)
    assert answers(tokenizer, load(tokenizer, tmp_path, *common, "dataset=first", max_steps=1).train) in (
        ["q0", "q1"],
        ["q1", "q0"],
    )
    bad = write_rows(tmp_path / "bad.jsonl", [{"instruction": "q"}])
    with pytest.raises(DataError, match=r"bad.jsonl row 1, field `output`: missing or empty"):
        load(tokenizer, tmp_path, f"dataset={bad}", "streaming=true", max_steps=1)


# --- stages -------------------------------------------------------------------------------------------------------


def test_pretraining_text_is_cut_into_fully_supervised_pieces(tokenizer, tmp_path: Path):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "corpus.txt").write_text(f"{text}\n\nshort line\n")
    data = load(tokenizer, tmp_path, f"dataset={tmp_path / 'corpus.txt'}", "cutoff_len=16", stage="pt")
    pieces = data.train[:]
    assert pieces["labels"] == pieces["input_ids"] and max(map(len, pieces["input_ids"])) <= 16
    expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected += tokenizer("short line", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [token for ids in pieces["input_ids"] for token in ids] == expected
    assert data.rows == 2 and data.truncated == 1 and len(data.train) == len(pieces["input_ids"]) > 2
    with pytest.raises(DataError, match=r"rows with a `text` column and no instruction are pre-training text"):
        load(tokenizer, tmp_path, f"dataset={tmp_path / 'corpus.txt'}")


def test_preference_pairs_supervise_only_the_answers(tokenizer, tmp_path: Path):
    path = write_rows(
        tmp_path / "pairs.jsonl", [{"instruction": "Capital of France?", "chosen": "Paris", "rejected": "Rome"}]
    )
    data = load(tokenizer, tmp_path, f"dataset={path}", stage="dpo")
    row = data.train[0]
    assert trained_text(tokenizer, row["chosen_input_ids"], row["chosen_labels"]) == f"Paris{END}"
    assert trained_text(tokenizer, row["rejected_input_ids"], row["rejected_labels"]) == f"Rome{END}"
    prompt = next(index for index, label in enumerate(row["chosen_labels"]) if label != IGNORE_INDEX)
    assert row["chosen_input_ids"][:prompt] == row["rejected_input_ids"][:prompt]  # the same prompt
    assert row["chosen_labels"][:prompt] == [IGNORE_INDEX] * prompt
    with pytest.raises(DataError, match=r"'pairs' .* holds preference pairs .*stages rm, dpo, orpo, simpo, not sft"):
        load(tokenizer, tmp_path, f"dataset={path}")
    plain = write_rows(tmp_path / "plain.jsonl", qa_rows("q", 1))
    with pytest.raises(DataError, match=r"'plain' .* has no preference pairs, which stage rm needs"):
        load(tokenizer, tmp_path, f"dataset={plain}", stage="rm")


def test_long_preference_prompts_keep_part_of_the_answer(tokenizer, tmp_path: Path):
    path = write_rows(
        tmp_path / "long.jsonl", [{"instruction": "word " * 200, "chosen": "yes " * 10, "rejected": "no"}]
    )
    row = load(tokenizer, tmp_path, f"dataset={path}", "cutoff_len=64", stage="dpo").train[0]
    assert len(row["chosen_input_ids"]) <= 64 and trained_text(
        tokenizer, row["chosen_input_ids"], row["chosen_labels"]
    ).startswith("yes yes")
    assert stages.fit_lengths(prompt=100, answer=10, cutoff_len=64) == (54, 10)
    assert stages.fit_lengths(prompt=10, answer=100, cutoff_len=64) == (10, 54)
    assert stages.fit_lengths(prompt=100, answer=100, cutoff_len=64) == (32, 32)


def test_kto_rows_carry_their_label(tokenizer, tmp_path: Path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}], "kto_tag": True},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}], "kto_tag": False},
    ]
    path = write_rows(tmp_path / "kto.jsonl", rows)
    data = load(tokenizer, tmp_path, f"dataset={path}", stage="kto")
    assert data.train["kto_tag"] == [True, False] and answers(tokenizer, data.train) == ["good", "bad"]
    with pytest.raises(DataError, match=r"kto.jsonl row 1, field `kto_tag`: a KTO label; .*for `stage: kto`, not sft"):
        load(tokenizer, tmp_path, f"dataset={path}")
    plain = write_rows(tmp_path / "plain.jsonl", qa_rows("q", 1))
    with pytest.raises(DataError, match=r"plain.jsonl row 1, field `kto_tag`: missing; stage kto needs a true/false"):
        load(tokenizer, tmp_path, f"dataset={plain}", stage="kto")


def test_a_template_that_renders_tool_calls_gets_them_as_tool_calls(tokenizer, tmp_path: Path):
    from tunesmith.data.templates import resolve_chat_format

    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "20 C"},
            {"from": "gpt", "value": "It is 20 C."},
        ],
        "tools": '[{"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}]',
    }
    path = write_rows(tmp_path / "tools.jsonl", [row])
    qwen = resolve_chat_format("qwen", tokenizer).jinja
    config = load_config(None, [f"dataset={path}"]).data
    data = load_data(config, tokenizer, qwen, cache_dir=str(tmp_path / "cache"))
    ids, labels = data.train[0]["input_ids"], data.train[0]["labels"]
    assert "<tools>" in tokenizer.decode(ids)  # the definitions, in qwen's tool prompt
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert trained_text(tokenizer, ids, labels) == f"{call}{END}It is 20 C.{END}"


def test_dataset_cache_lives_next_to_the_converted_models(monkeypatch, tmp_path: Path):
    from tunesmith.data.cache import cache_root as dataset_cache
    from tunesmith.model.resolve import cache_root as model_cache

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "moved"))
    assert dataset_cache(None) == model_cache() / "datasets" == tmp_path / "moved" / "datasets"
    assert dataset_cache(str(tmp_path / "cfg")) == tmp_path / "cfg" / "datasets"
