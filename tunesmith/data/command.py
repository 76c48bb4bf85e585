"""`tunesmith data check | preview | convert`: look at a dataset the way training will see it.

It takes the same config file and `key=value` keys as `tunesmith train` (dataset, dataset_dir, model_name_or_path,
template, cutoff_len, stage, ...), so what it reports is what a run with that config would train on.

- check: every bad row (file, row, field), row counts, a token-length histogram, the share of examples truncated at
  cutoff_len and of examples with no supervised token. Exit 1 if any row is bad. Without `dataset`, every entry of
  dataset_dir/dataset_info.json whose files are present is checked.
- preview: N examples rendered with the trained tokens highlighted; `--json` prints one object per example with
  `input_ids` and `labels` instead.
- convert: rewrite a dataset as alpaca, ShareGPT or OpenAI-messages JSON lines that read back as the same examples
  (preference pairs, KTO labels, tools, media and pre-training text included). Each dataset is read for the stage
  its rows are for. A row the target cannot hold (tool calls in alpaca, text beside tool calls in ShareGPT) is
  reported with its file and row, and then nothing is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.config.load import build_config, read_values
from tunesmith.data.cache import cache_root
from tunesmith.data.dataset import DataStep
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.formats import Example, read_rows
from tunesmith.data.multimodal import ModelMedia
from tunesmith.data.registry import DatasetSpec, load_registry, resolve_datasets
from tunesmith.data.selection import select_rows
from tunesmith.data.stages import MEDIA_COLUMNS, stage_for_run
from tunesmith.data.templates import use_chat_format
from tunesmith.errors import DataError, TunesmithError
from tunesmith.model.load import load_processor, load_tokenizer
from tunesmith.model.resolve import resolve_model

FORMATS = ("alpaca", "sharegpt", "openai")
MAX_ERRORS_SHOWN = 20
GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("check", "preview", "convert"), help="what to do with the data")
    parser.add_argument("config", nargs="?", help="a YAML config (the same as for train), or a first key=value")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. dataset=identity dataset_dir=data")
    parser.add_argument("-n", "--num-examples", type=int, default=3, help="preview: how many examples (default 3)")
    parser.add_argument("--json", action="store_true", help="preview: one JSON object per example (input_ids, labels)")
    parser.add_argument("--to", choices=FORMATS, help="convert: the format to write")
    parser.add_argument("-o", "--output", help="convert: the .jsonl file to write (default: standard output)")


def run(args: argparse.Namespace) -> int:
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:
        config_path, overrides = None, [config_path, *overrides]
    if args.action == "convert" and args.to is None:
        raise TunesmithError("convert needs --to, one of " + ", ".join(FORMATS))
    config, whole_registry = load_data_config(config_path, overrides)
    model_dir = resolve_model(config.model.model_name_or_path, config.model.cache_dir)
    processor = load_processor(model_dir, config.model.trust_remote_code)  # None: a text-only model
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    chat_format = use_chat_format(tokenizer, config.data.template, processor)
    media = ModelMedia.of(config.model, processor)
    root = cache_root(config.model.cache_dir)
    steps: dict[str, DataStep] = {}

    def step_for(spec: DatasetSpec) -> DataStep:
        """A whole registry mixes stages: each entry is read for its own (preference pairs for dpo, ...); so does
        convert, which keeps whatever the rows hold."""
        if args.action == "convert":
            stage = reading_stage(spec)
        else:
            stage = spec.natural_stage if whole_registry else stage_for_run(config.method.stage, reading_stage(spec))
        if stage not in steps:
            steps[stage] = DataStep(config.data, tokenizer, chat_format.jinja, stage, config.train.seed, root, media)
        return steps[stage]

    pairs = [(step_for(spec), spec) for spec in resolve_datasets(config.data.dataset, config.data.dataset_dir)]
    if args.action == "check":
        return check(pairs, config.data.cutoff_len)
    if args.action == "preview":
        return preview(pairs, args.num_examples, args.json)
    return convert(pairs, args.to, args.output)


def load_data_config(config_path: str | None, overrides: list[str]) -> tuple[RunConfig, bool]:
    """The run's config, and whether it means a whole registry: without `dataset`, every entry of dataset_dir
    whose files are present."""
    values = read_values(config_path, overrides)
    if values.get("dataset"):
        return build_config(values), False
    dataset_dir = str(values.get("dataset_dir") or "data")
    present = [name for name, entry in load_registry(Path(dataset_dir)).items() if _files_present(entry, dataset_dir)]
    if not present:
        raise DataError(f"no dataset given, and {dataset_dir}/dataset_info.json lists none whose files are present")
    return build_config(values | {"dataset": ",".join(present)}), True


def _files_present(entry: dict[str, Any], dataset_dir: str) -> bool:
    file_name = entry.get("file_name") if isinstance(entry, dict) else None
    return bool(file_name) and (Path(dataset_dir) / file_name).exists()


# --- check ----------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    name: str
    source: str
    stage: str
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    unsupervised: int = 0


def check(pairs: list[tuple[DataStep, DatasetSpec]], cutoff_len: int) -> int:
    reports = [check_dataset(step, spec) for step, spec in pairs]
    for report in reports:
        print_report(report, cutoff_len)
    bad = sum(len(report.errors) for report in reports)
    print(f"{len(reports)} dataset(s), {sum(r.rows for r in reports)} rows, {bad} bad row(s)")
    return 1 if bad else 0


def check_dataset(step: DataStep, spec: DatasetSpec) -> Report:
    report = Report(spec.name, spec.source, step.stage)
    errors: list[DataError] = []
    reader = step.reader(spec)
    try:
        rows = _counted(selected_rows(step, spec), report)
        for example in reader.examples(rows, errors):
            try:
                encoded_rows = step.encoder.encode(example)
            except DataError as error:
                errors.append(error)
                continue
            for encoded in encoded_rows:
                report.lengths.append(len(encoded.get("input_ids") or encoded["chosen_input_ids"]))
                report.truncated += bool(encoded["truncated"])
                report.unsupervised += encoded["supervised"] == 0
    except DataError as error:  # the file itself is broken (not JSON, empty): nothing after it can be read
        errors.append(error)
    if report.rows == 0 and not errors:
        errors.append(DataError(f"{spec.source}: the dataset has no rows"))
    report.errors = [str(error) for error in errors]
    return report


def selected_rows(step: DataStep, spec: DatasetSpec) -> list:
    """The rows a run would read: the split slice, num_samples and max_samples, as in training."""
    reader = step.reader(spec)
    return select_rows(reader.rows(), spec.split, spec.entry.num_samples, step.data.max_samples, step.seed)


def _counted(rows: Iterator, report: Report) -> Iterator:
    for row in rows:
        report.rows += 1
        yield row


def print_report(report: Report, cutoff_len: int) -> None:
    print(f"== {report.name} ({report.source}, stage {report.stage}): {report.rows} rows, {len(report.errors)} bad")
    for error in report.errors[:MAX_ERRORS_SHOWN]:
        print(f"  bad row: {error}")
    if len(report.errors) > MAX_ERRORS_SHOWN:
        print(f"  ... and {len(report.errors) - MAX_ERRORS_SHOWN} more bad rows")
    if not report.lengths:
        return
    examples = len(report.lengths)
    print(
        f"  {examples} examples; tokens min {min(report.lengths)}, mean {sum(report.lengths) / examples:.0f}, "
        f"max {max(report.lengths)}; truncated at cutoff_len={cutoff_len}: {report.truncated / examples:.1%}; "
        f"no supervised token: {report.unsupervised / examples:.1%}"
    )
    for line in histogram(report.lengths, cutoff_len):
        print("  " + line)


def histogram(lengths: list[int], cutoff_len: int, buckets: int = 8, width: int = 40) -> list[str]:
    """Token lengths in equal-width buckets up to cutoff_len, as text bars."""
    size = max(1, -(-cutoff_len // buckets))
    counts = [0] * buckets
    for length in lengths:
        counts[min(buckets - 1, (length - 1) // size)] += 1
    top = max(counts)
    return [
        f"{index * size + 1:>6}-{min((index + 1) * size, cutoff_len):<6} {'#' * round(width * count / top):<{width}} "
        f"{count}"
        for index, count in enumerate(counts)
    ]


# --- preview --------------------------------------------------------------------------------------------------------


def preview(pairs: list[tuple[DataStep, DatasetSpec]], count: int, as_json: bool) -> int:
    colour = sys.stdout.isatty() and not as_json
    for step, spec in pairs:
        reader = step.reader(spec)
        for example in islice(reader.examples(selected_rows(step, spec)), count):
            for encoded in step.encoder.encode(example):
                ids_key, labels_key = (
                    ("input_ids", "labels") if "input_ids" in encoded else ("chosen_input_ids", "chosen_labels")
                )
                ids, labels = encoded[ids_key], encoded[labels_key]
                if as_json:
                    print(json.dumps({"dataset": spec.name, "row": example.where, "input_ids": ids, "labels": labels}))
                else:
                    trained = sum(label != IGNORE_INDEX for label in labels)
                    print(f"== {example.where} ({len(ids)} tokens, {trained} trained)")
                    print(render_labels(step.tokenizer, ids, labels, colour))
    return 0


REPEATED_TAG = re.compile(r"(<[^<>\s]+>)\1{3,}")  # an image's tokens: <image><image>... (hundreds for Qwen2-VL)


def render_labels(tokenizer, ids: list[int], labels: list[int], colour: bool) -> str:
    """The text, trained tokens in green (or between [[ ]] without a terminal), the rest dimmed; a tag repeated
    four times or more is shown once with its count (`<image>×64`)."""
    pieces = []
    for trained, group in _runs(ids, labels):
        text = REPEATED_TAG.sub(lambda run: f"{run[1]}×{len(run[0]) // len(run[1])}", tokenizer.decode(group))
        if colour:
            pieces.append(f"{GREEN if trained else DIM}{text}{RESET}")
        else:
            pieces.append(f"[[{text}]]" if trained else text)
    return "".join(pieces)


def _runs(ids: list[int], labels: list[int]) -> Iterator[tuple[bool, list[int]]]:
    group: list[int] = []
    current = None
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained != current and group:
            yield bool(current), group
            group = []
        current = trained
        group.append(token)
    if group:
        yield bool(current), group


# --- convert ---------------------------------------------------------------------------------------------------------


def convert(pairs: list[tuple[DataStep, DatasetSpec]], target: str, output: str | None) -> int:
    """Every row rewritten as `target`, or nothing written: a row the format cannot hold (or a bad row) is reported
    with its file and row number, so no part of the data is dropped without a word."""
    errors: list[DataError] = []
    written = sum(1 for _ in converted_rows(pairs, target, errors))  # a first pass finds every refused row
    if errors:
        for error in errors[:MAX_ERRORS_SHOWN]:
            print(f"  cannot convert: {error}")
        if len(errors) > MAX_ERRORS_SHOWN:
            print(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
        print(f"{len(errors)} row(s) cannot be written as {target}; nothing written")
        return 1
    out = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115 (stdout is not closed)
    try:
        for row in converted_rows(pairs, target):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if output:
            out.close()
    print(f"wrote {written} rows as {target}{' to ' + output if output else ''}", file=sys.stderr)
    return 0


def converted_rows(
    pairs: list[tuple[DataStep, DatasetSpec]], target: str, errors: list[DataError] | None = None
) -> Iterator[dict[str, Any]]:
    """The rows as `target`; a bad or refused row raises, or, given an `errors` list, is recorded there."""
    for step, spec in pairs:
        reader = step.reader(spec)
        for example in reader.examples(selected_rows(step, spec), errors):
            try:
                yield to_format(example, target)
            except DataError as error:
                if errors is None:
                    raise
                errors.append(error)


def reading_stage(spec: DatasetSpec) -> str:
    """The stage a dataset's rows are for (preference pairs, KTO labels, text, chat): convert keeps what they hold."""
    if not spec.from_path:
        return spec.natural_stage
    first = next(read_rows(spec.files[0]), None)
    keys = set(first.data) if first else set()
    if {"chosen", "rejected"} <= keys:
        return "dpo"
    if "kto_tag" in keys:
        return "kto"
    if "text" in keys and not keys & {"instruction", "messages", "conversations"}:
        return "pt"
    return "sft"


def to_format(example: Example, target: str) -> dict[str, Any]:
    """One example as a row of `target` that reads back as the same example; what `target` cannot hold is refused."""
    if example.text is not None:
        return {"text": example.text}  # pre-training text has one form in every format
    writers = {"openai": openai_row, "sharegpt": sharegpt_row, "alpaca": alpaca_row}
    row = writers[target](example)
    if example.kto_tag is not None:
        row["kto_tag"] = example.kto_tag
    for media in MEDIA_COLUMNS:
        if getattr(example, media):
            row[media] = getattr(example, media)
    return row


def openai_row(example: Example) -> dict[str, Any]:
    row: dict[str, Any] = {"messages": example.messages}
    if example.tools:
        row["tools"] = example.tools
    if example.chosen is not None:
        row["chosen"], row["rejected"] = example.chosen, example.rejected
    return row


SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "tool": "observation"}


def sharegpt_row(example: Example) -> dict[str, Any]:
    """LLaMA-Factory's ShareGPT: `system` and `tools` (JSON text) columns; each assistant's tool calls are one
    function_call turn (a list when there are several)."""
    row: dict[str, Any] = {}
    turns = []
    for message in example.messages:
        if message["role"] == "system":
            row["system"] = message["content"]
        else:
            turns.append(sharegpt_turn(message, example.where))
    row["conversations"] = turns
    if example.tools:
        row["tools"] = tools_text(example.tools)
    if example.chosen is not None and example.rejected is not None:
        row["chosen"] = sharegpt_turn(example.chosen, f"{example.where}, `chosen`")
        row["rejected"] = sharegpt_turn(example.rejected, f"{example.where}, `rejected`")
    return row


def sharegpt_turn(message: dict[str, Any], where: str) -> dict[str, str]:
    calls = message.get("tool_calls")
    if not calls:
        return {"from": SHAREGPT_ROLES[message["role"]], "value": message["content"]}
    if message["content"]:
        raise DataError(
            f"{where}: an assistant message with both text and tool calls has no ShareGPT form (a function_call turn "
            "holds only the calls); convert to openai"
        )
    written = [
        {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}
        | ({"id": call["id"]} if "id" in call else {})
        for call in calls
    ]
    value = written[0] if len(written) == 1 else written
    return {"from": "function_call", "value": json.dumps(value, ensure_ascii=False)}


def tools_text(tools: list[dict[str, Any]]) -> str:
    """Tool definitions as LLaMA-Factory's ShareGPT and alpaca rows hold them: JSON text of the functions."""
    return json.dumps([tool["function"] for tool in tools], ensure_ascii=False)


def alpaca_row(example: Example) -> dict[str, Any]:
    """system, history pairs, then the last user turn as instruction and the last answer as output (or the
    preference pair's `chosen` and `rejected`)."""
    where, messages = example.where, example.messages
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    answers = [answer for answer in (example.chosen, example.rejected) if answer is not None]
    if any(m["role"] not in ("user", "assistant") or m.get("tool_calls") for m in [*turns, *answers]):
        raise DataError(f"{where}: tool calls and tool results have no alpaca form; convert to sharegpt or openai")
    last = len(turns) - (1 if answers else 2)  # the last user turn
    if last < 0 or turns[last]["role"] != "user" or not turns[last]["content"]:
        raise DataError(f"{where}: alpaca needs a non-empty last user message (its `instruction`); convert to openai")
    row: dict[str, Any] = {"instruction": turns[last]["content"], "input": ""}
    if answers:
        row["chosen"], row["rejected"] = (answer["content"] for answer in answers)
    else:
        row["output"] = turns[-1]["content"]
    if not all(row.get(key, True) for key in ("output", "chosen", "rejected")):
        raise DataError(f"{where}: alpaca cannot hold an empty answer; convert to sharegpt or openai")
    if system:
        row["system"] = system
    if last:
        row["history"] = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, last, 2)]
    if example.tools:
        row["tools"] = tools_text(example.tools)
    return row
