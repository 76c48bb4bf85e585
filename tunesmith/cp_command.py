"""`tunesmith cp NAME dest.yaml`: copy a shipped recipe to edit (torchtune's `tune cp`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunesmith.config.recipes import copy_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a recipe from `tunesmith ls`")
    parser.add_argument("destination", help="the YAML file (or folder) to write")


def run(args: argparse.Namespace) -> int:
    written = copy_recipe(args.name, Path(args.destination))
    print(f"wrote {written}; run it with: tunesmith train {written}")
    return 0
