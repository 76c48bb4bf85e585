"""`tunesmith chat [CONFIG.yaml] [key=value ...] [flags]`: talk to a model or a trained adapter, streamed.

Takes what `llamafactory-cli chat` takes: an inference YAML (config/inference.py) and `key=value` overrides; the
flags are short aliases of its keys, in both spellings (`--max-new-tokens`, `--max_new_tokens`), and win over both.
Interactive by default (multi-turn history, `/clear`, `/exit`); `--prompt TEXT` answers once and exits. Only the
conversation goes to stdout; the banner and notes go to stderr, so `--prompt` output can be captured by a script.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

from tunesmith.chat.engine import DEFAULT_MODEL, ChatEngine, Message, load_chat_engine
from tunesmith.config.inference import GenerationSection, InferenceConfig, load_inference_config
from tunesmith.errors import ConfigError

COMMANDS_HELP = "/clear starts a new conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply"

# flag (its dashed spelling; the underscore one works too) → the inference key it sets, and its help
FLAGS: dict[str, tuple[str, str]] = {
    "model": (
        "model_name_or_path",
        f"base model (alias, directory, .gguf file or hub id) or a full fine-tuned model directory; default: the "
        f"adapter's base model, else {DEFAULT_MODEL}",
    ),
    "adapter": ("adapter_name_or_path", "LoRA adapter directories (output_dir of a training run), comma-separated"),
    "template": ("template", "a named chat template to use instead of the tokenizer's own"),
    "system": ("default_system", "a system message to start the conversation with"),
    "max-new-tokens": ("max_new_tokens", "longest reply in tokens"),
    "temperature": ("temperature", "0 means greedy"),
    "top-p": ("top_p", "nucleus sampling mass, in (0, 1]"),
    "top-k": ("top_k", "0 turns top-k filtering off"),
    "repetition-penalty": ("repetition_penalty", "1 means none"),
    "infer-dtype": ("infer_dtype", "auto, float16, bfloat16 or float32"),
}
LONG_NAMES = ("model_name_or_path", "adapter_name_or_path")  # LLaMA-Factory's flag spellings of --model, --adapter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_inference_arguments(parser)
    parser.add_argument("--prompt", metavar="TEXT", help="answer this one message, print the reply and exit")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file, key=value overrides and the flags for its keys; `serve` takes the same."""
    parser.add_argument("config", nargs="?", help="inference YAML (LLaMA-Factory's examples/inference files work)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that win over the file, e.g. do_sample=false")
    for flag, (key, help_text) in FLAGS.items():
        spellings = dict.fromkeys(
            [f"--{flag}", f"--{flag.replace('-', '_')}", f"--{key}", f"--{key.replace('_', '-')}"]
        )
        parser.add_argument(*spellings, dest=key, metavar=key.upper(), help=help_text)
    # Switches as LLaMA-Factory's parser takes them: `--do_sample`, `--do_sample false`, `--no_do_sample`.
    for flag, help_text in (
        ("do-sample", "sample (default), or always take the likeliest token (--no-do-sample, --do-sample false)"),
        ("trust-remote-code", "run Python code shipped with the model"),
    ):
        key = flag.replace("-", "_")
        parser.add_argument(f"--{flag}", f"--{key}", dest=key, nargs="?", const=True, metavar="BOOL", help=help_text)
        parser.add_argument(f"--no-{flag}", f"--no_{key}", dest=key, action="store_const", const=False, help="")


def inference_config(args: argparse.Namespace, backends: tuple[str, ...] = ("huggingface",)) -> InferenceConfig:
    """The YAML, then key=value, then the flags that were given; validated before anything loads."""
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    keys = [key for key, _ in FLAGS.values()] + ["do_sample", "trust_remote_code"]
    flags = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    return load_inference_config(config_path, overrides, flags, backends)


def run(args: argparse.Namespace) -> int:
    # Checked before loading, so that a bad key or value fails in a moment rather than after the model loads.
    config = inference_config(args)
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("--prompt is empty; give the message to answer")

    engine = load_chat_engine(
        config.model, config.prompt.template, config.engine.infer_dtype, config.prompt.enable_thinking
    )
    print(describe(engine), file=sys.stderr)
    system = config.prompt.default_system
    if args.prompt is not None:
        messages = [*new_history(system), {"role": "user", "content": args.prompt}]
        for text in engine.stream(messages, config.generation):
            print(text, end="", flush=True)
        print()
        return 0
    print(COMMANDS_HELP, file=sys.stderr)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and arrow-key history for input())
    return chat_loop(engine, config.generation, system)


def describe(engine: ChatEngine) -> str:
    adapters = f" + adapter {', '.join(engine.adapters)}" if engine.adapters else ""
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    return f"tunesmith chat: model {engine.model_name}{adapters} on {engine.device.type} ({dtype})"


def new_history(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system else []


def chat_loop(
    engine: ChatEngine, options: GenerationSection, system: str | None, read_line: Callable[[str], str] = input
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
