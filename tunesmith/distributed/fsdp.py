"""FSDP through Transformers' Trainer: the Trainer arguments the `fsdp` / `fsdp_config` keys become (the keys
themselves are read in `tunesmith.config.fsdp_keys`), and a check inside the run that the model really is sharded.

The engine is PyTorch's FSDP2 (`fully_shard`), applied by accelerate's FSDP plugin, which Trainer builds from
`fsdp=True, fsdp_config={...}`: each transformer layer is its own unit (`TRANSFORMER_BASED_WRAP`, the classes in the
model's `_no_split_modules` unless `transformer_layer_cls_to_wrap` names others), then the embeddings with the head,
then the root. Checkpoints use `FULL_STATE_DICT` unless told otherwise; the final model or adapter is always saved
whole, so it loads in plain transformers / peft.

Sharding strategies in FSDP2 terms: `full_shard` reshards parameters after each layer's forward (ZeRO-3),
`shard_grad_op` keeps them gathered until the backward (ZeRO-2), `offload` keeps parameters, gradients and
optimizer state in CPU memory. FSDP2 has no `no_shard` (FSDP1's NO_SHARD replicated everything "similar to DDP",
and accelerate refuses the FSDP2 mesh that would mean it, pointing to DDP), so `fsdp: no_shard` runs DDP and says
so.

On CPU processes (gloo) accelerate 1.15 drops the FSDP plugin; `tunesmith.patches.apply_fsdp_on_cpu_processes`
restores it, and `ShardingCheck` fails the run if the model is not an FSDP2 module with DTensor parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunesmith.config.fsdp_keys import FSDP1_ONLY, WRAP_POLICIES
from tunesmith.errors import ConfigError


def training_arguments(fsdp: str | None, offload: bool, config: dict[str, Any] | None, model) -> dict[str, Any]:
    """The TrainingArguments for this FSDP setting (`fsdp`, `fsdp_config`), or {} when FSDP does not run (unset, or
    no_shard, which is DDP). Layer classes to wrap are checked against the model here."""
    if fsdp is None:
        return {}
    if fsdp == "no_shard":
        print(
            "fsdp: no_shard keeps whole parameters, gradients and optimizer state in every process: that is DDP, "
            "which runs now (FSDP2 has no NO_SHARD)"
        )
        return {}
    config = dict(config or {})
    for key in FSDP1_ONLY:
        if config.pop(key, None) is not None:
            print(f"note: fsdp_config.{key} only applies to FSDP1; FSDP2 has no such setting, so it is ignored")
    classes = config.get("transformer_layer_cls_to_wrap")
    if classes and config.get("auto_wrap_policy", WRAP_POLICIES[0]) == WRAP_POLICIES[0]:
        present = {type(module).__name__ for module in model.modules()}
        missing = [name for name in classes if name not in present]
        if missing:
            layers = sorted(name for name in present if re.search(r"(Layer|Block)$", name))
            raise ConfigError(
                f"`fsdp_config.transformer_layer_cls_to_wrap`: {', '.join(missing)} is not in this model; "
                f"its layer classes are {', '.join(layers) or 'none found'}"
            )
    return {
        "fsdp": True,
        "fsdp_config": {
            **config,
            "version": 2,
            "reshard_after_forward": fsdp == "full_shard",
            "cpu_offload": offload,
            "state_dict_type": config.get("state_dict_type", "FULL_STATE_DICT"),
        },
    }


def use_full_state_dict(trainer) -> None:
    """Before the final save: gather whole weights even if checkpoints were sharded, so the output loads anywhere."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")


def drop_tied_copies(trainer, output_dir: Path) -> None:
    """A full FSDP state dict gathers a tied parameter once per name (lm_head.weight and embed_tokens.weight), so
    model.safetensors would hold it twice, where transformers saves it once; keep the first name, the one the model
    loads from. An adapter, or a model saved in several files, is left as saved."""
    path = Path(output_dir) / "model.safetensors"
    if not getattr(trainer, "is_fsdp_enabled", False) or not path.is_file():
        return
    names: dict[int, list[str]] = {}
    for name, parameter in trainer.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    copies = {name for same in names.values() for name in same[1:]}
    if not copies:
        return
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    tensors = load_file(path)
    if copies & tensors.keys():
        save_file({name: tensor for name, tensor in tensors.items() if name not in copies}, path, metadata=metadata)


class ShardingCheck(TrainerCallback):
    """At the start of training, after Trainer prepared the model: fail unless it is an FSDP2 module whose trainable
    parameters are DTensors (a silent fallback to DDP would still train, and even match a 1-process run), then say
    how it is sharded."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        trainable = [p for p in model.parameters() if p.requires_grad]
        sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
        if not isinstance(model, FSDPModule) or not all(isinstance(p, DTensor) for p in trainable):
            raise RuntimeError(
                f"fsdp is set but the prepared model is a {type(model).__name__} with {len(sharded)} DTensor "
                "parameters: FSDP was not applied (see tunesmith/patches.py)"
            )
        units = sum(isinstance(module, FSDPModule) for module in model.modules())
        local = sum(p.to_local().numel() for p in sharded)
        whole = sum(p.numel() for p in sharded)
        world = dist.get_world_size() if dist.is_initialized() else 1
        placement = "CPU-offloaded" if args.fsdp_config.get("cpu_offload") else str(sharded[0].device.type)
        print(
            f"fsdp: FSDP2 over {world} process(es), {units} fully_shard units, {len(sharded)} DTensor parameters "
            f"({placement}); this process holds {local:,} of {whole:,} elements"
        )
