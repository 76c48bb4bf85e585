"""`tunesmith download REPO --output-dir DIR`: torchtune's `tune download`, a hub model into a folder.

The folder is a Hugging Face model directory, so it is what `model_name_or_path` (or a torchtune config's
`checkpointer.checkpoint_dir`) takes. Without `--output-dir` the model goes into the Hugging Face cache, where
`model_name_or_path: REPO` finds it.
"""

from __future__ import annotations

import argparse

from tunesmith.model.resolve import hub_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", help="a Hugging Face hub model, e.g. meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--output-dir", "--output_dir", help="the folder to write (default: the hub cache)")
    parser.add_argument(
        "--ignore-patterns", "--ignore_patterns", nargs="*", default=None, help="files to skip, e.g. 'original/*'"
    )
    parser.add_argument("--revision", help="a branch, tag or commit (default: main)")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download

    with hub_errors(args.repo_id, None):
        folder = snapshot_download(
            args.repo_id, revision=args.revision, local_dir=args.output_dir, ignore_patterns=args.ignore_patterns
        )
    print(f"downloaded {args.repo_id} to {folder}; train on it with model_name_or_path={folder}")
    return 0
