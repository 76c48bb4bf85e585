"""`tunesmith chat`: talk to a model or a trained adapter, the reply streamed as it is generated.

Interactive by default (multi-turn history, `/clear`, `/exit`); `--prompt TEXT` answers once and exits. Only the
conversation goes to stdout; the banner and notes go to stderr, so `--prompt` output can be captured by a script.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

from tunesmith.chat.engine import DEFAULT_MODEL, ChatEngine, GenerationOptions, Message, load_chat_engine
from tunesmith.errors import ConfigError

COMMANDS_HELP = "/clear starts a new conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationOptions()
    parser.add_argument(
        "--model",
        help=f"base model (alias, directory, .gguf file or hub id) or a full fine-tuned model directory; "
        f"default: the adapter's base model, else {DEFAULT_MODEL}",
    )
    parser.add_argument("--adapter", metavar="DIR", help="a LoRA adapter directory (the output_dir of a training run)")
    parser.add_argument("--template", help="a named chat template to use instead of the tokenizer's own")
    parser.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    parser.add_argument("--prompt", metavar="TEXT", help="answer this one message, print the reply and exit")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 turns top-k filtering off")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument(
        "--do-sample",
        action=argparse.BooleanOptionalAction,
        default=defaults.do_sample,
        help="sample (default) or, with --no-do-sample, always take the likeliest token",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with the model")


def run(args: argparse.Namespace) -> int:
    # Checked before loading, so that a bad flag fails in a moment rather than after the model loads.
    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        do_sample=args.do_sample,
    )
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("--prompt is empty; give the message to answer")

    engine = load_chat_engine(args.model, args.adapter, args.template, args.trust_remote_code)
    print(describe(engine), file=sys.stderr)
    if args.prompt is not None:
        messages = [*new_history(args.system), {"role": "user", "content": args.prompt}]
        for text in engine.stream(messages, options):
            print(text, end="", flush=True)
        print()
        return 0
    print(COMMANDS_HELP, file=sys.stderr)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and arrow-key history for input())
    return chat_loop(engine, options, args.system)


def describe(engine: ChatEngine) -> str:
    adapter = f" + adapter {engine.adapter}" if engine.adapter else ""
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    return f"tunesmith chat: model {engine.model_name}{adapter} on {engine.device.type} ({dtype})"


def new_history(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system else []


def chat_loop(
    engine: ChatEngine, options: GenerationOptions, system: str | None, read_line: Callable[[str], str] = input
) -> int:
    """Read a message, stream the reply, repeat; the whole conversation so far is sent each turn."""
    history = new_history(system)
    while True:
        try:
            line = read_line("User: ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt ends the session
            print()
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/clear":
            history = new_history(system)  # the system message stays: it belongs to the session, not the talk
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith("/") and " " not in line:
            print(f"(unknown command {line}; {COMMANDS_HELP})", file=sys.stderr)
            continue

        history.append({"role": "user", "content": line})
        print("Assistant: ", end="", flush=True)
        pieces: list[str] = []
        try:
            for text in engine.stream(history, options):
                print(text, end="", flush=True)
                pieces.append(text)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()
        # A stopped reply stays in the history as far as it got: that is what the user saw.
        history.append({"role": "assistant", "content": "".join(pieces)})
