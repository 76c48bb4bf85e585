"""Predict: generate a reply for every row of a test file, write them beside the references, and score them.

The rows are read as training reads them (data/registry.py, data/formats.py); a row's last assistant message is its
label, the messages before it the prompt, and a row without an answer (the Tang test file) is predicted and left
unscored. Generation is batched: prompts are sorted by length (so a batch wastes little on padding), left-padded,
generated with the KV cache, and each row is cut at its first end-of-turn token.

Progress is appended to `generated_predictions.partial.jsonl` after every batch (in generation order, each line
with its row index), so a crash loses at most one batch and a rerun resumes from it. When every row is done,
`generated_predictions.jsonl` is written in input order as LLaMA-Factory writes it (`prompt`, `predict`, `label`),
then `predict_results.json` (BLEU-4 / ROUGE as LLaMA-Factory computes them, evaluate/metrics.py, plus exact match
and speed) and `predictions.md`, a table to read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from tunesmith.chat.engine import ChatEngine, Message, load_chat_engine
from tunesmith.config.inference import GenerationSection
from tunesmith.config.predict import PredictConfig, PredictSection
from tunesmith.data.dataset import RowReader
from tunesmith.data.formats import fill_example_placeholders, row_to_example
from tunesmith.data.registry import resolve_datasets
from tunesmith.data.selection import held_out_rows, select_rows
from tunesmith.errors import DataError, OutputDirError
from tunesmith.evaluate.metrics import METRIC_NAMES, exact_match, mean_similarity, require_metric_libraries

IGNORE_INDEX = -100  # a label that is not trained (the prompt's tokens)
PREDICTIONS_FILE = "generated_predictions.jsonl"
PARTIAL_FILE = "generated_predictions.partial.jsonl"
RESULTS_FILE = "predict_results.json"
TABLE_FILE = "predictions.md"


@dataclass
class PromptRow:
    messages: list[Message]  # the conversation up to the reply to generate
    label: str | None  # the reference reply; None when the row has none


def run_predict(config: PredictConfig) -> dict[str, Any]:
    """Predict every row, resuming from output_dir; returns the results written to predict_results.json."""
    require_metric_libraries()
    settings, inference = config.predict, config.inference
    output = Path(settings.output_dir)
    rows = read_prompt_rows(settings)
    engine = load_chat_engine(
        inference.model, inference.prompt.template, inference.engine.infer_dtype, inference.prompt.enable_thinking
    )
    system = inference.prompt.default_system
    prompts = [encode_prompt(engine, with_system(row.messages, system), settings.cutoff_len) for row in rows]

    rank, world = process_share()
    partial = output / (PARTIAL_FILE if rank == 0 else PARTIAL_FILE.replace(".jsonl", f".rank{rank}.jsonl"))
    done: dict[int, dict[str, Any]] = {}
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        if settings.overwrite_output_dir:
            remove_partials(output)
        done = read_partials(output, len(rows))
        if done:
            print(f"predict: resuming, {len(done)} of {len(rows)} rows already in {output}")
        # rewritten whole into rank 0's file, so that a line cut short by the crash does not run into the lines
        # appended next, and a resume with another number of processes finds every row once
        remove_partials(output)
        write_jsonl(partial, [{"index": index, **record} for index, record in done.items()])
    done_rows = set(shared_from_rank_0(sorted(done)))
    todo = [index for index in range(len(rows)) if index not in done_rows]
    # longest first, dealt out in turn: every process gets prompts of every length
    share = sorted(todo, key=lambda index: len(prompts[index]), reverse=True)[rank::world]

    torch.manual_seed(settings.seed + rank)
    counted = len(done_rows) if world == 1 else 0
    started = time.perf_counter()
    with partial.open("a", encoding="utf-8") as sink:
        for indices, replies in generate_batches(
            engine, prompts, share, settings.per_device_eval_batch_size, inference.generation
        ):
            for index, reply in zip(indices, replies, strict=True):
                record = {
                    "prompt": engine.tokenizer.decode(prompts[index]),
                    "predict": reply,
                    "label": rows[index].label,
                }
                sink.write(json.dumps({"index": index, **record}, ensure_ascii=False) + "\n")
            sink.flush()
            counted += len(indices)
            print(f"predict: {counted}/{len(rows) if world == 1 else len(share)} rows")
    generated = gathered(len(share))
    seconds = time.perf_counter() - started
    if rank != 0:
        return {}
    if world > 1:
        print(f"predict: {world} processes generated {', '.join(map(str, generated))} rows")

    done = read_partials(output, len(rows))
    records = [done[index] for index in range(len(rows))]
    write_jsonl(output / PREDICTIONS_FILE, records)
    results = score(records)
    results.update(
        predict_samples=len(records),
        predict_generated_samples=len(todo),
        predict_runtime=round(seconds, 4),
        predict_samples_per_second=round(len(todo) / seconds, 4) if todo and seconds > 0 else None,
    )
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (output / TABLE_FILE).write_text(markdown_table(records), encoding="utf-8")
    remove_partials(output)
    return results


def process_share() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) unless launched by torchrun and joined."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shared_from_rank_0(values: list[int]) -> list[int]:
    """Rank 0's list, on every process (what resuming found already done)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return values
    box = [values]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(count: int) -> list[int]:
    """Every process's count, in rank order; also the barrier after which rank 0 reads every partial file."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [count]
    counts: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    return counts


def partial_files(output: Path) -> list[Path]:
    """Rank 0's partial file and those of other processes (`generated_predictions.partial.rankN.jsonl`)."""
    return sorted(output.glob(PARTIAL_FILE.replace(".jsonl", "*.jsonl")))


def remove_partials(output: Path) -> None:
    for path in partial_files(output):
        path.unlink()


def read_partials(output: Path, total: int) -> dict[int, dict[str, Any]]:
    """Rows finished so far by every process, from all partial files."""
    done: dict[int, dict[str, Any]] = {}
    for path in partial_files(output):
        done.update(read_partial(path, total))
    return done


@dataclass(frozen=True)
class EvalSplitScorer:
    """BLEU-4 / ROUGE of replies generated for the eval split during training (`predict_with_generate` with val_size
    or eval_dataset): the train recipe calls it at each evaluation, and the scores join the eval loss in metrics.jsonl.

    Each tokenized eval row is cut where its last supervised stretch starts: the ids before are the prompt (exactly
    what inference sees, data/encode.py), the stretch up to its end-of-turn token is the label. Every process
    generates every row in the same order, so processes that shard the model (FSDP, ZeRO-3) stay in step. Sampling
    draws from its own seeded generator state, so an evaluation leaves training's random numbers as they were.
    """

    options: GenerationSection
    batch_size: int
    seed: int

    def __call__(self, model: Any, tokenizer: Any, rows: Any) -> dict[str, float]:
        engine = ChatEngine(model, tokenizer, model_name="the model being trained")
        stop_ids = engine.stop_token_ids()
        prompts, labels = [], []
        for row in rows:
            prompt, label = split_supervised_row(row["input_ids"], row["labels"])
            prompts.append(prompt)
            labels.append(tokenizer.decode(until_stop(label, stop_ids), skip_special_tokens=True))
        replies: dict[int, str] = {}
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for indices, texts in generate_batches(
                engine, prompts, list(range(len(prompts))), self.batch_size, self.options
            ):
                replies.update(zip(indices, texts, strict=True))
        model.train(was_training)
        means = mean_similarity((replies[index], label) for index, label in enumerate(labels))
        exact = [exact_match(replies[index], label) for index, label in enumerate(labels)]
        return {**means, "exact_match": round(sum(exact) / len(exact), 4)} if exact else {}


def split_supervised_row(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, label ids) of a tokenized row: the prompt ends where the last supervised stretch starts."""
    supervised = [position for position, label in enumerate(labels) if label != IGNORE_INDEX]
    if not supervised:
        return list(input_ids), []
    start = supervised[-1]
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start : supervised[-1] + 1])


def read_prompt_rows(settings: PredictSection) -> list[PromptRow]:
    """Every dataset's rows (its split slice, `num_samples`, then `max_samples`) as prompts with optional labels."""
    rows: list[PromptRow] = []
    for spec in resolve_datasets(settings.datasets, settings.dataset_dir):
        column_map = settings.column_map if spec.from_path else None
        reader = RowReader(spec, "sft", column_map, {"name": settings.name, "author": settings.author})
        source = iter(reader.rows())
        first = next(source, None)
        if first is None:
            raise DataError(f"dataset {spec.name!r} ({spec.source}) has no rows")
        fmt = replace(reader.row_format(first, "chat"), answer_optional=True)
        selected = select_rows(
            chain([first], source), spec.split, spec.entry.num_samples, settings.max_samples, settings.seed
        )
        for raw in selected:
            messages = fill_example_placeholders(row_to_example(raw, fmt, "chat"), reader.placeholders).messages
            label = None
            if messages[-1]["role"] == "assistant":
                label, messages = messages[-1]["content"], messages[:-1]
            rows.append(PromptRow(messages, label))
    if settings.val_size:  # the eval split of a training run on the same rows, seed and val_size
        rows = [rows[index] for index in held_out_rows(len(rows), settings.val_size, settings.seed)]
    return rows


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def encode_prompt(engine: ChatEngine, messages: list[Message], cutoff_len: int) -> list[int]:
    """The prompt's token ids (ending with the assistant header); a long one keeps its last cutoff_len tokens."""
    ids = engine.tokenizer(engine.render(messages), add_special_tokens=False)["input_ids"]
    return ids[-cutoff_len:]


def generate_batches(
    engine: ChatEngine, prompts: list[list[int]], todo: list[int], batch_size: int, options: GenerationSection
) -> Iterator[tuple[list[int], list[str]]]:
    """(row indices, replies) per batch; rows longest first, so a batch holds prompts of similar length."""
    order = sorted(todo, key=lambda index: len(prompts[index]), reverse=True)
    stop_ids = engine.stop_token_ids()
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else stop_ids[0]
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        input_ids, attention_mask = left_padded([prompts[index] for index in indices], pad_id)
        with torch.inference_mode():
            output = engine.model.generate(
                input_ids=input_ids.to(engine.device),
                attention_mask=attention_mask.to(engine.device),
                **options.generate_kwargs(),
                eos_token_id=stop_ids,
                pad_token_id=pad_id,
                use_cache=True,
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        replies = [
            engine.tokenizer.decode(until_stop(tokens, stop_ids), skip_special_tokens=options.skip_special_tokens)
            for tokens in new_tokens
        ]
        yield indices, replies


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded on the left, so every row's next token comes right after its prompt."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids, attention_mask


def until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """The generated tokens before the first end-of-turn token (after it, a finished row holds only padding)."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:position]
    return tokens


def read_partial(path: Path, total: int) -> dict[int, dict[str, Any]]:
    """Rows finished by an earlier, interrupted run; a last line cut short by the crash is dropped."""
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the line being written when the run stopped
                break
            raise OutputDirError(
                f"{path} line {number} is not JSON; remove the file (or set overwrite_output_dir: true) to start over"
            ) from None
        index = record.pop("index")
        if not 0 <= index < total:
            raise OutputDirError(
                f"{path} holds row {index}, but the data has {total} rows: it belongs to another dataset; remove it "
                "or set overwrite_output_dir: true"
            )
        done[index] = record
    return done


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    temporary.replace(path)


def score(records: list[dict[str, Any]]) -> dict[str, Any]:
    """LLaMA-Factory's predict_* scores over the rows that have a label, plus exact match."""
    labelled = [(record["predict"], record["label"]) for record in records if record["label"] is not None]
    results: dict[str, Any] = {"predict_scored_samples": len(labelled)}
    if not labelled:
        print("predict: no row has a label, so nothing is scored")
        return results
    means = mean_similarity(labelled)
    results.update({f"predict_{name}": means[name] for name in METRIC_NAMES})  # unrounded, as LLaMA-Factory
    matches = [exact_match(prediction, label) for prediction, label in labelled]
    results["predict_exact_match"] = round(sum(matches) / len(matches), 4)
    return results


def markdown_table(records: list[dict[str, Any]]) -> str:
    lines = ["| # | prompt | label | prediction |", "|---|---|---|---|"]
    for number, record in enumerate(records, start=1):
        cells = [record["prompt"], record["label"] if record["label"] is not None else "", record["predict"]]
        lines.append(f"| {number} | " + " | ".join(_cell(text) for text in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
