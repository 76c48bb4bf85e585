"""`tunesmith estimate [CONFIG.yaml] [key=value ...]`: the peak memory of a training run, before any load.

The model's shape comes from its config.json only: a local model directory, the converted default model (or the
GGUF header of the packaged one), a `.gguf` file's header, or a hub id's config.json alone (from the Hugging Face
cache, or `cache_dir`; downloaded unless HF_HUB_OFFLINE=1). No weights are downloaded; a model whose config is
not at hand, or whose shape the estimate does not know, can be estimated as a Llama-shaped model with
`--params 7B`. Prints the breakdown of the predicted peak (tunesmith.estimate.memory) and the same run with QLoRA
4-bit, LoRA 8/16/32-bit and full fine-tuning.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunesmith.config.load import flatten, load_config, parse_overrides, read_yaml
from tunesmith.errors import ConfigError, ModelError
from tunesmith.estimate.memory import (
    AUTO_MARGIN,
    GiB,
    MemoryEstimate,
    ModelShape,
    Settings,
    UnknownShape,
    available_memory,
    estimate,
)

PARAMS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbtKMBT]?)\s*$")
SCALE = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
TERMS = {
    "runtime": "process baseline (CPU: Python + torch + libraries; GPU: CUDA context)",
    "weights": "base model parameters as kept",
    "reference": "dpo/kto: the frozen reference model (a second copy; 0 with LoRA or precompute_ref_log_probs)",
    "trainable": "LoRA parameters (float32)",
    "gradients": "one gradient per trainable parameter",
    "optimizer": "optimizer state (and DeepSpeed master weights)",
    "activations": "saved for the backward pass, batch x cutoff_len tokens",
    "logits": "loss head: float32 log-softmax and gradients",
}


ON_OFF = {True: "on", False: "off"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="training YAML config (the same file `tunesmith train` takes)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that win over the file, e.g. cutoff_len=1024")
    parser.add_argument("--model", help="model to estimate (wins over model_name_or_path)")
    parser.add_argument(
        "--params", help="estimate a Llama-shaped model of this many parameters (7B, 1.5B, 350M) instead of reading one"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="device the run would use (default: this machine's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


@dataclass(frozen=True)
class Report:
    """What the command prints: the run's estimate and the same run by method and bits."""

    model_name: str
    source: str  # where the shape came from
    shape: ModelShape
    settings: Settings
    device: str
    checkpointing: bool | str
    note: str | None
    result: MemoryEstimate
    comparison: dict[str, MemoryEstimate]
    free: int | None  # bytes free on this machine's device, when the estimate is for it


def run(args: argparse.Namespace) -> int:
    config = read_run_config(args)
    device = args.device or default_device()
    model_name, shape, source = model_shape(args, config)
    settings = Settings.from_config(config, device)
    checkpointing, note = resolve_checkpointing(config.train.gradient_checkpointing, shape, settings, device)
    report = Report(
        model_name=model_name,
        source=source,
        shape=shape,
        settings=settings,
        device=device,
        checkpointing=checkpointing,
        note=note,
        result=estimate(shape, settings, device=device, gradient_checkpointing=checkpointing),
        comparison={
            label: estimate(shape, variant, device=device, gradient_checkpointing=checkpointing)
            for label, variant in variants(settings, device).items()
        },
        free=available_memory(device) if device == default_device() else None,
    )
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print_report(report)
    return 0


def read_run_config(args: argparse.Namespace):
    """The training config the estimate is for: the YAML, its key=value overrides and --model."""
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    if args.model:
        overrides.append(f"model_name_or_path={args.model}")
    return load_config(config_path, with_dataset(config_path, overrides))


def model_shape(args: argparse.Namespace, config) -> tuple[str, ModelShape, str]:
    """(the model's name, its shape, where the shape came from): from --params, or from the model's config.json."""
    if args.params:
        shape = ModelShape.from_param_count(parse_params(args.params))
        return args.model or f"a {args.params} model", shape, "Llama-shaped"
    model_config, source = read_model_config(config.model.model_name_or_path, config.model.cache_dir)
    try:
        shape = ModelShape.from_config(model_config)
    except UnknownShape as error:
        raise UnknownShape(
            f"{error}; give its size with --params (e.g. --params 7B) for a Llama-shaped estimate"
        ) from None
    return config.model.model_name_or_path, shape, source


def report_json(report: Report) -> dict[str, Any]:
    return {
        "model": report.model_name,
        "source": report.source,
        "params": report.shape.total_params,
        "active_params": report.shape.active_params,
        "device": report.device,
        "batch_size": report.settings.batch_size,
        "cutoff_len": report.settings.seq_len,
        "available_bytes": report.free,
        "estimate": report.result.as_dict(),
        "comparison": {label: e.total_bytes for label, e in report.comparison.items()},
    }


def print_report(report: Report) -> None:
    shape, settings = report.shape, report.settings
    bits = f" {settings.quantization_bit}-bit" if settings.quantization_bit else ""
    active = f" ({shape.active_params / 1e6:,.1f}M active per token)" if shape.experts else ""
    print(
        f"{report.model_name} ({report.source}): {shape.total_params / 1e6:,.1f}M parameters{active}; "
        f"{settings.finetuning_type}{bits}, batch {settings.batch_size} x cutoff_len {settings.seq_len}, "
        f"optim {settings.optim}, gradient checkpointing {ON_OFF.get(report.checkpointing, report.checkpointing)}, "
        f"on {report.device}"
    )
    if report.note:
        print(report.note)
    print_breakdown(report.result)
    print_comparison(report.comparison, shape, settings)
    if report.free is not None:
        verdict = "fits" if report.result.total_bytes <= report.free else "does NOT fit"
        print(f"\n{verdict}: {report.free / GiB:.1f} GiB is free on this machine's {report.device}")


def with_dataset(config_path: str | None, overrides: list[str]) -> list[str]:
    """The estimate needs no data, but the config does: name a placeholder when neither file nor keys give one."""
    keys = set(flatten(read_yaml(config_path))) if config_path else set()
    keys |= set(flatten(parse_overrides(overrides)))
    return overrides if "dataset" in keys else ["dataset=(not needed for the estimate)", *overrides]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_params(text: str) -> float:
    match = PARAMS.match(text)
    if not match:
        raise ConfigError(f"--params {text!r}: write a count like 7B, 1.5B, 350M or 134500000")
    return float(match.group(1)) * SCALE[match.group(2).lower()]


def read_model_config(name: str, cache_dir: str | None) -> tuple[dict[str, Any], str]:
    """A model's config.json as a dict: from disk, or a hub model's config.json alone (model/resolve.py)."""
    from tunesmith.model.resolve import ALIASES, HUB_ID, cache_root, hub_config_file

    if name.lower() in ALIASES:
        converted = cache_root(cache_dir) / "models" / name.lower() / "config.json"
        if converted.is_file():
            return json.loads(converted.read_text()), str(converted.parent)
        return gguf_config(packaged_gguf_file(name.lower())), "the packaged GGUF file's header"
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_config(path), f"{path}'s header"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; give --params instead")
        return json.loads((path / "config.json").read_text()), str(path)
    if HUB_ID.match(name):
        config_file = hub_config_file(name, cache_dir)
        return json.loads(config_file.read_text()), str(config_file.parent)
    raise ModelError(f"model {name!r} not found: not a model directory, a .gguf file or a hub id; try --params")


def packaged_gguf_file(alias: str) -> Path:
    from tunesmith.model.resolve import ALIASES, packaged_gguf

    return packaged_gguf(ALIASES[alias])


def gguf_config(gguf_file: Path) -> dict[str, Any]:
    """The model config in a GGUF file's header (transformers reads the metadata only, no tensors)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading a .gguf file needs the gguf package: pip install gguf")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return dict(load_gguf_checkpoint(str(gguf_file), return_tensors=False)["config"])
    except ValueError as error:  # not a GGUF file, a truncated one, or an architecture transformers cannot read
        raise ModelError(f"cannot read the GGUF header of {gguf_file}: {error}") from None


def resolve_checkpointing(
    setting: bool | str, shape: ModelShape, settings: Settings, device: str
) -> tuple[bool | str, str | None]:
    """`auto` as training decides it (on when the run would not fit in 90% of the free memory), where it can be."""
    if setting != "auto":
        return setting, None
    without = estimate(shape, settings, device=device, gradient_checkpointing=False)
    if device != default_device():
        return False, (
            f"gradient_checkpointing: auto → estimated off; training on {device} turns it on if the peak below is "
            "more than 90% of the free memory"
        )
    free = available_memory(device)
    enabled = without.total_bytes > AUTO_MARGIN * free
    return enabled, f"gradient_checkpointing: auto → {'on' if enabled else 'off'} ({free / GiB:.1f} GiB free)"


def variants(settings: Settings, device: str) -> dict[str, Settings]:
    """The same run as the tutorials' memory tables list it: by method and bits."""
    lora = replace(settings, finetuning_type="lora", quantization_bit=None)
    full_bits = 32 if device == "cpu" else 16
    return {
        "QLoRA 4-bit": replace(lora, quantization_bit=4),
        "LoRA 8-bit": replace(lora, quantization_bit=8),
        "LoRA 16-bit": replace(lora, dtype_bytes=2),
        "LoRA 32-bit": replace(lora, dtype_bytes=4),
        f"full {full_bits}-bit": replace(settings, finetuning_type="full", quantization_bit=None),
    }


def print_breakdown(result: MemoryEstimate) -> None:
    print(f"\n{'term':<18}{'GiB':>8}  what")
    print("-" * 80)
    for name, value in result.parts().items():
        if value:
            print(f"{name:<18}{value / GiB:>8.2f}  {TERMS[name]}")
    if result.loading_peak > result.total_bytes - result.runtime - 1:
        print(f"{'(loading)':<18}{result.loading_peak / GiB:>8.2f}  loading is the peak")
    print("-" * 80)
    print(f"{'peak':<18}{result.total_bytes / GiB:>8.2f}  runtime + weights + max(activations + logits, gradients)")
    if result.host_bytes:
        print(f"{'(CPU RAM)':<18}{result.host_bytes / GiB:>8.2f}  offloaded, not in the GPU peak")
    for note in result.notes:
        print(f"note: {note}")


def print_comparison(comparison: dict[str, MemoryEstimate], shape: ModelShape, settings: Settings) -> None:
    print(
        f"\nThe same model ({shape.total_params / 1e9:.2f}B), batch {settings.batch_size} x {settings.seq_len}, "
        f"optim {settings.optim}:"
    )
    header = f"{'method':<14}{'weights':>9}{'train+opt':>11}{'act+logits':>12}{'peak GiB':>10}"
    print(header + "\n" + "-" * len(header))
    for label, e in comparison.items():
        training = e.trainable + e.gradients + e.optimizer
        print(
            f"{label:<14}{e.weights / GiB:>9.2f}{training / GiB:>11.2f}"
            f"{(e.activations + e.logits) / GiB:>12.2f}{e.total_bytes / GiB:>10.2f}"
        )
