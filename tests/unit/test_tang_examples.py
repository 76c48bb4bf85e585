"""The Tang-poem workflow's examples, run with few steps on the tiny 64-wide model and a cut of the Tang data
(tests/fixtures/tang: 40 training poems, the 15-line test file): QLoRA with the tutorial's Llama 2 system prompt and a
held-out split scored while training, then predict on the held-out rows (scored) and on the test file (unscored)."""

from __future__ import annotations

import json

from tests.conftest import REPO, TEST_FIXTURES
from tunesmith.cli import main

TANG = TEST_FIXTURES / "tang"
SYSTEM = "You are a helpful assistant and good at writing Tang poem."


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_tang_qlora_then_predict_held_out_and_test_file(wide_tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.config.load import load_config
    from tunesmith.data.dataset import load_sft_data

    adapter = tmp_path / "tang_qlora"
    train = [str(REPO / "examples" / "tang_qlora.yaml"), f"model_name_or_path={wide_tiny_model_dir}"]
    train += [f"dataset_dir={TANG}", f"output_dir={adapter}", "max_steps=2", "eval_steps=2", "save_steps=2"]
    train += ["per_device_train_batch_size=2", "gradient_accumulation_steps=1", "max_new_tokens=8", "plot_loss=false"]
    assert main(["train", *train]) == 0
    evals = [record for record in read_jsonl(adapter / "metrics.jsonl") if "eval_loss" in record]
    assert evals and "eval_bleu-4" in evals[-1] and "eval_rouge-l" in evals[-1]

    predict = [str(REPO / "examples" / "predict_tang.yaml"), f"model_name_or_path={wide_tiny_model_dir}"]
    predict += [f"adapter_name_or_path={adapter}", f"dataset_dir={TANG}", "max_new_tokens=8"]
    assert main(["predict", *predict, f"output_dir={tmp_path / 'held_out'}"]) == 0
    held_out = read_jsonl(tmp_path / "held_out" / "generated_predictions.jsonl")
    results = json.loads((tmp_path / "held_out" / "predict_results.json").read_text())
    assert results["predict_scored_samples"] == len(held_out) == 2  # 5% of 40 poems
    assert all(SYSTEM in row["prompt"] and "<<SYS>>" in row["prompt"] for row in held_out)

    # the rows predicted are the rows training held out: its eval split, decoded
    config = load_config(train[0], train[1:])
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    eval_rows = load_sft_data(config.data, tokenizer, tokenizer.chat_template, config.train.seed).eval
    trained_labels = [
        tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
        for row in eval_rows
    ]
    assert len(trained_labels) == len(held_out)
    for row, trained in zip(held_out, trained_labels, strict=True):  # a poem cut at cutoff_len: its trained start
        assert row["label"].startswith(trained.replace("<|im_end|>", "").rstrip("\ufffd")), (row["label"], trained)

    test_file = ["eval_dataset=tang_test", "val_size=0", f"output_dir={tmp_path / 'test_file'}"]
    assert main(["predict", *predict, *test_file]) == 0
    rows = read_jsonl(tmp_path / "test_file" / "generated_predictions.jsonl")
    results = json.loads((tmp_path / "test_file" / "predict_results.json").read_text())
    assert len(rows) == 15 and all(row["label"] is None for row in rows)
    assert results["predict_scored_samples"] == 0 and "predict_bleu-4" not in results
    first_lines = [row["input"] for row in json.loads((TANG / "Tang_testing_data.json").read_text())]
    assert all(line in row["prompt"] for line, row in zip(first_lines, rows, strict=True))  # in input order
