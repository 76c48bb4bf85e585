"""Stages pt and rm on a tiny random Llama: the shipped examples, the reward model's outputs loaded by plain
transformers + peft, `tunesmith score`, chat's refusal, the config rules, `data check` and the memory estimate."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import DEMO_DATA, REPO, example_for
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
SHORT_RUN = ["max_steps=3", "logging_steps=1", "per_device_train_batch_size=2", "gradient_accumulation_steps=1"]


def run_example(name: str | Path, model: Path, output: Path, *overrides: str) -> Path:
    """A short `tunesmith train` run of examples/`name` (or of the config file `name`, a path)."""
    args = [f"model_name_or_path={model}", f"dataset_dir={DEMO_DATA}", f"output_dir={output}", "cutoff_len=128"]
    assert main(["train", str(REPO / "examples" / name), *args, *SHORT_RUN, *overrides]) == 0
    return output


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# --- stage pt -------------------------------------------------------------------------------------------------------


def test_pt_packs_by_default_and_obeys_an_explicit_choice():
    def packing(*overrides: str) -> bool:
        return load_config(None, ["dataset=c4_demo", *overrides]).data.packing

    assert packing("stage=pt") is True
    assert packing("stage=pt", "packing=false") is False
    assert packing("stage=pt", "streaming=true", "max_steps=2") is False  # a stream cannot be packed
    assert packing("stage=sft") is False
    with pytest.raises(ConfigError, match="train_on_prompt"):
        load_config(None, ["dataset=c4_demo", "stage=pt", "train_on_prompt=true"])


def test_pt_data_supervises_every_token_in_packed_rows(tiny_model_dir):
    from transformers import AutoTokenizer

    from tunesmith.data import multimodal
    from tunesmith.train.sft import prepare_chat_format, prepare_data

    config = load_config(
        None, ["stage=pt", "dataset=c4_demo,wiki_demo", f"dataset_dir={DEMO_DATA}", "cutoff_len=64", "max_samples=4"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = prepare_chat_format(config, tokenizer, None)
    data, _ = prepare_data(config, tokenizer, template, multimodal.ModelMedia("tiny"))
    rows = data.train.to_list()
    assert rows and all(row["labels"] == row["input_ids"] for row in rows)
    assert all(len(row["input_ids"]) <= 64 for row in rows) and any(len(row["seq_lens"]) > 1 for row in rows)
    pieces = [
        row["input_ids"][sum(row["seq_lens"][:i]) : sum(row["seq_lens"][: i + 1])]
        for row in rows
        for i in range(len(row["seq_lens"]))
    ]
    # each text (4 c4 rows, 4 wiki lines) ends with EOS in its last piece (unless that piece was the EOS alone)
    assert sum(piece[-1] == tokenizer.eos_token_id for piece in pieces) >= 7


def test_pt_example_trains_and_streams(tmp_path, tiny_model_dir):
    output = run_example("pt_c4.yaml", tiny_model_dir, tmp_path / "pt", "val_size=2", "eval_steps=3", "max_samples=8")
    saved = yaml.safe_load((output / "tunesmith_config.yaml").read_text())
    assert saved["stage"] == "pt" and saved["packing"] is True
    logged = records(output)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert any("eval_loss" in r for r in logged) and (output / "adapter_model.safetensors").is_file()

    streamed = run_example(
        "pt_c4.yaml", tiny_model_dir, tmp_path / "stream", "streaming=true", "max_steps=2", "val_size=0"
    )
    assert [r["step"] for r in records(streamed) if "loss" in r] == [1, 2]


# --- stage rm -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    output = tmp_path_factory.mktemp("rm") / "out"
    return run_example("rm_lora.yaml", tiny_model_dir, output, "val_size=4", "learning_rate=1e-2", "max_samples=12")


def plain_peft_reward(base: Path, adapter: Path, messages: list[dict]) -> float:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits[0, 0].item()


def test_rm_reports_accuracy_and_margin_before_and_after(reward_adapter):
    evaluations = [r for r in records(reward_adapter) if "eval_accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 3]  # before the first step and after the last
    assert all(0 <= r["eval_accuracy"] <= 1 and "eval_margin" in r for r in evaluations)
    assert evaluations[0]["eval_margin"] != evaluations[-1]["eval_margin"]  # the model changed
    train_logs = [r for r in records(reward_adapter) if "loss" in r]
    assert len(train_logs) == 3 and all("accuracy" in r and "margin" in r for r in train_logs)


def test_rm_adapter_saves_the_head_and_scores_with_plain_peft(reward_adapter, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    adapter_config = json.loads((reward_adapter / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    weights = load_file(reward_adapter / "adapter_model.safetensors")
    assert any(name.endswith("score.weight") for name in weights)

    expected = plain_peft_reward(tiny_model_dir, reward_adapter, CONVERSATION)
    capsys.readouterr()
    assert main(["score", "--adapter", str(reward_adapter), "--messages", json.dumps(CONVERSATION)]) == 0
    assert float(capsys.readouterr().out.strip()) == pytest.approx(expected, abs=1e-5)


def test_score_reads_a_file_of_conversations(reward_adapter, tmp_path, capsys):
    other = [CONVERSATION[0], {"role": "assistant", "content": "I do not know."}]
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump([{"messages": CONVERSATION}, {"messages": other}]))
    assert main(["score", "--adapter", str(reward_adapter), "--file", str(path)]) == 0
    scores = [float(line) for line in capsys.readouterr().out.split()]
    assert len(scores) == 2 and scores[0] != scores[1]
    assert main(["score", "--adapter", str(reward_adapter), "--messages", json.dumps(CONVERSATION[:1])]) == 2
    assert "last message must be the assistant" in capsys.readouterr().err
    assert main(["score", "--adapter", str(reward_adapter), "--file", str(path), "temperature=0"]) == 2
    assert "`temperature`" in capsys.readouterr().err


def test_chat_refuses_a_reward_model(reward_adapter, capsys):
    assert main(["chat", "--adapter", str(reward_adapter), "--prompt", "hi"]) == 2
    error = capsys.readouterr().err
    assert "is a reward model" in error and "tunesmith score" in error


def test_rm_full_model_scores_with_plain_transformers(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = example_for("rm_lora.yaml", "full", tmp_path)
    output = run_example(config, tiny_model_dir, tmp_path / "full", "max_steps=1")
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    tokenizer = AutoTokenizer.from_pretrained(output)
    with torch.no_grad():
        expected = model(**tokenizer.apply_chat_template(CONVERSATION, return_tensors="pt", return_dict=True))
    capsys.readouterr()
    assert main(["score", "--model", str(output), "--messages", json.dumps(CONVERSATION)]) == 0
    assert float(capsys.readouterr().out.strip()) == pytest.approx(expected.logits[0, 0].item(), abs=1e-5)
    # a model that only generates is not a reward model
    assert main(["score", "--model", str(tiny_model_dir), "--messages", json.dumps(CONVERSATION)]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_rm_config_refusals():
    base = ["stage=rm", "dataset=dpo_en_demo"]
    with pytest.raises(ConfigError, match="packing"):
        load_config(None, [*base, "packing=true"])
    with pytest.raises(ConfigError, match="mask_history"):
        load_config(None, [*base, "mask_history=true"])


@pytest.mark.parametrize(("stage", "dataset"), [("rm", "dpo_en_demo"), ("pt", "c4_demo")])
def test_data_check_reads_each_stage(tiny_model_dir, capsys, stage, dataset):
    args = [f"model_name_or_path={tiny_model_dir}", f"stage={stage}", f"dataset={dataset}", f"dataset_dir={DEMO_DATA}"]
    assert main(["data", "check", *args]) == 0
    assert f"stage {stage}" in capsys.readouterr().out


def test_memory_estimate_of_a_reward_model():
    from tunesmith.estimate.memory import ModelShape, Settings, estimate

    hidden, vocab = 64, 256
    shape = ModelShape.from_config(
        {
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        }
    )
    settings = Settings(bf16=False, batch_size=1, seq_len=64)
    reward = estimate(shape, replace(settings, stage="rm"), device="cpu")
    causal = estimate(shape, replace(settings, batch_size=2), device="cpu")
    assert reward.activations == causal.activations  # chosen and rejected rows in one batch
    assert causal.weights - reward.weights == 4 * vocab * hidden  # no lm_head: the score head reads hidden states
    assert reward.logits < causal.logits / 10
    # pt is sft's run, packed by default
    assert load_config(None, ["stage=pt", "dataset=c4_demo"]).data.packing


def test_rm_refuses_to_train_on_an_adapter_without_the_head(tmp_path):
    from tunesmith.model.adapters import check_adapter_saves

    sft_adapter, reward_adapter = tmp_path / "sft", tmp_path / "rm"
    for folder, saved in ((sft_adapter, None), (reward_adapter, ["score"])):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "modules_to_save": saved}))
    with pytest.raises(ConfigError, match="create_new_adapter: true"):
        check_adapter_saves(sft_adapter, "score")
    check_adapter_saves(reward_adapter, "score")  # a reward adapter trains further
