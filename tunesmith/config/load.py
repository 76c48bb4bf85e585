"""YAML file + `key=value` overrides → a validated `RunConfig`.

Keys may be flat (LLaMA-Factory style, `learning_rate: 1e-4`), nested under their section (`train: {learning_rate:
1e-4}`), or dotted on the command line (`train.learning_rate=1e-4`). Keys from other tools' tutorials are renamed
by `ALIASES`. An override wins over the file. Nothing here touches a model or a dataset.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunesmith.config import torchtune
from tunesmith.config.sections import SECTIONS, RunConfig
from tunesmith.errors import ConfigError

SAVED_CONFIG_FILE = "tunesmith_config.yaml"  # the resolved config, written beside every training output

# Keys other tools use for the same setting (Alpaca-LoRA's finetune.py flags, torchtune-style short names).
ALIASES: dict[str, str] = {
    "base_model": "model_name_or_path",
    "data_path": "dataset",
    "micro_batch_size": "per_device_train_batch_size",
    "num_epochs": "num_train_epochs",
    "epochs": "num_train_epochs",
    "lr": "learning_rate",
    "lora_r": "lora_rank",
    "lora_target_modules": "lora_target",
    "val_set_size": "val_size",
    "train_on_inputs": "train_on_prompt",
    "max_seq_len": "cutoff_len",
    "evaluation_strategy": "eval_strategy",
    "modules_to_save": "additional_target",  # peft's name
    "enable_activation_checkpointing": "gradient_checkpointing",  # torchtune
}

# Keys that say the opposite of ours: LLaMA-Factory turns checkpointing on unless `disable_gradient_checkpointing`.
NEGATED_ALIASES: dict[str, str] = {"disable_gradient_checkpointing": "gradient_checkpointing"}

# Alpaca-LoRA's prompt templates (its templates/*.json, unchanged), shipped beside the named templates.
ALPACA_LORA_TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "templates" / "alpaca_lora"


def alpaca_lora_template(name: Any) -> str:
    """`prompt_template_name: alpaca` → the path of Alpaca-LoRA's templates/alpaca.json."""
    names = sorted(path.stem for path in ALPACA_LORA_TEMPLATES.glob("*.json"))
    if str(name) not in names:
        raise ConfigError(f"`prompt_template_name`: Alpaca-LoRA has no template {name!r}; known: {', '.join(names)}")
    return str(ALPACA_LORA_TEMPLATES / f"{name}.json")


def quantized_to(bits: int):
    def quantization_bit(on: Any) -> int | None:
        if not isinstance(on, bool):
            raise ConfigError(f"`load_in_{bits}bit`: got {on!r}; expected true or false")
        return bits if on else None

    return quantization_bit


# Keys of other tools whose value is written differently too: key → (our key, their value → ours).
CONVERTED_KEYS: dict[str, tuple[str, Any]] = {
    "prompt_template_name": ("template", alpaca_lora_template),  # Alpaca-LoRA
    "load_in_8bit": ("quantization_bit", quantized_to(8)),  # Alpaca-LoRA, transformers
    "load_in_4bit": ("quantization_bit", quantized_to(4)),
}

# Keys that change nothing in tunesmith but appear in copied files; accepted and dropped with a notice.
IGNORED_KEYS: dict[str, str] = {
    "save_safetensors": "tunesmith always saves safetensors",
    "no_cuda": "tunesmith picks the device itself",
}

NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")

KEY_TO_SECTION: dict[str, str] = {key: section for section, model in SECTIONS.items() for key in model.model_fields}


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """`["lr=1e-4", "name=Tunesmith"]` → `{"lr": 0.0001, "name": "Tunesmith"}`, each value by `override_value`."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form key=value (for example learning_rate=1e-4)")
        parsed[key.strip().lstrip("-")] = override_value(key.strip().lstrip("-"), raw)
    return parsed


# A value starting with one of these is meant as YAML (a list, a mapping, a quoted string), so it must parse.
YAML_OPENERS = ("[", "{", '"', "'")


def override_value(key: str, raw: str) -> Any:
    """The value of `key=raw`, read as YAML where the text means YAML, and as the text itself where it is prose.

    `1e-4` → 0.0001, `true` → True, `8` → 8, `[a, b]` → a list, `{a: 1}` → a mapping, `"a b"` → a b; and text stays
    text: `Tunesmith`, `the tunesmith team`, `q_proj,v_proj`, `Answer: yes` (YAML would read a mapping), `*bold*`
    or `@home` (YAML would refuse them). A value that opens a list, a mapping or a quote but does not close it
    (`[1, 2`, `"a b`) is an error: the shell or a typo ate part of it.
    """
    if not raw.strip():
        return ""
    meant_as_yaml = raw.lstrip().startswith(YAML_OPENERS)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        if not meant_as_yaml:
            return raw
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            f"`{key}={raw}` is not valid YAML ({problem}): a value that starts with [, {{ or a quote must be "
            f"complete; quote the whole argument for the shell, e.g. '{key}=[a, b]'"
        ) from None
    if isinstance(value, str) and NUMBER.match(value):  # YAML 1.1 reads 1e-4 as a string
        return float(value)
    if isinstance(value, dict) and not meant_as_yaml:
        return raw  # `Answer: yes` is a sentence, not a mapping
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold `key: value` lines, found a {type(content).__name__}")
    return content


def flatten(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Nested sections and dotted keys → flat keys; aliases renamed. Unknown keys stay, to be reported."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, Mapping):
            for inner_key, inner_value in value.items():
                flat[_canonical(str(inner_key), section=key)] = _value(str(inner_key), inner_value)
            continue
        section, dot, inner_key = key.partition(".")
        if dot and section in SECTIONS:
            flat[_canonical(inner_key, section=section)] = _value(inner_key, value)
        else:
            flat[_canonical(key)] = _value(key, value)
    return flat


def _value(key: str, value: Any) -> Any:
    if key in CONVERTED_KEYS:
        return CONVERTED_KEYS[key][1](value)
    return not value if key in NEGATED_ALIASES and isinstance(value, bool) else value


def _canonical(key: str, section: str | None = None) -> str:
    key = CONVERTED_KEYS[key][0] if key in CONVERTED_KEYS else ALIASES.get(key, NEGATED_ALIASES.get(key, key))
    if section is not None and KEY_TO_SECTION.get(key, section) != section:
        raise ConfigError(f"`{section}.{key}`: {key} belongs to section `{KEY_TO_SECTION[key]}`, not `{section}`")
    return key


def suggest(key: str) -> str:
    known = [*KEY_TO_SECTION, *ALIASES, *NEGATED_ALIASES, *CONVERTED_KEYS]
    candidates = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return (
        f"; did you mean {', '.join(candidates)}?" if candidates else "; `tunesmith train --help-keys` lists every key"
    )


def build_config(values: Mapping[str, Any]) -> RunConfig:
    """Flat values → RunConfig, with every error naming the key, the bad value and what would be valid."""
    by_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        if key in IGNORED_KEYS:
            print(f"note: ignoring `{key}` ({IGNORED_KEYS[key]})")
            continue
        if key not in KEY_TO_SECTION:
            raise ConfigError(f"unknown config key `{key}`{suggest(key)}")
        by_section[KEY_TO_SECTION[key]][key] = value
    try:
        return RunConfig(**by_section)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError, keys: Mapping[str, str] = KEY_TO_SECTION) -> str:
    """One line per problem, naming the key (one of `keys`), the bad value and what would be valid."""
    lines = []
    for problem in error.errors():
        location = [str(part) for part in problem["loc"] if not str(part).isdigit()]
        key = location[-1] if len(location) > 1 else (location[0] if location else "config")
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "literal_error":
            message = "expected " + message.removeprefix("Input should be ")
        if "input" in problem and not isinstance(problem["input"], dict) and key in keys:
            lines.append(f"`{key}`: got {problem['input']!r}; {message}")
        else:
            lines.append(f"{'`' + key + '`: ' if key in keys else ''}{message}")
    return "invalid config: " + "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML file (optional) and apply `key=value` overrides on top."""
    return build_config(read_values(path, overrides))


def read_values(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The flat keys of a YAML file (optional) with `key=value` overrides on top, not validated yet.

    A torchtune recipe config (nested `_component_` keys) is translated first, its overrides applied as `tune run`
    applies them (config/torchtune.py)."""
    raw = read_yaml(path) if path is not None else {}
    if torchtune.is_torchtune_config(raw):
        our_keys = [*KEY_TO_SECTION, *ALIASES, *NEGATED_ALIASES, *CONVERTED_KEYS]
        return flatten(torchtune.translate(raw, overrides, override_value, our_keys))
    values = flatten(raw)
    values.update(flatten(parse_overrides(overrides)))
    return values


def config_to_flat_dict(config: RunConfig) -> dict[str, Any]:
    """The resolved config as flat LLaMA-Factory-style keys, for saving beside outputs and printing at start."""
    return {key: value for section in SECTIONS for key, value in getattr(config, section).model_dump().items()}
