"""`export_model(config)`: every check first, then the merge into a temporary directory, renamed when complete."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config.export import ExportConfig
from tunesmith.errors import ModelError, OutputDirError
from tunesmith.export import hf_files
from tunesmith.export.adapter import read_adapter
from tunesmith.export.gguf_export import check_gguf_export, write_gguf_files
from tunesmith.export.merge import MergePlan, plan_merge, write_weights
from tunesmith.export.modelfile import chat_renderer, write_modelfile
from tunesmith.export.safetensors_io import read_tensor_infos, weight_files
from tunesmith.export.sources import ExportSources, check_adapters_fit, resolve_sources

EXPORT_RECORD = "tunesmith_export.json"  # what an export was made from; lets the same export be redone in place


@dataclass(frozen=True)
class ExportResult:
    export_dir: Path
    dtype: torch.dtype
    shard_files: list[str]
    eos_token_ids: list[int]
    extra_files: list[str]  # GGUF files, Modelfile


def export_model(config: ExportConfig) -> ExportResult:
    model_keys, settings = config.inference.model, config.export
    sources = resolve_sources(config.inference)
    model_config = hf_files.read_model_config(sources.model_dir)
    if model_config.get("quantization_config"):
        method = model_config["quantization_config"].get("quant_method", "quantized")
        raise ModelError(
            f"{sources.model_dir} is a {method} model; cannot merge into or re-export quantized weights. Use the "
            "unquantized base model (a QLoRA adapter merges onto it)"
        )
    check_adapters_fit(sources, model_keys.trust_remote_code)
    infos = read_tensor_infos(weight_files(sources.model_dir))
    adapters = [read_adapter(path) for path in sources.adapter_dirs]
    dtype, why = hf_files.choose_dtype(config.inference.engine.infer_dtype, model_config)
    tied = bool(model_config.get("tie_word_embeddings", False))
    plan = plan_merge(infos, adapters, dtype, settings.export_size, tied)
    template = config.inference.prompt.template
    tokenizer = hf_files.load_export_tokenizer(sources.tokenizer_dir, template, model_keys.trust_remote_code)
    export_dir = Path(settings.export_dir).expanduser()
    record = export_record(config, sources)
    check_export_dir(export_dir, record)
    write_extras = prepare_extras(config, model_config, tokenizer)

    print(describe_plan(sources, plan, dtype, why))
    for path in sources.qlora_adapters:
        print(
            f"note: {path} was trained on a quantized base; it merges onto the unquantized weights, so the merged "
            f"model differs from the trained one by the base's quantization rounding"
        )
    device = choose_device(settings.export_device)
    started = time.perf_counter()
    temporary = export_dir.parent / f".{export_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        write_weights(plan, adapters, temporary, device, tied)
        hf_files.write_model_config(model_config, dtype, plan.untied, temporary)
        eos_ids = hf_files.write_generation_config(sources.model_dir, model_config, tokenizer, temporary)
        tokenizer.save_pretrained(temporary)
        extra_files = write_extras(temporary, tokenizer, export_dir)
        (temporary / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_dir(temporary, export_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    shard_files = [plan.file_name(index) for index in range(len(plan.shards))]
    print(
        f"exported {export_dir} in {time.perf_counter() - started:.1f}s: {len(shard_files)} shard(s), "
        f"{plan.total_bytes / 1e9:.3g} GB of {str(dtype).removeprefix('torch.')} weights, eos_token_id {eos_ids}"
    )
    if settings.export_hub_model_id:
        push_to_hub(export_dir, settings.export_hub_model_id)
    return ExportResult(export_dir, dtype, shard_files, eos_ids, extra_files)


def describe_plan(sources: ExportSources, plan: MergePlan, dtype: torch.dtype, why: str) -> str:
    adapters = ", ".join(str(path) for path in sources.adapter_dirs) or "no adapter"
    return (
        f"tunesmith export: {sources.model_name} + {adapters} → {len(plan.shards)} shard(s) in "
        f"{str(dtype).removeprefix('torch.')} ({why}); tokenizer from {sources.tokenizer_dir}"
    )


def export_record(config: ExportConfig, sources: ExportSources) -> dict[str, object]:
    return {
        "model_name_or_path": str(sources.model_dir.resolve()),
        "adapter_name_or_path": [str(path.resolve()) for path in sources.adapter_dirs],
        "config": config.model_dump(),
    }


def check_export_dir(export_dir: Path, record: dict[str, object]) -> None:
    """Refuse an export_dir holding anything but an earlier export of the same model and adapters."""
    if not export_dir.exists():
        return
    if not export_dir.is_dir():
        raise OutputDirError(f"`export_dir`: {export_dir} is a file; choose a directory")
    if not any(export_dir.iterdir()):
        return
    previous = export_dir / EXPORT_RECORD
    if previous.is_file():
        earlier = json.loads(previous.read_text(encoding="utf-8"))
        same = all(earlier.get(key) == record[key] for key in ("model_name_or_path", "adapter_name_or_path"))
        if same:
            return
        raise OutputDirError(
            f"`export_dir`: {export_dir} holds an export of {earlier.get('model_name_or_path')} + "
            f"{earlier.get('adapter_name_or_path') or 'no adapter'}; choose another directory or delete it"
        )
    what = "a model" if (export_dir / "config.json").exists() else "other files"
    raise OutputDirError(f"`export_dir`: {export_dir} already holds {what}; choose an empty or new directory")


def replace_dir(complete: Path, target: Path) -> None:
    """Put the complete export in place; an earlier export of the same model is removed only after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    complete.rename(target)
    if old is not None:
        shutil.rmtree(old)


def choose_device(export_device: str) -> torch.device:
    if export_device == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def prepare_extras(config: ExportConfig, model_config: dict, tokenizer):
    """Checks for the GGUF files, done before any work; returns what writes them and the Modelfile."""
    settings = config.export
    check_gguf_export(settings.export_gguf, model_config, tokenizer)

    def write_extras(out_dir: Path, tokenizer, export_dir: Path) -> list[str]:
        written_model_config = hf_files.read_model_config(out_dir)
        ggufs = write_gguf_files(
            out_dir, written_model_config, tokenizer, settings.export_gguf, export_dir.name, out_dir
        )
        source = f"./{ggufs[0].name}" if ggufs else "."
        stop_tokens = hf_files.end_of_turn_tokens(tokenizer)
        num_ctx = settings.export_num_ctx or written_model_config.get("max_position_embeddings") or 4096
        modelfile = write_modelfile(out_dir, source, chat_renderer(tokenizer), stop_tokens, num_ctx)
        return [*(path.name for path in ggufs), modelfile.name]

    return write_extras


def push_to_hub(export_dir: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(export_dir), repo_id=repo_id)
    print(f"uploaded {export_dir} to https://huggingface.co/{repo_id}")
