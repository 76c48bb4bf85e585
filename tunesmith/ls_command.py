"""`tunesmith ls`: the shipped recipes, one per tutorial workflow (torchtune's `tune ls`)."""

from __future__ import annotations

import argparse

from tunesmith.config.recipes import recipe_names, recipe_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    names = recipe_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {recipe_summary(name)}")
    print("\nrun one: tunesmith train NAME [key=value ...]; copy one to edit: tunesmith cp NAME my.yaml")
    return 0
