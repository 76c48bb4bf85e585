"""Predict: LLaMA-Factory's metrics by hand, batched greedy generation equal to one row at a time, resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.conftest import write_rows
from tunesmith.cli import main
from tunesmith.config.predict import load_predict_config
from tunesmith.errors import ConfigError
from tunesmith.evaluate.metrics import exact_match, similarity
from tunesmith.evaluate.predict import PARTIAL_FILE, run_predict


def test_bleu_is_character_level_with_brevity_penalty():
    # "the cat sat" is a prefix of the reference: every character n-gram matches, so BLEU is the brevity penalty
    # exp(1 - 22/11).
    scores = similarity("the cat sat", "the cat sat on the mat")
    assert scores["bleu-4"] == round(math.exp(1 - 22 / 11) * 100, 4)
    # ROUGE on words; rouge-chinese counts distinct n-grams: unigrams 3 of {the, cat, sat, on, mat} → F = 2·1·0.6/1.6,
    # bigrams 2 of 5 → F = 2·1·0.4/1.4; the longest common subsequence is 3 of 6 words → F = 2·1·0.5/1.5.
    assert scores["rouge-1"] == round(2 * 0.6 / 1.6 * 100, 4)
    assert scores["rouge-2"] == round(2 * 0.4 / 1.4 * 100, 4)
    assert scores["rouge-l"] == round(2 * 0.5 / 1.5 * 100, 4)


def test_bleu_smoothing_method_3_for_missing_ngrams():
    # abcd vs abxd: 1-grams 3/4, 2-grams 1/3, no 3- or 4-gram match; method 3 replaces the k-th zero precision
    # by 1/(2^k · n-gram count): 1/(2·2) for 3-grams, 1/(4·1) for 4-grams.
    expected = (0.75 * (1 / 3) * (1 / 4) * (1 / 4)) ** 0.25
    assert similarity("abcd", "abxd")["bleu-4"] == round(expected * 100, 4)


def test_chinese_scores_characters_for_bleu_and_jieba_words_for_rouge():
    import jieba

    prediction, label = "床前明月光", "床前明月光，疑是地上霜"
    scores = similarity(prediction, label)
    assert scores["bleu-4"] == round(math.exp(1 - 11 / 5) * 100, 4)  # a prefix: only the brevity penalty
    predicted_words, label_words = list(jieba.cut(prediction)), list(jieba.cut(label))
    assert predicted_words == label_words[: len(predicted_words)]  # the prediction's words open the reference
    recall = len(set(predicted_words)) / len(set(label_words))
    assert scores["rouge-1"] == round(2 * recall / (1 + recall) * 100, 4)


def test_empty_prediction_scores_zero():
    assert similarity("", "a reference") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert exact_match(" yes\n", "yes") == 100.0 and exact_match("", "yes") == 0.0


QUESTIONS = [
    "Hi",
    "What is the capital of France? Answer in one word.",
    "Name three colours.",
    "Write a very long sentence about the sea, the sky, and the mountains far away.",
    "2+2?",
    "Tell me a joke about cats and dogs.",
    "Translate 'good morning' into French.",
    "Why?",
    "List the planets of the solar system in order from the sun.",
    "Say nothing.",
]


@pytest.fixture
def predict_data(tmp_path):
    rows = [{"instruction": q, "output": f"answer {n}"} for n, q in enumerate(QUESTIONS)]
    rows[3].pop("output")  # a row without an answer: predicted, not scored
    return write_rows(tmp_path / "test.jsonl", rows)


STOP_WORD = " Units"  # a token the contextual model generates in some rows, mid-reply


@pytest.fixture(scope="module")
def stopping_model_dir(contextual_tiny_model_dir, tmp_path_factory):
    """The contextual tiny model with STOP_WORD's token as a second end-of-turn token, so rows stop at different
    steps (a random model hardly ever generates its real end-of-turn token)."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    target = tmp_path_factory.mktemp("tiny-stopping") / "model"
    shutil.copytree(contextual_tiny_model_dir, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    (stop_id,) = tokenizer.encode(STOP_WORD, add_special_tokens=False)
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, stop_id]).save_pretrained(target)
    return target


def predict(tiny_model_dir, data, output, *overrides):
    config = load_predict_config(
        None,
        [
            f"model_name_or_path={tiny_model_dir}",
            f"eval_dataset={data}",
            f"output_dir={output}",
            "do_sample=false",
            "max_new_tokens=12",
            *overrides,
        ],
    )
    results = run_predict(config)
    lines = (output / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return results, [json.loads(line) for line in lines]


def test_batched_greedy_predict_equals_one_row_at_a_time(stopping_model_dir, predict_data, tmp_path):
    tiny_model_dir = stopping_model_dir
    results_1, rows_1 = predict(tiny_model_dir, predict_data, tmp_path / "b1", "per_device_eval_batch_size=1")
    results_8, rows_8 = predict(tiny_model_dir, predict_data, tmp_path / "b8", "per_device_eval_batch_size=8")
    assert rows_1 == rows_8
    predictions = [row["predict"] for row in rows_8]
    assert len(set(predictions)) == len(predictions)  # the replies depend on the prompts
    # some rows stopped early at the stop token (cut off, not shown), others ran to max_new_tokens
    assert all(STOP_WORD not in prediction for prediction in predictions)
    lengths = [len(prediction) for prediction in predictions]
    assert min(lengths) < max(lengths) / 2
    assert [row["label"] for row in rows_8] == [f"answer {n}" if n != 3 else None for n in range(len(QUESTIONS))]
    assert all(QUESTIONS[n] in row["prompt"] for n, row in enumerate(rows_8))  # input order kept
    assert results_8["predict_scored_samples"] == len(QUESTIONS) - 1
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_exact_match"):
        assert results_1[key] == results_8[key]
    assert results_8["predict_samples_per_second"] > 0
    table = (tmp_path / "b8" / "predictions.md").read_text(encoding="utf-8")
    assert table.count("\n") == len(QUESTIONS) + 2
    # each row is the same as a plain generate() of that row alone
    from tunesmith.chat.engine import load_chat_engine

    engine = load_chat_engine(
        load_predict_config(
            None, [f"model_name_or_path={tiny_model_dir}", "eval_dataset=x", "output_dir=x"]
        ).inference.model
    )
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    ids = engine.encode(messages)
    out = engine.model.generate(
        **ids,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=engine.stop_token_ids(),
        pad_token_id=engine.tokenizer.pad_token_id,
    )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    stop = [i for i, t in enumerate(new) if t in engine.stop_token_ids()]
    expected = engine.tokenizer.decode(new[: stop[0]] if stop else new, skip_special_tokens=True)
    assert rows_8[1]["predict"] == expected


def test_resume_predicts_only_the_missing_rows(contextual_tiny_model_dir, predict_data, tmp_path):
    tiny_model_dir = contextual_tiny_model_dir
    _, full = predict(tiny_model_dir, predict_data, tmp_path / "full")
    output = tmp_path / "resumed"
    output.mkdir()
    # an interrupted run: rows 0 and 5 done (row 5 marked so a re-generation would show), a half-written last line
    done = [{"index": 0, **full[0]}, {"index": 5, **full[5], "predict": "KEPT FROM THE FIRST RUN"}]
    (output / PARTIAL_FILE).write_text("".join(json.dumps(r) + "\n" for r in done) + '{"index": 7, "pro')
    # a second crash, after one more batch: the file holds whole lines only, the first run's rows and the new batch
    from tunesmith.evaluate import predict as predict_module

    real_batches = predict_module.generate_batches

    def crash_after_one_batch(*args, **kwargs):
        yield next(real_batches(*args, **kwargs))
        raise KeyboardInterrupt

    with mock.patch.object(predict_module, "generate_batches", crash_after_one_batch), pytest.raises(KeyboardInterrupt):
        predict(tiny_model_dir, predict_data, output, "per_device_eval_batch_size=3")
    saved = [json.loads(line) for line in (output / PARTIAL_FILE).read_text().splitlines()]
    assert [record["index"] for record in saved][:2] == [0, 5] and len(saved) == 2 + 3

    results, rows = predict(tiny_model_dir, predict_data, output)
    assert results["predict_generated_samples"] == len(QUESTIONS) - 5
    assert rows[5]["predict"] == "KEPT FROM THE FIRST RUN"
    assert [row for n, row in enumerate(rows) if n != 5] == [row for n, row in enumerate(full) if n != 5]
    assert not (output / PARTIAL_FILE).exists()


def test_predict_keys_are_checked_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="predict_with_generate"):
        load_predict_config(None, ["eval_dataset=a", "output_dir=o", "predict_with_generate=false"])
    with pytest.raises(ConfigError, match="not both"):
        load_predict_config(None, ["eval_dataset=a", "dataset=b", "output_dir=o"])
    with pytest.raises(ConfigError, match="preprocessing_num_workers"):
        load_predict_config(None, ["eval_dataset=a", "output_dir=o", "preprocessing_num_workers=4"])
    assert main(["predict", "eval_dataset=a", "output_dir=o", "num_beams=4"]) == 2


def test_cli_predicts_a_file_without_answers(tiny_model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "tang.json", [{"instruction": "完成這首詩", "input": "秋雨移弦望"}])
    output = tmp_path / "out"
    code = main(
        [
            "predict",
            f"model_name_or_path={tiny_model_dir}",
            f"eval_dataset={data}",
            f"output_dir={output}",
            "max_new_tokens=4",
            "do_sample=false",
        ]
    )
    assert code == 0
    record = json.loads((output / "generated_predictions.jsonl").read_text(encoding="utf-8"))
    assert record["label"] is None and "秋雨移弦望" in record["prompt"]
    assert json.loads((output / "predict_results.json").read_text())["predict_scored_samples"] == 0


def test_missing_metric_libraries_name_the_extra(monkeypatch):
    import importlib.util

    from tunesmith.evaluate.metrics import require_metric_libraries

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "jieba" else real_find_spec(name))
    with pytest.raises(ConfigError, match=r"jieba.*tunesmith\[evaluate\]"):
        require_metric_libraries()


def test_example_predict_config_reads_the_identity_rows_with_their_placeholders_filled():
    from tests.conftest import REPO
    from tunesmith.evaluate.predict import read_prompt_rows

    config = load_predict_config(REPO / "examples" / "predict" / "identity_lora_predict.yaml", ["name=N", "author=A"])
    assert config.inference.model.adapter_name_or_path == ["outputs/identity_lora"]
    assert not config.inference.generation.do_sample
    rows = read_prompt_rows(config.predict)
    assert len(rows) == config.predict.max_samples == 16
    assert all(row.label and "{{" not in row.label for row in rows) and "N" in rows[0].label


def test_do_predict_after_training_predicts_eval_dataset_with_the_trained_adapter(
    tmp_path, tiny_model_dir, identity_data
):
    from tests.unit.test_train import train_args
    from tunesmith.config.load import load_config

    args = train_args(tmp_path, tiny_model_dir, identity_data, "eval_dataset=identity", "max_new_tokens=4")
    assert main(args) == 2  # generation keys shape generated replies: predict_with_generate must be on
    args = train_args(tmp_path, tiny_model_dir, identity_data, "eval_dataset=identity", "max_samples=3")
    with pytest.raises(ConfigError, match="predict_with_generate"):
        load_config(None, [*args[1:], "do_predict=true"])
    assert main([*args, "do_predict=true", "predict_with_generate=true", "per_device_eval_batch_size=2"]) == 0
    output = tmp_path / "out"
    rows = [json.loads(line) for line in (output / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("Tunesmith" in row["label"] for row in rows)
    results = json.loads((output / "predict_results.json").read_text())
    assert results["predict_scored_samples"] == 3 and "predict_bleu-4" in results

    from tunesmith.config.predict import predict_config_after_training

    predict = predict_config_after_training(
        load_config(None, [*args[1:], "do_predict=true", "predict_with_generate=true"])
    )
    assert predict.inference.model.adapter_name_or_path == [str(output)]
    assert predict.inference.model.model_name_or_path == str(tiny_model_dir)


def test_evaluation_during_training_scores_generated_replies(tmp_path, tiny_model_dir, identity_data):
    """predict_with_generate with val_size: each evaluation logs BLEU/ROUGE of the held-out rows' replies, equal to
    generating them one row at a time with the trained adapter and scoring them by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.unit.test_train import train_args
    from tunesmith.config.load import load_config
    from tunesmith.data.dataset import load_sft_data
    from tunesmith.evaluate.metrics import mean_similarity

    settings = ["val_size=4", "eval_steps=2", "predict_with_generate=true", "do_sample=false", "max_new_tokens=6"]
    settings += ["do_eval=true", "per_device_eval_batch_size=3"]
    args = train_args(tmp_path, tiny_model_dir, identity_data, *settings)
    assert main(args) == 0
    output = tmp_path / "out"
    evals = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evals = [record for record in evals if "eval_loss" in record]
    assert [record["step"] for record in evals] == [2, 4, 4]  # every eval_steps, then do_eval's after the last step
    assert all({"eval_bleu-4", "eval_rouge-1", "eval_rouge-2", "eval_rouge-l"} <= set(record) for record in evals)

    # the last evaluation, by hand: the held-out rows, one greedy generate() each, the reply cut at <|im_end|>
    tokenizer = AutoTokenizer.from_pretrained(output)
    config = load_config(None, args[1:])
    rows = load_sft_data(config.data, tokenizer, tokenizer.chat_template, config.train.seed).eval
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), output).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pairs = []
    for row in rows:
        start = next(position for position, label in enumerate(row["labels"]) if label != -100)
        prompt = torch.tensor([row["input_ids"][:start]])
        with torch.no_grad():
            new = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, eos_token_id=end)[0, start:]
        reply = new.tolist()[: new.tolist().index(end)] if end in new.tolist() else new.tolist()
        label = [token for token in row["input_ids"][start:] if token != end]
        pairs.append((tokenizer.decode(reply), tokenizer.decode(label).strip()))
    assert len(pairs) == 4 and any(label for _, label in pairs)
    expected = mean_similarity(pairs)
    for name in ("bleu-4", "rouge-1", "rouge-l"):
        assert evals[-1][f"eval_{name}"] == pytest.approx(expected[name], abs=1e-6), name


def test_two_torchrun_processes_predict_their_shares_and_rank_0_writes_them_in_order(
    stopping_model_dir, predict_data, tmp_path
):
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO
    from tunesmith.distributed import launch

    _, one_process = predict(stopping_model_dir, predict_data, tmp_path / "one", "per_device_eval_batch_size=3")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(launch.free_port()), "-m", "tunesmith"]
    command += ["predict", f"model_name_or_path={stopping_model_dir}", f"eval_dataset={predict_data}"]
    command += [f"output_dir={tmp_path / 'two'}", "do_sample=false", "max_new_tokens=12"]
    command += ["per_device_eval_batch_size=3"]
    environ = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT")}
    result = subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "predict: 2 processes generated 5, 5 rows" in result.stdout  # both processes worked
    lines = (tmp_path / "two" / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == one_process  # the same replies, in input order
    assert not list((tmp_path / "two").glob("*.partial*"))
