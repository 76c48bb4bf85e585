"""The streaming merge: plan the output shards from the base's headers, then write them one tensor at a time.

Reading follows the base's shard order with one shard open, and each merged tensor is written straight to its
output shard, so resident memory stays near one base shard (memory-mapped) plus the adapters plus one tensor in
float32, whatever the model's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tunesmith.errors import ConfigError, ModelError
from tunesmith.export.adapter import Adapter, merge_into
from tunesmith.export.safetensors_io import (
    INDEX_FILE,
    PlannedTensor,
    TensorInfo,
    TensorReader,
    nbytes,
    shard_writer,
)

OUTPUT_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class OutputTensor:
    name: str  # as written
    source: TensorInfo  # the base tensor it starts from
    dtype: torch.dtype


@dataclass(frozen=True)
class MergePlan:
    shards: list[list[OutputTensor]]
    untied: bool  # a tied output head had to be written separately (a modules_to_save copy of one of the pair)

    @property
    def total_bytes(self) -> int:
        return sum(nbytes(t.source.shape, t.dtype) for shard in self.shards for t in shard)

    def file_name(self, index: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"


def tied_embedding_name(infos: list[TensorInfo], tied: bool) -> str | None:
    if not tied:
        return None
    return next((info.name for info in infos if info.name.endswith("embed_tokens.weight")), None)


def plan_merge(
    infos: list[TensorInfo], adapters: list[Adapter], dtype: torch.dtype, shard_size: int, tied: bool
) -> MergePlan:
    """Which tensors go to which output shard; refuses adapters that do not fit the base, before any data is read."""
    by_name = {info.name: info for info in infos}
    embedding = tied_embedding_name(infos, tied)
    for adapter in adapters:
        check_adapter_fits(adapter, by_name, embedding)
    untied = embedding is not None and any(
        name in adapter.replacements for adapter in adapters for name in (embedding, OUTPUT_HEAD)
    )
    outputs = []
    for info in infos:
        if embedding is not None and info.name == OUTPUT_HEAD:
            continue  # a tied head saved anyway: written once, as the embedding
        outputs.append(OutputTensor(info.name, info, dtype if info.dtype.is_floating_point else info.dtype))
    if untied:
        outputs.append(OutputTensor(OUTPUT_HEAD, by_name[embedding], dtype))
    largest = max(outputs, key=lambda output: nbytes(output.source.shape, output.dtype))
    largest_size = nbytes(largest.source.shape, largest.dtype)
    if largest_size > shard_size:
        raise ConfigError(
            f"`export_size`: {shard_size / 1e9:g} GB is smaller than the largest tensor, {largest.name} "
            f"({largest_size / 1e9:.3g} GB in {str(dtype).removeprefix('torch.')}); set export_size to at least "
            f"{largest_size / 1e6:.0f}MB"
        )
    shards: list[list[OutputTensor]] = [[]]
    used = 0
    for output in outputs:
        size = nbytes(output.source.shape, output.dtype)
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(output)
        used += size
    return MergePlan(shards, untied)


def check_adapter_fits(adapter: Adapter, base: dict[str, TensorInfo], tied_embedding: str | None) -> None:
    shapes = {
        **adapter.base_copies,
        **{name: tuple(tensor.shape) for name, tensor in adapter.replacements.items()},
        **{name: adapter.expected_shape(name) for name in adapter.lora},
    }
    for name, expected in shapes.items():
        target = tied_embedding if (tied_embedding and name == OUTPUT_HEAD) else name
        info = base.get(target)
        if info is None:
            raise ModelError(f"the adapter in {adapter.path} changes {name}, which the base model does not have")
        if info.shape != expected:
            raise ModelError(
                f"the adapter in {adapter.path} changes {name} with shape {list(expected)}, but the base model's "
                f"is {list(info.shape)}"
            )


def write_weights(
    plan: MergePlan, adapters: list[Adapter], out_dir: Path, device: torch.device, tied: bool
) -> dict[str, str]:
    """Write every shard (and the index when there are several); returns tensor name → file name."""
    weight_map: dict[str, str] = {}
    reader = TensorReader()
    progress = tqdm(total=sum(len(shard) for shard in plan.shards), desc="merging tensors", unit="tensor")
    try:
        for index, shard in enumerate(plan.shards):
            file_name = plan.file_name(index)
            progress.set_postfix_str(file_name)
            planned = [PlannedTensor(t.name, t.source.shape, t.dtype) for t in shard]
            with shard_writer(out_dir / file_name, planned) as writer:
                for output in shard:
                    base = reader.get(output.source)
                    merged = merge_tensor(output.name, output.source.name, base, adapters, device, tied, plan.untied)
                    writer.write(output.name, merged.to(output.dtype))
                    weight_map[output.name] = file_name
                    del base, merged
                    progress.update()
    finally:
        reader.close()
        progress.close()
    if len(plan.shards) > 1:
        index_content = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index_content, indent=2) + "\n", encoding="utf-8")
    return weight_map


def merge_tensor(
    name: str,
    source_name: str,
    base: torch.Tensor,
    adapters: list[Adapter],
    device: torch.device,
    tied: bool,
    untied: bool,
) -> torch.Tensor:
    changed_by = {name, source_name} | (
        {OUTPUT_HEAD} if tied and source_name.endswith("embed_tokens.weight") else set()
    )
    if not base.is_floating_point() or not any(adapter.touches(n) for adapter in adapters for n in changed_by):
        return base  # nothing to merge: no float32 copy (an untouched embedding is the largest tensor of all)
    if name == OUTPUT_HEAD and untied:
        # Untied by a modules_to_save copy: the head starts from the shared weight and takes the head's changes.
        return merge_into(OUTPUT_HEAD, base, adapters, device)
    if tied and not untied and source_name.endswith("embed_tokens.weight"):
        # One shared tensor: LoRA on either the embedding or the head changes both, as peft's in-place merge does.
        merged = merge_into(source_name, base, adapters, device)
        return merge_into(OUTPUT_HEAD, merged, adapters, device)
    return merge_into(name, base, adapters, device)
