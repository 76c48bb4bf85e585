"""The shipped export examples and LLaMA-Factory's merge YAMLs run through `tunesmith export`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.unit.test_export import make_adapter
from tunesmith.cli import main

FIXTURES = REPO / "tests" / "fixtures" / "llamafactory" / "merge_lora"


def test_merge_lora_example(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, tmp_path / "adapter")
    overrides = [f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={tmp_path / 'adapter'}"]
    assert (
        main(["export", str(REPO / "examples" / "merge_lora.yaml"), *overrides, f"export_dir={tmp_path / 'out'}"]) == 0
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "Modelfile").is_file()


def test_export_gguf_example(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, tmp_path / "adapter")
    overrides = [f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={tmp_path / 'adapter'}"]
    assert (
        main(["export", str(REPO / "examples" / "export_gguf.yaml"), *overrides, f"export_dir={tmp_path / 'm'}"]) == 0
    )
    assert sorted(path.name for path in (tmp_path / "m").glob("*.gguf")) == ["m-f16.gguf", "m-q8_0.gguf"]
    assert "FROM ./m-q8_0.gguf" in (tmp_path / "m" / "Modelfile").read_text()


@pytest.mark.parametrize("fixture", ["llama3_lora_sft.yaml", "qwen3_full_sft.yaml"])
def test_llamafactory_merge_yaml_runs_unchanged(tiny_model_dir, tmp_path, fixture):
    overrides = [f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "template=chatml"]
    if "lora" in fixture:
        make_adapter(tiny_model_dir, tmp_path / "adapter")
        overrides.append(f"adapter_name_or_path={tmp_path / 'adapter'}")
    assert main(["export", str(FIXTURES / fixture), *overrides]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_pitfall_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys):
    Path(tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["export", f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'taken'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "already holds other files" in error


@pytest.mark.parametrize("method", ["lora", "freeze", "full"])
def test_training_run_directories_export(tiny_model_dir, identity_data, tmp_path, method):
    """What `tunesmith train` writes exports: the adapter dir for lora, the run dir itself for full and freeze."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.unit.test_export import PROMPT_IDS, load_exported
    from tests.unit.test_train import lora_logits, train

    run = train(tmp_path, tiny_model_dir, identity_data, f"finetuning_type={method}", "max_steps=2")
    source = ["adapter_name_or_path=" + str(run)] if method == "lora" else [f"model_name_or_path={run}"]
    args = [
        "export",
        *source,
        f"finetuning_type={method}",
        f"export_dir={tmp_path / 'exported'}",
        "infer_dtype=float32",
    ]
    assert main(args) == 0
    with torch.no_grad():
        exported = load_exported(tmp_path / "exported")(PROMPT_IDS).logits
        if method == "lora":
            expected = lora_logits(tiny_model_dir, run, PROMPT_IDS)
        else:
            expected = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()(PROMPT_IDS).logits
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=0)
