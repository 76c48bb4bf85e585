"""A peft LoRA adapter read from its directory, and its merge into one base weight at a time.

The formulas are peft's (`peft/tuners/lora/layer.py`, `merge`): delta = scaling · B @ A, with scaling = alpha / r, or
alpha / sqrt(r) for rsLoRA; r and alpha per module from rank_pattern / alpha_pattern (PiSSA adapters saved converted
are plain LoRA of rank 2r). DoRA: W' = m / ||W + delta||_row · (W + delta), the norm over each output row.
Embedding LoRA: delta = (B @ A)^T · scaling. `modules_to_save` tensors replace the base tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from tunesmith.errors import ModelError
from tunesmith.model.adapters import ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter_config

# adapter_config.json settings whose merge tunesmith does not implement; each must be at its default.
UNSUPPORTED_SETTINGS: dict[str, object] = {
    "bias": "none",
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


@dataclass(frozen=True)
class LoraWeights:
    """One adapted module: its factors, how much they are scaled by, and DoRA's magnitude if any."""

    a: torch.Tensor  # [r, in] (Linear) or [r, vocab] (Embedding)
    b: torch.Tensor  # [out, r] (Linear) or [dim, r] (Embedding)
    scaling: float
    magnitude: torch.Tensor | None
    embedding: bool
    fan_in_fan_out: bool

    def delta(self, device: torch.device) -> torch.Tensor:
        delta = self.b.to(device, torch.float32) @ self.a.to(device, torch.float32)
        if self.embedding or self.fan_in_fan_out:
            delta = delta.T
        return delta * self.scaling


@dataclass
class Adapter:
    path: Path
    lora: dict[str, LoraWeights] = field(default_factory=dict)  # base tensor name → factors
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: base name → tensor
    base_copies: dict[str, tuple[int, ...]] = field(default_factory=dict)  # base weights saved by peft: shapes
    use_dora: bool = False

    def expected_shape(self, name: str) -> tuple[int, ...]:
        weights = self.lora[name]
        rows, columns = weights.b.shape[0], weights.a.shape[1]
        return (columns, rows) if weights.embedding or weights.fan_in_fan_out else (rows, columns)

    def touches(self, name: str) -> bool:
        return name in self.lora or name in self.replacements


def read_adapter(path: Path) -> Adapter:
    config = read_adapter_config(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path} is a {config['peft_type']} adapter; tunesmith merges LoRA adapters (incl. DoRA)")
    for key, default in UNSUPPORTED_SETTINGS.items():
        if config.get(key, default) not in (default, [], {}):
            raise ModelError(f"{path}: adapter_config.json sets {key}={config[key]!r}, which tunesmith cannot merge")
    tensors = load_file(path / ADAPTER_WEIGHTS)
    adapter = Adapter(path, use_dora=bool(config.get("use_dora")))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = re.match(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$", name)
        if match is None:
            match = re.match(r"^(.*)\.(lora_magnitude_vector)(?:\.weight)?$", name)
        if match is None and ".base_layer." in name:
            # peft saves the embedding's base weight with an embedding adapter; it is the base's own (a resized
            # vocabulary would show as a shape mismatch against the base, checked before merging).
            adapter.base_copies[name.replace(".base_layer.", ".")] = tuple(tensor.shape)
            continue
        if match is None:
            adapter.replacements[name] = tensor  # a modules_to_save copy, named as the base tensor
            continue
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    for module, parts in modules.items():
        embedding = "lora_embedding_A" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise ModelError(f"{path}: module {module} has only part of its LoRA factors ({', '.join(parts)})")
        rank = a.shape[0]
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.lora[f"{module}.weight"] = LoraWeights(
            a=a,
            b=b,
            scaling=scaling,
            magnitude=parts.get("lora_magnitude_vector"),
            embedding=embedding,
            fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        )
    return adapter


def pattern_value(patterns: dict[str, object], module: str, default: object) -> object:
    """peft's per-module override: the first pattern that matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def merge_into(name: str, weight: torch.Tensor, adapters: list[Adapter], device: torch.device) -> torch.Tensor:
    """The base tensor `name` with every adapter applied in order, as float32 (merge_and_unload after each)."""
    merged = weight.to(device, torch.float32)
    for adapter in adapters:
        if name in adapter.replacements:
            merged = adapter.replacements[name].to(device, torch.float32)
            continue
        lora = adapter.lora.get(name)
        if lora is None:
            continue
        combined = merged + lora.delta(device)
        if lora.magnitude is None:
            merged = combined
        else:
            # DoRA normalises each output row (dim 1 of a Linear weight, dim 0 with fan_in_fan_out).
            row_dim = 0 if lora.fan_in_fan_out else 1
            norm = combined.norm(p=2, dim=row_dim, keepdim=True)
            merged = lora.magnitude.to(device, torch.float32).reshape(norm.shape) / norm * combined
    return merged
