"""What gets trained: a LoRA adapter (peft), the whole model, or the last layers (freeze); and existing adapters
(`adapter_name_or_path`) loaded onto a base model, the same way for training, chat and later export and serve."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tunesmith.config import SAVED_CONFIG_FILE
from tunesmith.errors import ConfigError, ModelError, TunesmithError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's saved names start here; the rest is the module path in the base model

# Training keys that shape a new LoRA adapter → the adapter_config.json field that an existing adapter has instead
LORA_SHAPE_KEYS = {
    "lora_rank": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target": "target_modules",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
    "additional_target": "modules_to_save",
}


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
    task_type: str = "CAUSAL_LM",
) -> nn.Module:
    """Wrap `model` in a peft LoRA adapter.

    rsLoRA scales by alpha/sqrt(r) instead of alpha/r; DoRA adds magnitudes; `pissa_iter` (not None) starts A and B
    from the principal singular vectors, by fast SVD with that many iterations (-1: exact SVD), and leaves the
    residual in the base weights; `modules_to_save` are trained in full and saved with the adapter. `task_type`
    is peft's: SEQ_CLS for a reward model, so that peft loads the adapter onto a sequence-classification model.
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
        task_type=task_type,
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
    num_layers = model.config.get_text_config().num_hidden_layers  # a vision-language model: its language model
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


def check_adapter_saves(adapter_dir: Path, module: str) -> None:
    """Refuse to train further an adapter that does not save `module` (a reward model's score head): the head would
    stay frozen at its random start."""
    saved = json.loads((check_adapter_dir(adapter_dir) / ADAPTER_CONFIG).read_text()).get("modules_to_save") or []
    if module not in saved:
        raise ConfigError(
            f"`adapter_name_or_path`: {adapter_dir} does not save a `{module}` head (its modules_to_save: "
            f"{saved or 'none'}), so training it further would leave the new head untrained; set "
            "create_new_adapter: true to merge it and train a new adapter with the head"
        )


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


# --- existing adapters: adapter_name_or_path --------------------------------------------------------------------


def check_adapter_dir(adapter: str | Path) -> Path:
    """The directory of a saved LoRA adapter, or a one-line error saying what `adapter` is instead."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"`adapter_name_or_path`: adapter directory {path} does not exist; give the output_dir of a LoRA training "
            f"run (a hub adapter: download it first with `hf download ORG/NAME --local-dir DIR`)"
        )
    if not (path / ADAPTER_CONFIG).is_file():
        if (path / "config.json").is_file():
            raise ModelError(
                f"`adapter_name_or_path`: {path} holds a full model, not an adapter; "
                f"give it as the model (model_name_or_path / --model {path})"
            )
        raise ModelError(f"`adapter_name_or_path`: {path} has no {ADAPTER_CONFIG}; is it the output_dir of a LoRA run?")
    return path


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def saved_training_value(run_dir: Path, key: str) -> Any:
    """A key of the training config saved in a run's output_dir, or None (no saved config, or no such key)."""
    config_file = run_dir / SAVED_CONFIG_FILE
    saved = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    if not isinstance(saved, dict):
        return None
    if key in saved:
        return saved[key]
    # The saved config is flat; one nested by section (model: {model_name_or_path: ...}) is read too.
    return next((section[key] for section in saved.values() if isinstance(section, dict) and key in section), None)


def recorded_base_model(adapter_dir: Path) -> str | None:
    """The model the adapter was trained on: from tunesmith's saved config, else from peft's adapter_config.json."""
    name = saved_training_value(adapter_dir, "model_name_or_path") or read_adapter_config(adapter_dir).get(
        "base_model_name_or_path"
    )
    return str(name) if name else None


def adapters_beneath(adapter_dir: Path) -> list[str]:
    """The adapters merged into the base model before this one was trained, in order, from its saved config.

    A run with `adapter_name_or_path: a,b` trains b further on the base with a merged in, so its output applies
    only on top of a; with create_new_adapter, on top of a and b. Recursive: a may itself sit on others.
    """
    config_file = adapter_dir / SAVED_CONFIG_FILE
    saved = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    given = saved.get("adapter_name_or_path") if isinstance(saved, dict) else None
    if not given:
        return []
    given = [part.strip() for part in given.split(",")] if isinstance(given, str) else [str(part) for part in given]
    given = [part for part in given if not _same_model_name(part, str(adapter_dir))]  # never itself
    stack = with_adapters_beneath(given, note=False)
    return stack if saved.get("create_new_adapter") else stack[:-1]


def with_adapters_beneath(adapters: Iterable[str], note: bool = True) -> list[str]:
    """`adapters`, each preceded by the adapters it was trained on top of, unless the list has them already."""
    stack: list[str] = []
    for adapter in adapters:
        for beneath in adapters_beneath(check_adapter_dir(adapter)):
            if not any(_same_model_name(beneath, present) for present in stack):
                stack.append(beneath)
                if note:
                    print(f"note: {adapter} was trained on top of {beneath}, which is merged in first", file=sys.stderr)
        stack.append(str(adapter))
    return stack


def check_adapters_to_train(adapters: list[str], create_new: bool, lora_settings: Mapping[str, Any]) -> None:
    """Before any loading: every adapter is there, and one trained further keeps its own shape, so a LoRA key set
    to something else is refused rather than ignored. `lora_settings`: the LoRA keys the user set and their values.
    """
    adapter_dirs = [check_adapter_dir(adapter) for adapter in with_adapters_beneath(adapters, note=False)]
    if create_new:
        return  # they are all merged; the new adapter takes the LoRA keys
    adapter_dir = adapter_dirs[-1]
    saved = read_adapter_config(adapter_dir)
    for key, value in lora_settings.items():
        if (key == "lora_target" and list(value) == ["all"]) or (key == "lora_alpha" and value is None):
            continue  # `all` is compared once the model is loaded (check_targets_cover_all); None: the adapter's
        expected = saved.get(LORA_SHAPE_KEYS[key])
        same = sorted(value or []) == sorted(expected or []) if isinstance(value, list) else value == expected
        if not same:
            raise ConfigError(
                f"`{key}: {value}` differs from the adapter being trained further ({adapter_dir} has "
                f"{LORA_SHAPE_KEYS[key]}: {expected}); remove {key} to keep the adapter as it is, or set "
                f"create_new_adapter: true to merge it and train a new adapter with {key}: {value}"
            )


def check_targets_cover_all(model: nn.Module, adapter_dir: Path) -> None:
    """`lora_target: all` set by the user with an adapter to go on training: it must adapt every linear layer."""
    targets = set(read_adapter_config(adapter_dir).get("target_modules") or [])
    missing = sorted(set(linear_layer_names(model)) - targets)
    if missing:
        raise ConfigError(
            f"`lora_target: all`, but the adapter being trained further ({adapter_dir}) adapts only "
            f"{', '.join(sorted(targets))}, not {', '.join(missing)}; remove lora_target to keep the adapter as it is, "
            "or set create_new_adapter: true to merge it and train a new adapter on every linear layer"
        )


def check_adapter_fits(model: nn.Module, adapter_dir: Path, model_name: str) -> None:
    """Refuse an adapter trained on another model: each adapted layer must exist here with the same shape.

    Read from the safetensors header only, before peft loads anything, so the message names both models and the
    first layer that differs. Shapes cannot tell two models of one architecture apart; a differently named base is
    then only noted.
    """
    from safetensors import safe_open

    recorded = recorded_base_model(adapter_dir)
    trained_on = f"trained on {recorded}" if recorded else "trained on another model"
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return  # an old .bin adapter: peft reads it and reports any mismatch itself
    with safe_open(str(weights), framework="pt") as tensors:
        shapes = {name: list(tensors.get_slice(name).get_shape()) for name in tensors.keys()}  # noqa: SIM118
    for name, shape in shapes.items():
        problem = _misfit(model, name.removeprefix(PEFT_PREFIX), shape)
        if problem:
            raise ModelError(
                f"the adapter in {adapter_dir} was {trained_on} and does not fit model {model_name}: {problem}"
            )
    if recorded and not _same_model_name(recorded, model_name):
        print(
            f"note: the adapter in {adapter_dir} was trained on {recorded}; applying it to {model_name}",
            file=sys.stderr,
        )


def _misfit(model: nn.Module, name: str, shape: list[int]) -> str | None:
    """What in `model` does not match the adapter tensor `name` of `shape`, or None."""
    module_path, lora, kind = name.partition(".lora_")
    if not lora:  # a module saved whole (modules_to_save, a targeted embedding's base weight)
        parameter_path = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
        try:
            parameter = model.get_parameter(parameter_path)
        except AttributeError:
            return f"it trains {parameter_path}, which this model does not have"
        if parameter.dtype.is_floating_point and list(parameter.shape) != shape:
            return f"{parameter_path} is {list(parameter.shape)} here, and {shape} in the adapter's model"
        return None
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return f"it adapts layer {module_path}, which this model does not have"
    expected = {
        "A.weight": ("in_features", 1),
        "B.weight": ("out_features", 0),
        "magnitude_vector": ("out_features", 0),
        "embedding_A": ("num_embeddings", 1),
        "embedding_B": ("embedding_dim", 0),
    }.get(kind)
    size = getattr(module, expected[0], None) if expected else None
    if size is not None and shape[expected[1]] != size:
        return f"layer {module_path} has {expected[0]} {size} here, and {shape[expected[1]]} in the adapter's model"
    return None


def _same_model_name(first: str, second: str) -> bool:
    if first == second:
        return True
    first_path, second_path = Path(first).expanduser(), Path(second).expanduser()
    return first_path.exists() and second_path.exists() and first_path.resolve() == second_path.resolve()


def load_adapters(
    model: nn.Module, adapters: Iterable[str | Path], model_name: str, *, keep_last: bool, trainable: bool = False
) -> nn.Module:
    """Apply saved LoRA adapters to `model`, LLaMA-Factory's way (what it did goes to stderr, beside other notes).

    Every adapter but the last is merged into the weights, in order. The last one stays a peft adapter when
    `keep_last` (trainable with `trainable`: training goes on from it), or is merged too (create_new_adapter: a new
    adapter is then trained on top). A quantized model takes one adapter, kept as it is: merging into 4-bit or
    8-bit weights would round the adapter's change to the quantization grid. An adapter trained on top of merged
    adapters gets them merged first (`with_adapters_beneath`), so it applies to the weights it was trained on.
    """
    from peft import PeftModel

    adapter_dirs = [check_adapter_dir(adapter) for adapter in with_adapters_beneath(adapters)]
    to_merge = adapter_dirs[:-1] if keep_last else adapter_dirs
    if to_merge and getattr(model, "is_quantized", False):
        raise ConfigError(
            f"`adapter_name_or_path`: {model_name} is loaded quantized, so adapters cannot be merged into it "
            f"(the merged change would be rounded to the quantization grid); give one adapter and no "
            f"create_new_adapter, or merge {', '.join(map(str, to_merge))} into the unquantized model first"
        )
    for adapter_dir in to_merge:
        check_adapter_fits(model, adapter_dir, model_name)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if to_merge:
        print(f"adapters merged into the base model: {', '.join(map(str, to_merge))}", file=sys.stderr)
    if keep_last:
        check_adapter_fits(model, adapter_dirs[-1], model_name)
        model = PeftModel.from_pretrained(model, str(adapter_dirs[-1]), is_trainable=trainable)
        print(f"adapter {'trained further' if trainable else 'loaded'}: {adapter_dirs[-1]}", file=sys.stderr)
    return model
