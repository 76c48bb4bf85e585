"""`tunesmith version`: the versions that matter when reporting a problem."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

from tunesmith import __version__

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "deepspeed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    print(f"tunesmith {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for library in LIBRARIES:
        try:
            print(f"{library} {importlib.metadata.version(library)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{library} (not installed)")
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (training runs on the CPU)"
    print(f"GPU: {device}")
    return 0
