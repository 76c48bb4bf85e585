"""DeepSpeed ZeRO through Transformers' Trainer, inside a run: the ZeRO stage, the ZeRO-3 adapter check, tied copies.

Trainer fills every "auto" value from the training arguments (batch sizes, accumulation, learning rate, clipping,
precision). On CPU, DeepSpeed runs over gloo without oneCCL. The config file itself (shipped or a path) is checked
while the config loads, in `tunesmith.config.deepspeed_config`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError


def stage(config_path: str | None) -> int | None:
    """The ZeRO stage a checked config file names (0 when it names none), or None without DeepSpeed."""
    if config_path is None:
        return None
    return int(json.loads(Path(config_path).read_text()).get("zero_optimization", {}).get("stage", 0))


def check_gathered_adapter(saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Under ZeRO-3 each process holds a slice of every weight (its own tensor is empty, `ds_shape` the whole shape):
    a save that did not gather them all writes empty or missing tensors. Refuse an adapter with fewer tensors than
    the model trains, or with an empty one."""
    trained = sum(1 for parameter in model.parameters() if parameter.requires_grad)
    empty = [name for name, tensor in saved.items() if tensor.numel() == 0]
    if len(saved) < trained or empty:
        raise TunesmithError(
            f"the adapter saved under ZeRO-3 holds {len(saved) - len(empty)} whole tensors of the {trained} trained "
            f"ones{f' ({empty[0]} is empty)' if empty else ''}; the weights were not gathered. Please report this."
        )


def remove_tied_copies(output_dir: Path, tied_weights: dict[str, str]) -> list[str]:
    """Drop from a saved model the copies of tied weights (`lm_head.weight` of a model with tied embeddings).

    Under ZeRO-0/1/2, accelerate's `get_state_dict` clones every tensor (deepspeed's `clone_tensors_for_torch_save`),
    so transformers no longer sees that lm_head and the embedding share storage and saves the embedding twice:
    a bigger file than a 1-process run writes, with one more key. The copy equals its source (the model is tied),
    and loading ties it again, so removing it gives the 1-process file. Returns the names removed.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = output_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    weight_map = index["weight_map"] if index else None
    removed = []
    for copy, source in tied_weights.items():
        copy_file = output_dir / (weight_map.get(copy, "") if weight_map else "model.safetensors")
        source_file = output_dir / (weight_map.get(source, "") if weight_map else "model.safetensors")
        if not (copy_file.is_file() and source_file.is_file()):
            continue
        with safe_open(copy_file, "pt") as handle:
            names = handle.keys()  # reads only the header: cheap when there is nothing to remove
            if copy not in names:
                continue
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in names}
        with safe_open(source_file, "pt") as handle:
            names = handle.keys()
            if source not in names or not tensors[copy].equal(handle.get_tensor(source)):
                continue  # not a copy after all: keep it
        del tensors[copy]
        save_file(tensors, copy_file, metadata=metadata)
        if weight_map is not None:
            del weight_map[copy]
        removed.append(copy)
    if index is not None and removed:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return removed
