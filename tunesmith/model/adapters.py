"""What gets trained: a LoRA adapter (peft), the whole model, or the last layers (freeze)."""

from __future__ import annotations

import re

import torch
from torch import nn

from tunesmith.errors import ConfigError, TunesmithError


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct short names of the linear layers (q_proj, gate_proj, ...), excluding the output head."""
    output_head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output_head
    }
    return sorted(names)


def resolve_lora_targets(model: nn.Module, lora_target: list[str]) -> list[str]:
    available = linear_layer_names(model)
    if lora_target == ["all"]:
        return available
    unknown = [target for target in lora_target if target not in available]
    if unknown:
        raise ConfigError(
            f"`lora_target`: {', '.join(unknown)} matches no linear layer of this model; "
            f"its linear layers are: {', '.join(available)} (or use `all`)"
        )
    return lora_target


def apply_lora(
    model: nn.Module,
    targets: list[str],
    rank: int,
    alpha: int | None,
    dropout: float,
    use_rslora: bool = False,
    use_dora: bool = False,
    pissa_iter: int | None = None,
    modules_to_save: list[str] | None = None,
) -> nn.Module:
    """Wrap `model` in a peft LoRA adapter.

    rsLoRA scales by alpha/sqrt(r) instead of alpha/r; DoRA adds magnitudes; `pissa_iter` (not None) starts A and B
    from the principal singular vectors, by fast SVD with that many iterations (-1: exact SVD), and leaves the
    residual in the base weights; `modules_to_save` are trained in full and saved with the adapter.
    """
    from peft import LoraConfig, get_peft_model

    init: bool | str = True
    if pissa_iter is not None:
        init = "pissa" if pissa_iter == -1 else f"pissa_niter_{pissa_iter}"
    if modules_to_save:
        short_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
        missing = [name for name in modules_to_save if name not in short_names]
        if missing:
            outside_layers = sorted(
                {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name and ".layers" not in name}
            )
            raise ConfigError(
                f"`additional_target`: {', '.join(missing)} is not a module of this model; modules outside the "
                f"decoder layers are: {', '.join(outside_layers)}"
            )
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=init,
        modules_to_save=modules_to_save or None,
    )
    return get_peft_model(model, config)


def apply_freeze(
    model: nn.Module, trainable_layers: int, trainable_modules: list[str], extra_modules: list[str]
) -> nn.Module:
    """Train only the last `trainable_layers` decoder layers (the first ones if negative), or named parts of them."""
    num_layers = model.config.num_hidden_layers
    if trainable_layers == 0 or abs(trainable_layers) > num_layers:
        raise ConfigError(
            f"`freeze_trainable_layers`: got {trainable_layers}; this model has {num_layers} layers, "
            f"so use 1..{num_layers} (last layers) or -1..-{num_layers} (first layers)"
        )
    layer_ids = range(num_layers - trainable_layers, num_layers) if trainable_layers > 0 else range(-trainable_layers)
    layer_pattern = re.compile(r"\.layers\.(\d+)\.")
    matched_modules: set[str] = set()
    for name, parameter in model.named_parameters():
        layer = layer_pattern.search(name)
        in_layer = layer is not None and int(layer.group(1)) in layer_ids
        module_ok = trainable_modules == ["all"] or any(f".{module}." in name for module in trainable_modules)
        extra = layer is None and any(f".{module}." in f".{name}" for module in extra_modules)
        parameter.requires_grad_((in_layer and module_ok) or extra)
        matched_modules.update(module for module in [*trainable_modules, *extra_modules] if f".{module}." in f".{name}")
    missing = [
        module for module in [*trainable_modules, *extra_modules] if module != "all" and module not in matched_modules
    ]
    if missing:
        raise ConfigError(f"freeze modules {', '.join(missing)} match no parameter of this model")
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model


def let_inputs_carry_gradients(model: nn.Module) -> None:
    """Make the input embeddings' output require grad when the embeddings themselves are frozen (LoRA, QLoRA, freeze).

    Reentrant activation checkpointing (`gradient_checkpointing: offload`) gives a layer's parameters gradients only
    when the layer's input requires grad; with frozen embeddings nothing does, so no adapter inside a checkpointed
    layer would learn. Transformers 5 registers the same hook when it turns checkpointing on, but not every path
    does (older transformers, models with their own checkpointing code), so the recipe sets it itself.
    """
    embeddings = model.get_input_embeddings()
    if not any(parameter.requires_grad for parameter in embeddings.parameters()):
        embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def check_adapter_weights(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter that is empty or never learned (all B matrices zero): a silent no-op otherwise."""
    if not state_dict:
        raise TunesmithError("the saved adapter has no tensors; nothing was trained. Please report this as a bug.")
    b_matrices = [tensor for name, tensor in state_dict.items() if "lora_B" in name]
    if b_matrices and all(not torch.any(tensor) for tensor in b_matrices):
        raise TunesmithError(
            "every LoRA B matrix is still zero after training, so the adapter changes nothing; "
            "the learning rate may be 0, or no step ran (check max_steps, num_train_epochs and the data)"
        )
