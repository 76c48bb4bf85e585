"""What the tabs' forms share: the "use the model's own template" choice, and the "More keys" box (Train, Evaluate,
Data): further config keys as YAML (`name: Tunesmith`).

The command's own config loader checks the more keys like every other key; here only what the page itself forbids is
refused: a key the form already sets (one place for each value) and trust_remote_code (the page never runs a
model's code).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import yaml

from tunesmith.errors import ConfigError

MODEL_TEMPLATE = "(the model's own)"  # the template choice that sets no `template` key


def parse_more_keys(raw: str, taken: Iterable[str]) -> dict[str, Any]:
    if not (raw or "").strip():
        return {}
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"More keys: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(parsed, dict):
        raise ConfigError("More keys: expected `key: value` lines")
    clash = sorted(set(parsed) & set(taken))
    if clash:
        raise ConfigError(f"More keys: {', '.join(clash)} are set in the form above; change them there")
    if parsed.get("trust_remote_code"):
        raise ConfigError(
            "More keys: trust_remote_code runs Python shipped with a model; the web UI never does. "
            "Run the command from a terminal if you trust that code"
        )
    return parsed


def as_arguments(keys: dict[str, Any]) -> list[str]:
    """`key=value` command-line arguments that the commands' loaders read back as the same values."""
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in keys.items()]
