"""The `fsdp` and `fsdp_config` keys as people write them (transformers' strings, accelerate's upper-case names,
`fsdp_`-prefixed keys, a JSON/YAML file), checked and normalised while the config loads.

What they become at run time (Trainer's arguments, the check that the model really is sharded) is
`tunesmith.distributed.fsdp`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SHARDING = ("full_shard", "shard_grad_op", "no_shard")
FSDP_WORDS = (*SHARDING, "offload", "auto_wrap")  # what transformers' `fsdp` string may hold (FSDPOption)
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
BOOLEAN_KEYS = ("cpu_ram_efficient_loading", "activation_checkpointing")
# fsdp_config keys that only FSDP1 reads; FSDP2 has no equivalent, so they are accepted and ignored with a note
FSDP1_ONLY = ("backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers")
# keys that say the same as `fsdp` itself (transformers, accelerate config files): folded into `fsdp`/`fsdp_offload`
STRATEGY_KEYS = ("sharding_strategy", "reshard_after_forward", "offload_params", "cpu_offload")
CONFIG_KEYS = (
    "version",
    "transformer_layer_cls_to_wrap",
    "auto_wrap_policy",
    "min_num_params",
    "state_dict_type",
    *BOOLEAN_KEYS,
    *FSDP1_ONLY,
)


def _choices(values) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}"


def _upper_choice(key: str, value: Any, choices, hint: str = "") -> str:
    """An fsdp_config value written in any case, checked against accelerate's upper-case names."""
    name = str(value).upper()
    if name not in choices:
        raise ValueError(f"`fsdp_config.{key}`: got {value!r}; expected {_choices(choices)}{hint}")
    return name


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"`fsdp_config.{key}`: got {value!r}; expected true or false")


def parse_fsdp(value: Any) -> tuple[bool, str | None, bool]:
    """The `fsdp` key as written (`full_shard`, `"full_shard auto_wrap"`, `full_shard offload`, a list, true) →
    (on, the sharding strategy it names or None, offload)."""
    if value is None or value is False or value == "" or value == []:
        return False, None, False
    if value is True:
        return True, None, False
    words = value.split() if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        raise ValueError(f"`fsdp`: got {value!r}; expected {_choices(SHARDING)}, optionally with offload")
    words = [word.strip(" ,").lower() for word in words if word.strip(" ,")]
    unknown = [word for word in words if word not in FSDP_WORDS]
    if unknown:
        hint = " (hybrid sharding is FSDP1-only; tunesmith runs FSDP2)" if any("hybrid" in w for w in unknown) else ""
        raise ValueError(
            f"`fsdp`: got {value!r}; {', '.join(unknown)} is not an FSDP option{hint}; expected "
            f"{_choices(SHARDING)}, optionally with offload (auto_wrap is accepted and always on)"
        )
    strategies = [word for word in words if word in SHARDING]
    if len(strategies) > 1:
        raise ValueError(f"`fsdp`: got {value!r}; choose one of {_choices(SHARDING)}")
    return True, (strategies[0] if strategies else None), "offload" in words


def read_fsdp_config(value: Any) -> dict[str, Any]:
    """`fsdp_config` as written: a mapping, a JSON/YAML file path, or a mapping typed on the command line → a dict
    with the `fsdp_` prefix that transformers and accelerate files use taken off."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        if path.is_file():
            try:
                value = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
            except yaml.YAMLError as error:
                raise ValueError(f"`fsdp_config`: {path} is not valid JSON or YAML: {error}") from None
            if not isinstance(value, dict):
                raise ValueError(f"`fsdp_config`: {path} must hold a mapping of FSDP settings")
        else:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = None
            if not isinstance(parsed, dict):
                raise ValueError(
                    f"`fsdp_config`: got {value!r}, which is neither a file nor a mapping; give a JSON/YAML path or "
                    "a mapping such as {transformer_layer_cls_to_wrap: LlamaDecoderLayer}"
                )
            value = parsed
    if not isinstance(value, dict):
        raise ValueError(f"`fsdp_config`: got {value!r}; expected a mapping or a JSON/YAML file path")
    config: dict[str, Any] = {}
    for key, item in value.items():
        name = str(key).removeprefix("fsdp_")
        if name not in (*CONFIG_KEYS, *STRATEGY_KEYS):
            raise ValueError(
                f"`fsdp_config`: unknown key {key!r}; the keys are {', '.join((*CONFIG_KEYS, *STRATEGY_KEYS))} "
                "(an `fsdp_` prefix is optional)"
            )
        config[name] = item
    return config


def check_fsdp_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise the values of an `fsdp_config` whose strategy keys were already folded into `fsdp`."""
    checked = dict(config)
    if "version" in checked:
        version = str(checked["version"]).strip()
        if version == "1":
            raise ValueError(
                "`fsdp_config.version`: got 1; tunesmith runs FSDP2 (transformers 5 deprecates FSDP1); "
                "set version: 2 or remove it"
            )
        if version != "2":
            raise ValueError(f"`fsdp_config.version`: got {checked['version']!r}; expected 2")
        checked["version"] = 2
    if "transformer_layer_cls_to_wrap" in checked:
        classes = checked["transformer_layer_cls_to_wrap"]
        if isinstance(classes, str):
            classes = [name.strip() for name in classes.split(",") if name.strip()]
        if not classes or not all(isinstance(name, str) for name in classes):
            raise ValueError(
                f"`fsdp_config.transformer_layer_cls_to_wrap`: got {checked['transformer_layer_cls_to_wrap']!r}; "
                "expected layer class names such as LlamaDecoderLayer"
            )
        checked["transformer_layer_cls_to_wrap"] = classes
    if "auto_wrap_policy" in checked:
        checked["auto_wrap_policy"] = _upper_choice("auto_wrap_policy", checked["auto_wrap_policy"], WRAP_POLICIES)
    if "min_num_params" in checked:
        count = checked["min_num_params"]
        if isinstance(count, bool) or not isinstance(count, int | float) or count < 0 or count != int(count):
            raise ValueError(f"`fsdp_config.min_num_params`: got {count!r}; expected a whole number >= 0")
        checked["min_num_params"] = int(count)
    if "state_dict_type" in checked:
        checked["state_dict_type"] = _upper_choice(
            "state_dict_type",
            checked["state_dict_type"],
            STATE_DICT_TYPES,
            " (for checkpoints; the final model is always saved whole)",
        )
    for key in BOOLEAN_KEYS:
        if key in checked:
            checked[key] = _bool(key, checked[key])
    return checked


def fold_strategy_keys(strategy: str | None, offload: bool, config: dict[str, Any]):
    """`fsdp_config` keys that repeat the strategy (`sharding_strategy`, `reshard_after_forward`, `offload_params`,
    `cpu_offload`) → (strategy, offload, the rest of fsdp_config). The strategy defaults to full_shard; a
    disagreement with `fsdp` is an error."""
    config = dict(config)
    wanted: dict[str, str] = {}  # strategy → the key that asks for it
    if "sharding_strategy" in config:
        raw = config.pop("sharding_strategy")
        name = str(raw).strip().lower()
        if name not in SHARDING:
            raise ValueError(f"`fsdp_config.sharding_strategy`: got {raw!r}; expected {_choices(SHARDING)}")
        wanted[name] = "sharding_strategy"
    if "reshard_after_forward" in config:
        reshard = _bool("reshard_after_forward", config.pop("reshard_after_forward"))
        wanted.setdefault("full_shard" if reshard else "shard_grad_op", "reshard_after_forward")
    for key in ("offload_params", "cpu_offload"):
        if key in config:
            offload = _bool(key, config.pop(key)) or offload
    asked = {strategy} | set(wanted) if strategy else set(wanted)
    if len(asked) > 1:
        sources = ([f"`fsdp` asks for {strategy}"] if strategy else []) + [
            f"`fsdp_config.{key}` for {name}" for name, key in wanted.items()
        ]
        raise ValueError(f"`fsdp`: the settings disagree ({'; '.join(sources)}); name the strategy once, in `fsdp`")
    return (asked.pop() if asked else "full_shard"), offload, config
