"""`tunesmith train` on a tiny random Llama: outputs, reload, resume, refusals. Seconds each."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tunesmith.cli import main


def train_args(tmp_path: Path, model: Path, data: Path, *overrides: str, output: str = "out") -> list[str]:
    """`tunesmith train` arguments for a short run on identity.json; later overrides win."""
    return [
        "train",
        f"model_name_or_path={model}",
        f"dataset_dir={data}",
        "dataset=identity",
        "name=Tunesmith",
        "author=the tunesmith team",
        f"output_dir={tmp_path / output}",
        "per_device_train_batch_size=2",
        "max_steps=4",
        "logging_steps=1",
        "learning_rate=1e-2",
        "cutoff_len=128",
        "max_samples=16",
        *overrides,
    ]


def train(tmp_path: Path, model: Path, data: Path, *overrides: str, output: str = "out") -> Path:
    assert main(train_args(tmp_path, model, data, *overrides, output=output)) == 0
    return tmp_path / output


def lora_logits(model_dir: Path, adapter_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids).logits


def test_lora_run_writes_everything_a_person_needs(tmp_path, tiny_model_dir, identity_data):
    output = train(tmp_path, tiny_model_dir, identity_data, "val_size=4", "save_steps=2", "eval_steps=2")
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "tunesmith_config.yaml",
        "metrics.jsonl",
        "training_loss.png",
        "checkpoint-2",
        "checkpoint-4",
    ):
        assert (output / name).exists(), name
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["tokens_per_second"] > 0 for r in records if "loss" in r)
    assert any("eval_loss" in r for r in records)
    # checkpoints hold no pickled code that resuming would run: every state file loads with weights_only=True
    state_files = [p for p in (output / "checkpoint-2").iterdir() if p.suffix in (".pt", ".pth")]
    assert {p.name for p in state_files} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    from transformers.trainer_pt_utils import safe_globals  # the numpy RNG types Trainer itself allow-lists

    with safe_globals():
        for path in state_files:
            torch.load(path, weights_only=True)
    config = json.loads((output / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert any(
        name.endswith("lora_B.weight") and tensor.abs().sum() > 0
        for name, tensor in load_file(output / "adapter_model.safetensors").items()
    )


def test_saved_adapter_reloads_in_plain_peft_with_the_same_logits(tmp_path, tiny_model_dir, identity_data):
    from tunesmith.config import load_config
    from tunesmith.train.sft import run_sft

    output_dir = tmp_path / "out"
    config = load_config(
        None,
        [
            f"model_name_or_path={tiny_model_dir}",
            f"dataset_dir={identity_data}",
            "dataset=identity",
            "name=T",
            "author=A",
            f"output_dir={output_dir}",
            "max_steps=3",
            "learning_rate=1e-2",
            "max_samples=8",
            "bf16=false",  # the in-memory model's forward would otherwise run under the Trainer's bf16 autocast
        ],
    )
    import tunesmith.train.sft as sft

    kept = {}
    original = sft.save_outputs

    def keep_trainer(trainer, *args, **kwargs):
        kept["model"] = trainer.model
        return original(trainer, *args, **kwargs)

    sft.save_outputs = keep_trainer
    try:
        run_sft(config)
    finally:
        sft.save_outputs = original
    input_ids = torch.tensor([[1, 520, 9531, 198, 4093, 359, 346, 47]])
    with torch.no_grad():
        in_memory = kept["model"].eval()(input_ids).logits
    reloaded = lora_logits(tiny_model_dir, output_dir, input_ids)
    assert (in_memory - reloaded).abs().max().item() <= 1e-5


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_model_dir, identity_data):
    settings = ("max_steps=6", "save_steps=3", "lora_dropout=0.1", "lr_scheduler_type=cosine", "warmup_steps=2")
    straight = train(tmp_path, tiny_model_dir, identity_data, *settings, output="straight")

    interrupted = tmp_path / "resumed"
    interrupted.mkdir()
    shutil.copytree(straight / "checkpoint-3", interrupted / "checkpoint-3")
    shutil.copy(straight / "tunesmith_run.json", interrupted)
    train(tmp_path, tiny_model_dir, identity_data, *settings, "resume_from_checkpoint=true", output="resumed")

    expected = load_file(straight / "adapter_model.safetensors")
    resumed = load_file(interrupted / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    assert max((expected[k] - resumed[k]).abs().max().item() for k in expected) <= 1e-6
    # and training changed the adapter after the checkpoint, so the comparison is not vacuous
    at_step_3 = load_file(straight / "checkpoint-3" / "adapter_model.safetensors")
    assert max((expected[k] - at_step_3[k]).abs().max().item() for k in expected) > 1e-4


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_save_a_normal_model_directory(tmp_path, tiny_model_dir, identity_data, method):
    from transformers import AutoModelForCausalLM

    layers = ["freeze_trainable_layers=1"] if method == "freeze" else []  # full refuses the freeze key
    output = train(tmp_path, tiny_model_dir, identity_data, f"finetuning_type={method}", *layers, "max_steps=2")
    trained = AutoModelForCausalLM.from_pretrained(output)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = {
        name for name, p in trained.named_parameters() if not torch.equal(p, dict(original.named_parameters())[name])
    }
    if method == "full":
        assert any("layers.0." in name for name in changed)
    else:  # only the last of the 2 layers trains
        assert changed and all("layers.1." in name for name in changed)


def test_output_dir_of_a_different_run_is_refused(tmp_path, tiny_model_dir, identity_data, capsys):
    train(tmp_path, tiny_model_dir, identity_data, "max_steps=2", "save_steps=1")
    other_shape = train_args(tmp_path, tiny_model_dir, identity_data, "lora_rank=16")
    assert main([*other_shape, "resume_from_checkpoint=true"]) == 2
    assert "belongs to a different run (lora_rank: 8 there, 16 now)" in capsys.readouterr().err
    assert main(other_shape) == 2
    assert "holds a different run" in capsys.readouterr().err


def test_lora_target_that_matches_nothing_lists_the_linear_layers(tmp_path, tiny_model_dir, identity_data, capsys):
    assert main(train_args(tmp_path, tiny_model_dir, identity_data, "lora_target=query_key_value")) == 2
    assert "query_key_value matches no linear layer of this model; its linear layers are: down_proj, gate_proj" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("example", ["qwen3_lora_sft.yaml", "llama3_lora_sft.yaml"])
def test_llamafactory_example_yaml_runs_unchanged(tmp_path, tiny_model_dir, identity_data, example):
    """LLaMA-Factory's own example, with only the model path, dataset_dir and output_dir swapped (and few steps)."""
    model = tiny_model_dir
    if example.startswith("llama3"):  # its template needs Llama 3's header tokens: give the tiny model those
        model = llama3_style_tiny_model(tmp_path, tiny_model_dir)
    config = REPO / "tests" / "fixtures" / "llamafactory" / example
    code = main(
        [
            "train",
            str(config),
            f"model_name_or_path={model}",
            f"dataset_dir={identity_data}",
            f"output_dir={tmp_path / 'out'}",
            "max_steps=2",
            "max_samples=8",
            "name=Tunesmith",
            "author=the tunesmith team",
        ]
    )
    assert code == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def llama3_style_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
            ]
        }
    )
    tokenizer.bos_token = "<|begin_of_text|>"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    target = tmp_path / "tiny-llama3"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, tiny_model_dir, identity_data):
    import signal
    import subprocess
    import sys
    import time

    output = tmp_path / "out"
    endless = train_args(tmp_path, tiny_model_dir, identity_data, "max_steps=100000", "save_steps=100000")
    process = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", *endless], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 240
    while not (output / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 130, log[-2000:]
    checkpoints = list(output.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "optimizer.pt").is_file()
    assert "Continue with resume_from_checkpoint=true" in log
    assert not (output / "adapter_model.safetensors").exists()  # a partial run is not passed off as finished

    step = int(checkpoints[0].name.split("-")[1])
    assert main([*endless, f"max_steps={step + 2}", "resume_from_checkpoint=true"]) == 0
    assert (output / "adapter_model.safetensors").is_file()


def test_streaming_trains_without_reading_ahead(tmp_path, tiny_model_dir, identity_data, capsys):
    """Line 301 of the file is not JSON: a run that reads the whole file first fails on it; a streaming run that
    holds out 4 rows, shuffles in a buffer of 8 and trains 3 steps of 2 rows (encoding 64 rows at a time) never gets
    there."""
    from tests.conftest import write_rows

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(300)
    ]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    with path.open("a") as file:
        file.write("this line is not JSON\n")
    settings = (f"dataset={path}", "max_samples=null", "max_steps=3", "val_size=4", "buffer_size=8")
    output = train(tmp_path, tiny_model_dir, identity_data, *settings, "streaming=true")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    capsys.readouterr()
    whole_file = train_args(tmp_path, tiny_model_dir, identity_data, *settings, "streaming=false", output="whole")
    assert main(whole_file) == 2
    assert "chat.jsonl line 301" in capsys.readouterr().err


def test_streaming_without_max_steps_is_refused_before_loading(capsys, tmp_path):
    assert main(["train", "dataset=x.jsonl", "streaming=true", f"output_dir={tmp_path}"]) == 2
    assert "`streaming: true` needs `max_steps`" in capsys.readouterr().err


def test_resume_true_with_no_checkpoint_says_so(tmp_path, tiny_model_dir, identity_data, capsys):
    (tmp_path / "out").mkdir()
    assert main(train_args(tmp_path, tiny_model_dir, identity_data, "resume_from_checkpoint=true")) == 2
    assert "holds no complete checkpoint-* folder to resume from" in capsys.readouterr().err


def test_overwrite_removes_what_the_earlier_run_wrote_and_nothing_else(tmp_path, tiny_model_dir, identity_data):
    """A LoRA run, then a full run over it: the stale adapter must go (chat --adapter would load it), the person's
    own files stay, and the record lists exactly what the run wrote."""
    from tunesmith.train.checkpoints import RUN_FILE, read_written

    output = tmp_path / "out"
    (output / "notes").mkdir(parents=True)
    (output / "notes" / "plan.txt").write_text("mine")
    (output / "README.txt").write_text("mine too")
    train(tmp_path, tiny_model_dir, identity_data, "max_steps=2", "save_steps=1")
    assert (output / "adapter_model.safetensors").is_file() and (output / "checkpoint-2").is_dir()
    everything = {path.name for path in output.iterdir()}
    assert set(read_written(output)) | {"checkpoint-1", "checkpoint-2"} == everything - {"notes", "README.txt"}
    (output / "added-later.txt").write_text("written between the runs")

    train(tmp_path, tiny_model_dir, identity_data, "finetuning_type=full", "max_steps=1", "overwrite_output_dir=true")
    names = {path.name for path in output.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "checkpoint-2"}.isdisjoint(names)
    assert {"notes", "README.txt", "added-later.txt", "model.safetensors", RUN_FILE, "checkpoint-1"} <= names
    assert (output / "notes" / "plan.txt").read_text() == "mine"
    assert set(read_written(output)) | {"checkpoint-1"} == names - {"notes", "README.txt", "added-later.txt"}
