"""What the tutorials tell users to type: `tunesmith env`, torchtune's ls/cp/run and configs, Alpaca-LoRA's flags,
and the shipped recipe for each workflow, each run for a step or two on a tiny model."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TEST_FIXTURES
from tunesmith import env_command
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.config.load import read_values
from tunesmith.config.recipes import RECIPE_DIR, recipe_names, recipe_overrides, recipe_path
from tunesmith.errors import ConfigError

TORCHTUNE = TEST_FIXTURES / "torchtune"
ALPACA_ROWS = TEST_FIXTURES / "demo_data" / "alpaca_en_demo.json"


def table(output: str) -> dict[str, str]:
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ")]
    return {name.strip(): value.strip() for name, value in rows if name.strip()}


# tunesmith env


def test_env_reports_versions_and_check_says_what_works_here(capsys, monkeypatch):
    monkeypatch.setattr(env_command, "SMOKE_SECONDS", 0.05)
    assert main(["env", "--check"]) == 0
    rows = table(capsys.readouterr().out)
    for distribution in ("transformers", "peft", "trl", "bitsandbytes", "vllm", "flash-attn", "unsloth"):
        installed = importlib.util.find_spec(distribution.replace("-", "_")) is not None
        expected = importlib.metadata.version(distribution) if installed else "not installed"
        assert rows[distribution] == expected
    import torch

    assert rows["torch"].startswith(torch.__version__)
    assert rows["bf16 matmul on cpu"].startswith("ok"), rows["bf16 matmul on cpu"]
    assert rows["all-reduce"].startswith("ok"), rows["all-reduce"]
    if not torch.cuda.is_available():  # honest on a CPU: no FlashAttention, and why
        assert rows["GPUs"].startswith("none visible")
        assert rows["will work: FlashAttention-2"].startswith("no: ")
        assert rows["will work: Liger kernels"].startswith("no: ")


# recipes: ls, cp, train NAME


def test_ls_lists_every_recipe_and_cp_writes_a_copy_that_runs_anywhere(tmp_path, capsys, monkeypatch):
    assert main(["ls"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert set(recipe_names()) <= set(listed)
    assert len(recipe_names()) >= 7

    assert main(["cp", "identity_lora", str(tmp_path / "mine.yaml")]) == 0
    monkeypatch.chdir(tmp_path)  # the copy's data must not depend on the folder it runs from
    copied = yaml.safe_load((tmp_path / "mine.yaml").read_text())
    assert Path(copied["dataset_dir"]).is_absolute() and (Path(copied["dataset_dir"]) / "identity.json").is_file()
    assert load_config(tmp_path / "mine.yaml").data.dataset == ["identity"]
    capsys.readouterr()
    assert main(["cp", "identity_lora", str(tmp_path / "mine.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_validates_with_its_shipped_data(name):
    config = load_config(recipe_path(name), recipe_overrides(name))
    assert Path(config.data.dataset_dir).is_dir()
    registry = json.loads((Path(config.data.dataset_dir) / "dataset_info.json").read_text())
    for dataset in config.data.dataset:
        assert dataset in registry or (Path(config.data.dataset_dir) / dataset).is_file(), dataset


RECIPE_RUNS = {  # recipe → the tiny model it runs on (bitsandbytes quantizes only blocks 64 wide or wider)
    "identity_lora": "tiny_model_dir",
    "identity_qlora": "wide_tiny_model_dir",
    "summarize_lora": "tiny_model_dir",
    "alpaca_lora_8bit": "wide_tiny_model_dir",
    "tang_qlora": "wide_tiny_model_dir",
}


@pytest.mark.parametrize("name", sorted(RECIPE_RUNS))
def test_recipe_runs_by_name(name, tmp_path, request, monkeypatch):
    monkeypatch.chdir(tmp_path)  # by name, from a folder without data: the recipe brings its own
    model = request.getfixturevalue(RECIPE_RUNS[name])
    output = tmp_path / "out"
    short = ["max_steps=2", "gradient_accumulation_steps=1", "per_device_train_batch_size=2", "warmup_steps=0"]
    short += ["eval_steps=2", "save_steps=2", "logging_steps=1", "plot_loss=false", "max_samples=24"]
    assert main(["train", name, f"model_name_or_path={model}", f"output_dir={output}", *short]) == 0
    assert (output / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((output / "tunesmith_config.yaml").read_text())
    shipped = yaml.safe_load(recipe_path(name).read_text())
    assert saved["dataset_dir"] == str(RECIPE_DIR / "data")
    if name == "tang_qlora":  # TensorBoard reads its event files; the eval loss of the validation split is logged
        assert list((output / "runs").rglob("events.out.tfevents.*"))
        assert any("eval_loss" in line for line in (output / "metrics.jsonl").read_text().splitlines())
    if "template" in shipped:
        assert saved["template"] == shipped["template"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_recipes_are_two_process_deepspeed_runs(stage):
    config = load_config(recipe_path(f"zero{stage}_lora"), recipe_overrides(f"zero{stage}_lora"))
    assert config.train.nproc_per_node == 2
    assert json.loads(Path(config.train.deepspeed).read_text())["zero_optimization"]["stage"] == stage


def test_download_without_a_network_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "no-such-org/no-such-model", "--output-dir", str(tmp_path / "m")]) == 2
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err


# torchtune configs


def tiny_model_paths(model: Path) -> list[str]:
    """The overrides that swap torchtune's Llama 3.1 8B paths for a tiny Llama, and its hub data for a file."""
    return [
        f"checkpointer.checkpoint_dir={model}",
        "checkpointer.checkpoint_files=[model.safetensors]",
        f"tokenizer.path={model}/tokenizer.json",
        "dataset.source=json",
        f"dataset.data_files={ALPACA_ROWS}",
    ]


def test_torchtune_single_device_config_trains_unchanged_but_for_the_paths(tmp_path, tiny_model_dir, capsys):
    output = tmp_path / "tt"
    short = ["max_steps_per_epoch=2", "lr_scheduler.num_warmup_steps=1"]  # 100 warm-up steps would train nothing
    overrides = [*tiny_model_paths(tiny_model_dir), *short, f"output_dir={output}"]
    assert main(["train", str(TORCHTUNE / "8B_lora_single_device.yaml"), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "torchtune `device: cuda`" in printed  # an accepted key says what it means here
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    saved = yaml.safe_load((output / "tunesmith_config.yaml").read_text())
    expected = {
        "learning_rate": 3e-4,
        "weight_decay": 0.01,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 8,
        "max_steps": 2,
        "warmup_steps": 1,
        "lr_scheduler_type": "cosine",
        "max_grad_norm": 0.0,  # clip_grad_norm: null, torchtune does not clip
        "pure_bf16": True,  # dtype: bf16
        "gradient_checkpointing": True,
        "train_on_prompt": True,  # alpaca_dataset's default train_on_input
    }
    assert {key: saved[key] for key in expected} == expected
    assert saved["template"].endswith("alpaca_lora/alpaca.json")
    assert len((output / "metrics.jsonl").read_text().splitlines()) >= 1


def test_torchtune_distributed_config_through_tune_run(tmp_path, tiny_model_dir, capsys):
    config = str(TORCHTUNE / "8B_lora.yaml")
    args = ["run", "lora_finetune_distributed", "--nproc_per_node", "2", "--config", config]
    assert main([*args, *tiny_model_paths(tiny_model_dir), "--print-config"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    for setting in ("fsdp=full_shard", "nproc_per_node=2", "val_size=0.05", "eval_strategy=no", "lora_alpha=16"):
        assert setting in printed, printed
    refusals = {
        "trains full": ["full_finetune_single_device", "--config", config, *tiny_model_paths(tiny_model_dir)],
        "does not ship torchtune's configs": ["lora_finetune_single_device", "--config", "llama3_1/8B_lora"],
        "tunesmith chat": ["generate", "--config", config],
    }
    for message, arguments in refusals.items():
        assert main(["run", *arguments]) == 2
        assert message in capsys.readouterr().err


def summarize_config(tmp_path: Path, model: Path) -> Path:
    rows = [{"dialogue": f"A: hi {i}\nB: hello", "summary": f"greeting {i}"} for i in range(4)]
    (tmp_path / "dialogues.json").write_text(json.dumps(rows))
    config = {
        "output_dir": str(tmp_path / "out"),
        "model": {"_component_": "torchtune.models.llama3_2.lora_llama3_2_1b", "lora_attn_modules": ["q_proj"]},
        "tokenizer": {
            "_component_": "torchtune.models.llama3.llama3_tokenizer",
            "path": f"{model}/tokenizer.json",
            "prompt_template": "torchtune.data.SummarizeTemplate",
            "max_seq_len": 256,
        },
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(model)},
        "dataset": {
            "_component_": "torchtune.datasets.instruct_dataset",
            "source": "json",
            "data_files": str(tmp_path / "dialogues.json"),
            "column_map": {"input": "dialogue", "output": "summary"},
            "train_on_input": False,
            "split": "train",
        },
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": "${output_dir}"},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 2e-4},
        "epochs": 2,
    }
    path = tmp_path / "summarize.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_torchtune_instruct_dataset_column_map_and_summarize_template(tmp_path, tiny_model_dir):
    config = load_config(summarize_config(tmp_path, tiny_model_dir), ["optimizer.lr=1e-3", "max_steps_per_epoch=3"])
    assert config.data.template == "summarize"
    assert config.data.column_map == {"instruction": "dialogue", "output": "summary"}
    assert config.data.cutoff_len == 256 and not config.data.train_on_prompt
    assert config.train.learning_rate == 1e-3  # the dotted override won over the file
    assert config.train.max_steps == 6  # 3 steps in each of 2 epochs
    assert config.method.lora_target == ["q_proj"]


def test_torchtune_tensorboard_logger_writes_where_its_log_dir_says(tmp_path, tiny_model_dir):
    logger = "metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger"
    config = load_config(summarize_config(tmp_path, tiny_model_dir), [logger, "metric_logger.log_dir=${output_dir}/tb"])
    assert config.train.report_to == ["tensorboard"]
    assert config.train.logging_dir == f"{tmp_path / 'out'}/tb"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset._component_=torchtune.datasets.samsum_dataset", "torchtune.datasets.samsum_dataset"),
        ("model._component_=torchtune.models.phi3.lora_phi3_mini", "torchtune.models.phi3.lora_phi3_mini"),
        ("optimizer._component_=torch.optim.Adagrad", "torch.optim.Adagrad"),
        ("profiler.enabled=true", "profiler.enabled"),
        ("shuffle=false", "shuffle"),
        ("wandb_mode=offline", "`wandb_mode` has no tunesmith meaning"),
        ("optimizer.betas=[0.9, 0.95]", "betas"),
        ("checkpointer.checkpoint_files=[model-00001-of-00002.safetensors]", "checkpoint_files"),
        ("tokenizer.path=/elsewhere/tokenizer.model", "outside checkpointer.checkpoint_dir"),
    ],
)
def test_torchtune_parts_we_cannot_honour_are_refused_by_name(override, message, tmp_path, tiny_model_dir):
    overrides = [*tiny_model_paths(tiny_model_dir), override]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        read_values(TORCHTUNE / "8B_lora_single_device.yaml", overrides)


def test_torchtune_model_family_must_match_the_checkpoint(tmp_path, tiny_model_dir):
    overrides = [*tiny_model_paths(tiny_model_dir), "model._component_=torchtune.models.qwen2_5.lora_qwen2_5_0_5b"]
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        read_values(TORCHTUNE / "8B_lora_single_device.yaml", overrides)


def test_torchtune_overrides_delete_keys_and_references_resolve(tmp_path, tiny_model_dir):
    values = read_values(
        TORCHTUNE / "8B_lora.yaml", [*tiny_model_paths(tiny_model_dir), "~dataset.split", "~dataset_val"]
    )
    assert "val_size" not in values
    with pytest.raises(ConfigError, match="no key"):
        read_values(TORCHTUNE / "8B_lora.yaml", ["~dataset.no_such_key"])


# Alpaca-LoRA's finetune.py flags

FINETUNE_COMMAND = [
    *("--batch_size", "8", "--micro_batch_size", "4", "--num_epochs", "1", "--learning_rate", "3e-4"),
    *("--cutoff_len", "256", "--val_set_size", "4", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05"),
    *("--lora_target_modules", "[q_proj,v_proj]", "--train_on_inputs", "--group_by_length"),
    *("--prompt_template_name", "alpaca", "--load_in_8bit"),
]


def test_alpaca_lora_flags_train_as_finetune_py_and_print_the_yaml_once(tmp_path, wide_tiny_model_dir, capsys):
    output = tmp_path / "lora-alpaca"
    paths = ["--base_model", str(wide_tiny_model_dir), "--data_path", str(ALPACA_ROWS), "--output_dir", str(output)]
    assert main(["train", *paths, *FINETUNE_COMMAND]) == 0
    printed = capsys.readouterr().out
    assert printed.count("equivalent tunesmith config") == 1
    yaml_text = printed.split("equivalent tunesmith config")[1].split("\n", 1)[1].split("\nconfig: ")[0]
    equivalent = yaml.safe_load(yaml_text)
    assert equivalent["gradient_accumulation_steps"] == 2  # batch_size 8 / micro_batch_size 4
    assert equivalent["quantization_bit"] == 8 and equivalent["lora_target"] == ["q_proj", "v_proj"]
    saved = yaml.safe_load((output / "tunesmith_config.yaml").read_text())
    assert saved["train_on_prompt"] is True and saved["group_by_length"] is True
    assert saved["template"].endswith("alpaca_lora/alpaca.json") and saved["val_size"] == 4
    assert (
        load_config(None, [f"{key}={json.dumps(value)}" for key, value in equivalent.items()]).train.warmup_steps == 100
    )
    assert any("eval_loss" in line for line in (output / "metrics.jsonl").read_text().splitlines())


def test_alpaca_lora_defaults_are_finetune_py_defaults(tmp_path, capsys):
    paths = ["--base_model", "m", "--data_path", str(ALPACA_ROWS), "--output_dir", str(tmp_path)]
    assert main(["train", *paths, "--train_on_inputs", "False", "--print-config"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    for setting in ("quantization_bit=8", "gradient_accumulation_steps=32", "per_device_train_batch_size=4"):
        assert setting in printed
    assert "train_on_prompt" not in printed  # False: the default, so not listed among the changed keys
    assert main(["train", "--base_model", "m"]) == 2
    assert "hub dataset" in capsys.readouterr().err
    assert main(["train", "identity_lora", "--lora_r", "16"]) == 2  # flags and a file would fight over every key
    assert "describe a whole run" in capsys.readouterr().err
