"""Typed configuration: YAML + `key=value` overrides, validated before any weight is loaded."""

from tunesmith.config.load import config_to_flat_dict, load_config
from tunesmith.config.sections import RunConfig

__all__ = ["RunConfig", "config_to_flat_dict", "load_config"]
