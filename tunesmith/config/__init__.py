"""Typed configuration: YAML + `key=value` overrides, validated before any weight is loaded."""

from tunesmith.config.load import SAVED_CONFIG_FILE, config_to_flat_dict, load_config
from tunesmith.config.sections import RunConfig

__all__ = ["SAVED_CONFIG_FILE", "RunConfig", "config_to_flat_dict", "load_config"]
