"""`tunesmith export CONFIG.yaml [key=value ...]`: LLaMA-Factory's merge YAML as it is, or keys alone.

tunesmith export merge.yaml
tunesmith export adapter_name_or_path=outputs/identity_lora export_dir=exported/identity export_size=200MB
"""

from __future__ import annotations

import argparse

from tunesmith.config.export import EXPORT_KEYS, load_export_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="export YAML (LLaMA-Factory's merge YAML works as it is)")
    parser.add_argument(
        "overrides", nargs="*", help=f"key=value settings that win over the file; keys: {', '.join(EXPORT_KEYS)}"
    )


def run(args: argparse.Namespace) -> int:
    from tunesmith.export.pipeline import export_model

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    config = load_export_config(config_path, overrides)
    export_model(config)
    return 0
