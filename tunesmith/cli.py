"""The `tunesmith` command: a table of subcommands, each one module with `add_arguments` and `run`.

A `TunesmithError` (bad config, data, model or output directory) is printed as one or two lines and exits with
status 2; any other exception is a bug in tunesmith: it keeps its traceback, ends with a line asking for a report,
and exits with status 1.

`--verbose` (before or after the command's name) shows the libraries' warnings, which are hidden by default
(tunesmith/console.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from tunesmith import __version__, console
from tunesmith.errors import TunesmithError

BUG_NOTE = (
    "This is a bug in tunesmith, not a mistake in your config: please report it with this traceback and the "
    "output of `tunesmith version`."
)

# name → (module holding add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tunesmith.train.command", "fine-tune a model: tunesmith train CONFIG.yaml [key=value ...]"),
    "run": ("tunesmith.train.run_command", "torchtune's tune run: tunesmith run RECIPE --config FILE [key=value ...]"),
    "data": ("tunesmith.data.command", "check, preview or convert datasets with the same keys as train"),
    "chat": ("tunesmith.chat.command", "chat with a model or a trained adapter, streaming the reply"),
    "export": ("tunesmith.export.command", "merge adapters and write safetensors shards, GGUF and a Modelfile"),
    "serve": ("tunesmith.serve.command", "an OpenAI-compatible API over a model: tunesmith serve CONFIG.yaml"),
    "predict": ("tunesmith.evaluate.predict_command", "generate a reply for every row of a test file, with BLEU/ROUGE"),
    "eval": ("tunesmith.evaluate.eval_command", "MMLU, C-Eval or CMMLU accuracy of a model or adapter"),
    "score": ("tunesmith.evaluate.score_command", "print the reward a model trained by stage rm gives a conversation"),
    "estimate": ("tunesmith.estimate.command", "predict a run's peak memory before loading anything"),
    "webui": ("tunesmith.ui.webui_command", "the browser UI: train, watch, chat, evaluate and export (127.0.0.1)"),
    "version": ("tunesmith.version_command", "print the versions of tunesmith and the libraries it uses"),
    "download": ("tunesmith.download_command", "download a hub model into a folder (torchtune's tune download)"),
    "ls": ("tunesmith.ls_command", "list the shipped recipes, one per tutorial workflow"),
    "cp": ("tunesmith.cp_command", "copy a shipped recipe to edit: tunesmith cp NAME dest.yaml"),
    "env": ("tunesmith.env_command", "the environment as a Markdown table for bug reports; --check tests devices"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune large language models.")
    parser.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    add_verbose_flag(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        add_verbose_flag(subparser, default=argparse.SUPPRESS)  # absent here: the top-level value stands
        subparser.set_defaults(run=module.run)
    return parser


def add_verbose_flag(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--verbose", action="store_true", default=default, help="show the libraries' warnings and notices too"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # TRL's trainers (stages rm, dpo, kto, grpo) report their use to the Hub unless told not to; tunesmith does not
    # phone home on a user's behalf. HF_HUB_DISABLE_TELEMETRY=0 in the environment turns it back on.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    console.configure(verbose=args.verbose)
    args.as_program = argv is None  # this process's own command line: a command may re-execute it (train/allocator)
    try:
        return args.run(args) or 0
    except TunesmithError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # not a user's mistake: keep the traceback (re-raised) and ask for a report
        error.add_note(BUG_NOTE)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
