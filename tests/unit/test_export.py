"""`tunesmith export`: merged weights equal base + adapter through peft, and the directory is complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tunesmith.config.export import load_export_config, parse_size
from tunesmith.errors import ConfigError, ModelError, OutputDirError
from tunesmith.export.pipeline import export_model

PROMPT_IDS = torch.tensor([[1, 520, 4030, 314, 260, 3358, 28, 49, 77, 9000, 30000, 2]])


def make_adapter(base_dir: Path, target: Path, seed: int = 1, with_tokenizer: bool = True, **lora_options):
    """A peft adapter with random (non-zero) B matrices and magnitudes, saved like a training run saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora_options}
    peft_model = get_peft_model(model, LoraConfig(**options))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name or "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    peft_model.save_pretrained(target)
    if with_tokenizer:
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(target)
    return peft_model.eval()


def run_export(*overrides: str):
    return export_model(load_export_config(None, list(overrides)))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT_IDS).logits


def load_exported(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "lora_options",
    [
        {},
        {"use_rslora": True},
        {"use_dora": True},
        {"modules_to_save": ["lm_head"]},
        {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["norm"]},
    ],
    ids=["lora", "rslora", "dora", "modules_to_save_head", "embedding_lora"],
)
def test_merged_logits_equal_peft(tiny_model_dir, tmp_path, lora_options):
    peft_model = make_adapter(tiny_model_dir, tmp_path / "adapter", **lora_options)
    result = run_export(
        f"model_name_or_path={tiny_model_dir}",
        f"adapter_name_or_path={tmp_path / 'adapter'}",
        f"export_dir={tmp_path / 'merged'}",
        "infer_dtype=float32",
        "export_size=6.3MB",
    )
    assert len(result.shard_files) > 1 and result.dtype == torch.float32
    merged = load_exported(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(peft_model), atol=1e-4, rtol=0)
    baseline = load_exported(tiny_model_dir)
    assert (logits(baseline) - logits(merged)).abs().max() > 1e-3  # the adapter really changed something


def test_two_adapters_merge_in_order(tiny_model_dir, tmp_path):
    from peft import PeftModel

    make_adapter(tiny_model_dir, tmp_path / "first", seed=1)
    make_adapter(tiny_model_dir, tmp_path / "second", seed=2, use_dora=True)
    run_export(
        f"model_name_or_path={tiny_model_dir}",
        f"adapter_name_or_path={tmp_path / 'first'},{tmp_path / 'second'}",
        f"export_dir={tmp_path / 'merged'}",
        "infer_dtype=float32",
    )
    expected = load_exported(tiny_model_dir)
    for adapter in ("first", "second"):
        expected = PeftModel.from_pretrained(expected, tmp_path / adapter).merge_and_unload()
    torch.testing.assert_close(logits(load_exported(tmp_path / "merged")), logits(expected), atol=1e-4, rtol=0)
    # An adapter trained on top of another (its run's adapter_name_or_path) brings it along, as chat applies it.
    (tmp_path / "second" / "tunesmith_config.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {tmp_path / 'first'}\ncreate_new_adapter: true\n"
    )
    run_export(
        f"adapter_name_or_path={tmp_path / 'second'}", f"export_dir={tmp_path / 'stacked'}", "infer_dtype=float32"
    )
    torch.testing.assert_close(logits(load_exported(tmp_path / "stacked")), logits(expected), atol=1e-4, rtol=0)


def test_directory_is_complete(tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    make_adapter(tiny_model_dir, tmp_path / "adapter")
    trained_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    tokenizer.chat_template = trained_template
    tokenizer.save_pretrained(tmp_path / "adapter")
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = None  # a key left by a quantized load must not survive
    (model_dir / "config.json").write_text(json.dumps(config))
    result = run_export(
        f"model_name_or_path={model_dir}",
        f"adapter_name_or_path={tmp_path / 'adapter'}",
        f"export_dir={tmp_path / 'merged'}",
        "export_size=0.00315",
    )
    out = tmp_path / "merged"
    assert result.dtype == torch.bfloat16  # auto: the float32 model is written in bfloat16
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and "quantization_config" not in written and written["tie_word_embeddings"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    names = []
    for file in files:
        assert (out / file).stat().st_size <= 3_150_000 + 10_000
        with safe_open(str(out / file), framework="pt") as handle:
            shard_names = list(handle.keys())
            names += shard_names
            assert all(handle.get_tensor(name).dtype == torch.bfloat16 for name in shard_names)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: saved once
    assert sorted(names) == sorted(index["weight_map"])
    assert AutoTokenizer.from_pretrained(out).chat_template == trained_template
    eos = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert eos in torch.tensor(generation["eos_token_id"]).reshape(-1).tolist()
    assert not list(tmp_path.glob(".merged*"))  # no temporary directory left


@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_full_run_directory_exports(tiny_model_dir, tmp_path, finetuning_type):
    run_dir = tmp_path / "full_run"
    shutil.copytree(tiny_model_dir, run_dir)
    result = run_export(
        f"model_name_or_path={run_dir}",
        f"finetuning_type={finetuning_type}",
        f"export_dir={tmp_path / 'out'}",
        "infer_dtype=float32",
    )
    assert result.shard_files == ["model.safetensors"]
    torch.testing.assert_close(logits(load_exported(tmp_path / "out")), logits(load_exported(run_dir)), atol=0, rtol=0)


def test_generation_config_lists_end_of_turn_tokens(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.eos_token = "<|endoftext|>"  # a base whose EOS is not the chat template's end of turn
    tokenizer.save_pretrained(model_dir)
    result = run_export(f"model_name_or_path={model_dir}", f"export_dir={tmp_path / 'out'}")
    expected = {tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert expected <= set(result.eos_token_ids)


def test_adapter_of_another_base_is_refused_naming_both(tiny_model_dir, wide_tiny_model_dir, tmp_path):
    make_adapter(wide_tiny_model_dir, tmp_path / "adapter")
    trained_on = rf"trained on {wide_tiny_model_dir} and does not fit model {tiny_model_dir}: layer .* has in_features"
    with pytest.raises(ModelError, match=trained_on):
        run_export(
            f"model_name_or_path={tiny_model_dir}",
            f"adapter_name_or_path={tmp_path / 'adapter'}",
            f"export_dir={tmp_path / 'out'}",
        )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_export_dir_holding_another_model_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(OutputDirError, match="already holds a model"):
        run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["config.json"]


def test_export_size_smaller_than_largest_tensor_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"smaller than the largest tensor, model.embed_tokens.weight"):
        run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "export_size=1MB")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_refused(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "bare"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    with pytest.raises(ModelError, match="no tokenizer found"):
        run_export(f"model_name_or_path={model_dir}", f"export_dir={tmp_path / 'out'}")


def test_same_export_can_be_redone_in_place(tiny_model_dir, tmp_path):
    run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}")
    result = run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "infer_dtype=float16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert result.dtype == torch.float16


@pytest.mark.parametrize(
    ("value", "size"), [(5, 5_000_000_000), (0.2, 200_000_000), ("200MB", 200_000_000), ("1GiB", 1024**3)]
)
def test_export_size_units(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("export_size=lots", "`export_size`: got 'lots'"),
        ("export_legacy_format=true", "safetensors only"),
        ("export_gguf=q9_9", "unknown GGUF type q9_9"),
        ("export_dri=x", "did you mean export_dir"),
        ("quantization_bit=4", "cannot merge adapters into a quantized model"),
        ("temperature=0", "`temperature` is not used by export: export generates nothing"),
    ],
)
def test_bad_keys_refused_before_loading(override, message):
    with pytest.raises(ConfigError, match=message):
        load_export_config(None, ["model_name_or_path=missing-model-dir", "export_dir=x", override])


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_round_trip_through_transformers(tiny_model_dir, tmp_path, gguf_type):
    """transformers reads our GGUF back (un-permuting Q/K) and generates the same greedy tokens as the merged model."""
    import gguf
    from transformers import AutoModelForCausalLM

    make_adapter(tiny_model_dir, tmp_path / "adapter")
    result = run_export(
        f"adapter_name_or_path={tmp_path / 'adapter'}",
        f"model_name_or_path={tiny_model_dir}",
        f"export_dir={tmp_path / 'merged'}",
        f"export_gguf={gguf_type}",
        "infer_dtype=float32",
    )
    gguf_file = tmp_path / "merged" / f"merged-{gguf_type}.gguf"
    assert result.extra_files[0] == gguf_file.name
    reader = gguf.GGUFReader(gguf_file)
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")
    }
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["llama.attention.head_count_kv"] == 2 and "<|im_start|>" in fields["tokenizer.chat_template"]
    assert "output.weight" not in {tensor.name for tensor in reader.tensors}  # tied: token_embd is reused
    merged = load_exported(tmp_path / "merged")
    from_gguf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    tolerance = {"f16": 2e-2, "q8_0": 0.15}[gguf_type]
    # Weights, not only logits: a tiny random model's logits barely feel a wrong Q/K row order.
    weights = {name: tensor for name, tensor in from_gguf.state_dict().items()}
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, atol=tolerance / 10, rtol=0, msg=name)
    torch.testing.assert_close(logits(from_gguf), logits(merged), atol=tolerance, rtol=0)
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2}
    assert torch.equal(from_gguf.generate(PROMPT_IDS, **greedy), merged.generate(PROMPT_IDS, **greedy))


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are Tunesmith."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Tunesmith."},
        {"role": "user", "content": "And {{ this }}?"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def ollama_render(template: str, default_system: str | None, messages: list[dict[str, str]]) -> str:
    """What Ollama renders: .System is the conversation's system message, else the Modelfile's SYSTEM."""
    from tests.go_template import render

    system = next((m["content"] for m in messages if m["role"] == "system"), default_system or "")
    turns = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return render(template, {"System": system, "Messages": turns})


@pytest.mark.parametrize("template", ["chatml", "llama3", "qwen", "mistral", "gemma", "tokenizer"])
def test_ollama_template_renders_like_the_chat_template(tiny_model_dir, template):
    from transformers import AutoTokenizer

    from tunesmith.data.templates import find_template
    from tunesmith.export.modelfile import chat_renderer, go_template, read_turn_format

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # SmolLM2's: a default system prompt
    if template != "tokenizer":
        tokenizer.chat_template = find_template(template).jinja
    turns = read_turn_format(chat_renderer(tokenizer))
    go = go_template(turns)
    assert (turns.default_system is not None) == (template in ("tokenizer", "qwen"))
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(go, turns.default_system, messages) == expected, (template, messages)


def test_modelfile_is_written(tiny_model_dir, tmp_path):
    run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "export_num_ctx=2048")
    lines = (tmp_path / "out" / "Modelfile").read_text().splitlines()
    assert "FROM ." in lines and 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER num_ctx 2048" in lines
    assert any(line.startswith('SYSTEM """You are a helpful AI assistant named SmolLM') for line in lines)
    text = "\n".join(lines)
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n' in text


def test_pissa_adapter_saved_converted_merges_onto_the_original_base(tiny_model_dir, tmp_path):
    """PiSSA trains on a residual base; saved converted (rank 2r, as training saves it) it applies to the original."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_4")
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].init_lora_weights = True  # what training does before saving the start
    peft_model.save_pretrained(tmp_path / "pissa_init")
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft_model.save_pretrained(
        tmp_path / "adapter", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init")
    )
    run_export(
        f"model_name_or_path={tiny_model_dir}",
        f"adapter_name_or_path={tmp_path / 'adapter'}",
        f"export_dir={tmp_path / 'merged'}",
        "infer_dtype=float32",
    )
    torch.testing.assert_close(logits(load_exported(tmp_path / "merged")), logits(peft_model.eval()), atol=1e-4, rtol=0)


def test_qlora_adapter_merges_with_a_note(tiny_model_dir, tmp_path, capsys):
    make_adapter(tiny_model_dir, tmp_path / "adapter")
    (tmp_path / "adapter" / "tunesmith_config.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\nquantization_bit: 4\n"
    )
    run_export(f"adapter_name_or_path={tmp_path / 'adapter'}", f"export_dir={tmp_path / 'merged'}")
    output = capsys.readouterr()
    assert "trained on a quantized base" in output.out and "rounding" in output.out
    assert "bfloat16" in output.out  # the dtype written is said
    assert "merging tensors" in output.err and "model.safetensors" in output.err  # the progress bar, with its shard


def test_hub_upload_gets_the_complete_directory(tiny_model_dir, tmp_path, monkeypatch):
    """export_hub_model_id: the upload is called with the finished directory (huggingface.co is not reachable here)."""
    import huggingface_hub

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id):
            calls.append(("upload_folder", repo_id, sorted(path.name for path in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "export_hub_model_id=me/m")
    assert calls[0] == ("create_repo", "me/m", True)
    assert calls[1][:2] == ("upload_folder", "me/m") and {"config.json", "model.safetensors", "Modelfile"} <= set(
        calls[1][2]
    )


def test_quantized_base_is_refused(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="is a gptq model; cannot merge into or re-export quantized weights"):
        run_export(f"model_name_or_path={model_dir}", f"export_dir={tmp_path / 'out'}")


def test_k_quant_without_llama_quantize_is_refused_before_work(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize anywhere
    with pytest.raises(ConfigError, match=r"q4_k_m needs llama\.cpp's llama-quantize on PATH"):
        run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "export_gguf=q4_k_m")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_gguf_round_trip_other_families(tiny_model_dir, tmp_path, model_type, monkeypatch):
    """Qwen2 (q/k/v biases, no Q/K permutation), Qwen3 (q/k norms) and Mistral (written as llama) read back."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export import gguf_export

    if model_type.startswith("qwen"):
        # transformers 5 loads this SmolLM2 vocabulary with Qwen2's own pre-tokenizer (the class follows the
        # model type): a pairing in no table. Real Qwen models hash to "qwen2".
        monkeypatch.setattr(gguf_export, "pre_tokenizer_name", lambda tokenizer: "qwen2")

    llama = AutoConfig.from_pretrained(tiny_model_dir).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keep += ("num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    head_dim = 128 if model_type == "qwen3" else 8  # transformers reads no head_dim from a qwen3 GGUF: 128 assumed
    config = AutoConfig.for_model(model_type, **{key: llama[key] for key in keep}, head_dim=head_dim)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)  # non-trivial biases and norms
    model.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "base")
    run_export(
        f"model_name_or_path={tmp_path / 'base'}",
        f"export_dir={tmp_path / 'm'}",
        "export_gguf=f16",
        "infer_dtype=float32",
    )
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", gguf_file="m-f16.gguf", dtype=torch.float32).eval()
    weights = from_gguf.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, atol=2e-3, rtol=0, msg=name)
    torch.testing.assert_close(logits(from_gguf), logits(model.eval()), atol=2e-2, rtol=0)


def test_unknown_pre_tokenizer_is_refused_before_work(tiny_model_dir, tmp_path, monkeypatch):
    from tunesmith.export import gguf_export

    monkeypatch.setattr(gguf_export, "PRE_TOKENIZERS", {})
    with pytest.raises(ModelError, match="pre-tokenizer is not one llama"):
        run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "export_gguf=q8_0")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def sentencepiece_style_tokenizer(target: Path, llama2: bool = False) -> Path:
    """A tiny Gemma tokenizer: BPE on "▁"-spelled text with byte fallback, Gemma's special tokens and template;
    with `llama2`, Llama 2's kind, which also puts a "▁" before the text."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    from tunesmith.data.templates import find_template

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    byte_pieces = [f"<0x{value:02X}>" for value in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    corpus = ["who are you? i am tunesmith, a model that answers.", "the user asks and the model answers."]
    backend.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials + byte_pieces))
    model = json.loads(backend.to_str())["model"]
    tokenizer = (LlamaTokenizer if llama2 else GemmaTokenizer)(
        vocab=model["vocab"],
        merges=[tuple(merge) for merge in model["merges"]],
        additional_special_tokens=specials[5:],
        add_bos_token=True,
    )
    tokenizer.chat_template = find_template("gemma").jinja
    tokenizer.save_pretrained(target)
    return target


GEMMA_TEXTS = ["who are you?", "the model answers: 42 \u00e9t\u00e9", "<start_of_turn>user\nhi<end_of_turn>"]


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text", "llama"])
def test_sentencepiece_gguf_round_trip_through_transformers(tmp_path, model_type):
    """Gemma's SentencePiece-style vocabulary and its norms (+1) read back: same weights, logits and token ids; a
    Llama with a Llama 2 style vocabulary too. transformers reads Gemma2 and Gemma3 GGUF files, not Gemma's: for
    it the file's metadata and tensors are checked.
    """
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    llama2 = model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_style_tokenizer(tmp_path / "base", llama2=llama2))
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=256,  # what transformers assumes when it reads a Gemma GGUF
        tie_word_embeddings=True,
        max_position_embeddings=512,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path / "base")
    run_export(
        f"model_name_or_path={tmp_path / 'base'}",
        f"export_dir={tmp_path / 'g'}",
        "export_gguf=f16",
        "infer_dtype=float32",
    )
    reader = gguf.GGUFReader(tmp_path / "g" / "g-f16.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.add_space_prefix"] is llama2 and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokenizer.convert_tokens_to_ids("<end_of_turn>")] == gguf.TokenType.CONTROL
    norm = next(tensor for tensor in reader.tensors if tensor.name == "output_norm.weight")
    np_norm = model.model.norm.weight.detach().numpy()
    plus = 0 if llama2 else 1  # Gemma's norm multiplies by 1 + weight, llama.cpp's by the weight
    assert abs(float(norm.data[0]) - (float(np_norm[0]) + plus)) < 1e-6
    assert fields["general.architecture"] == model_type.removesuffix("_text")
    assert "output.weight" not in {tensor.name for tensor in reader.tensors}  # Gemma's head is the embedding
    if model_type == "gemma":
        embedding = next(tensor for tensor in reader.tensors if tensor.name == "token_embd.weight")
        expected = model.model.embed_tokens.weight.detach().half().numpy()
        assert (embedding.data == expected).all()
        assert fields["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
        return

    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="g-f16.gguf", dtype=torch.float32)
    weights = from_gguf.eval().state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, atol=2e-3, rtol=0, msg=name)
    ids = torch.tensor([tokenizer("who are you?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, model.eval()(ids).logits, atol=2e-2, rtol=0)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="g-f16.gguf")
    for text in GEMMA_TEXTS:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_k_quant_goes_through_an_f16_file_and_llama_quantize(tiny_model_dir, tmp_path, monkeypatch):
    """A stand-in llama-quantize on PATH records its arguments and the file it was given, and writes the output."""
    import gguf

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    script = bin_dir / "llama-quantize"
    script.write_text(f'#!/bin/sh\necho "$@" > {calls}\ncp "$1" {tmp_path / "given.gguf"}\ncp "$1" "$2"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "export_gguf=q4_k_m")
    source, target, quant = calls.read_text().split()
    source_file_type = gguf.GGUFReader(tmp_path / "given.gguf").fields["general.file_type"].contents()
    assert Path(source).name == ".out-f16-for-q4_k_m.gguf" and Path(target).name == "out-q4_k_m.gguf"
    assert quant == "Q4_K_M" and int(source_file_type) == gguf.LlamaFileType.MOSTLY_F16
    assert [path.name for path in (tmp_path / "out").glob("*.gguf")] == ["out-q4_k_m.gguf"]  # the f16 is removed
    assert "FROM ./out-q4_k_m.gguf" in (tmp_path / "out" / "Modelfile").read_text()


def test_failing_llama_quantize_is_one_error_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "llama-quantize").write_text("#!/bin/sh\necho 'unknown ftype' >&2\nexit 1\n")
    (bin_dir / "llama-quantize").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(ModelError, match=r"llama-quantize failed making q6_k .*\nunknown ftype"):
        run_export(f"model_name_or_path={tiny_model_dir}", f"export_dir={tmp_path / 'out'}", "export_gguf=q6_k")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
