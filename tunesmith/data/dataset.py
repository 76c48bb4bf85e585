"""The data step of a run: named datasets → tokenized train (and eval) sets for a training stage.

For each dataset: resolve it (registry.py) → read its rows (files.py, or the Hugging Face hub) → select them (split
slice, `num_samples`, `max_samples`; selection.py) → convert them (formats.py) → encode them for the stage
(stages.py; the masking is encode.py's), cached on disk (cache.py). Then the datasets are mixed (`mix_strategy`),
and eval rows are held out (`val_size`) or read from `eval_dataset`.

The training order is the Trainer's: it shuffles the train set every epoch with the run's seed. With
`streaming: true` nothing is read ahead: rows are read, converted and encoded while training consumes them
(a `datasets.IterableDataset`, shuffled here in a buffer of `buffer_size` rows). There is no cache then, the
train set has no length (so the config requires `max_steps`), and the eval rows (`val_size`, a count) are the first
rows of the datasets in `dataset` order, taken out before mixing and shuffling so that they never reach training.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Any

from tunesmith.config.sections import DataSection
from tunesmith.data.cache import (
    META_FILE,
    cache_root,
    code_digest,
    digest_of,
    entry_path,
    file_digest,
    load_entry,
    save_entry,
    tokenizer_digest,
)
from tunesmith.data.files import Row, read_rows
from tunesmith.data.formats import (
    Example,
    RowFormat,
    check_column_map,
    detect_format,
    fill_example_placeholders,
    row_to_example,
)
from tunesmith.data.multimodal import ModelMedia
from tunesmith.data.registry import DatasetSpec, resolve_datasets
from tunesmith.data.selection import Split, mix, select_rows, split_validation, stream_rows
from tunesmith.data.stages import (
    BOOKKEEPING,
    PAIRWISE_STAGES,
    STAGES,
    Encoder,
    EncodeSettings,
    features,
    reads_text,
    tool_support,
)
from tunesmith.errors import ConfigError, DataError, NotSupportedYet


@dataclass
class TokenizedData:
    """The tokenized train set (a `datasets.Dataset`, or an `IterableDataset` when streaming), the eval set, counts."""

    train: Any
    eval: Any | None
    stage: str
    rows: int | None = None  # rows read; None when streaming (nothing is read ahead)
    truncated: int | None = None
    dropped: int | None = None

    @property
    def train_rows(self) -> int | None:
        """Examples in the train set; None when streaming."""
        return None if self.rows is None else len(self.train)

    def summary(self) -> str:
        if self.rows is None:
            held_out = f"; {len(self.eval)} eval examples held out" if hasattr(self.eval, "__len__") else ""
            return f"data ({self.stage}): streaming; rows are read and tokenized while training{held_out}"
        eval_rows = len(self.eval) if self.eval is not None else 0
        return (
            f"data ({self.stage}): {self.rows} rows → {len(self.train)} train + {eval_rows} eval examples; "
            f"{self.truncated} truncated at cutoff_len, {self.dropped} dropped with no supervised token"
        )


def load_data(
    data: DataSection,
    tokenizer,
    chat_template: str,
    *,
    stage: str = "sft",
    seed: int = 42,
    cache_dir: str | None = None,
    media: ModelMedia | None = None,
) -> TokenizedData:
    """The datasets of `data`, tokenized for `stage` with this tokenizer and Jinja chat template; `media`: what the
    model takes besides text (default: nothing)."""
    if stage not in STAGES:
        raise NotSupportedYet(f"stage {stage!r} has no data step yet; the data step knows {', '.join(STAGES)}")
    if data.tokenized_path and Path(data.tokenized_path).exists():
        return _load_tokenized(Path(data.tokenized_path), stage)
    step = DataStep(data, tokenizer, chat_template, stage, seed, cache_root(cache_dir), media)
    train_specs = resolve_datasets(data.dataset, data.dataset_dir)
    eval_specs = resolve_datasets(data.eval_dataset, data.dataset_dir) if data.eval_dataset else []
    if data.column_map and not any(spec.from_path for spec in [*train_specs, *eval_specs]):
        raise ConfigError(
            "`column_map` renames the columns of datasets given by path; registry entries name their columns in "
            "dataset_info.json (`columns`)"
        )
    if data.streaming:
        return step.stream(train_specs, eval_specs)

    parts = [step.tokenized(spec) for spec in train_specs]
    train = mix([part.dataset for part in parts], data.mix_strategy, data.interleave_probs, seed)
    if eval_specs:
        evaluation = mix([step.tokenized(spec).dataset for spec in eval_specs], "concat", None, seed)
    else:
        train, evaluation = split_validation(train, data.val_size, seed)
    result = TokenizedData(
        train,
        evaluation,
        stage,
        rows=sum(part.rows for part in parts),
        truncated=sum(part.truncated for part in parts),
        dropped=sum(part.dropped for part in parts),
    )
    if data.tokenized_path:
        _save_tokenized(result, Path(data.tokenized_path))
    return result


def load_sft_data(data: DataSection, tokenizer, chat_template: str, seed: int, **options: Any) -> TokenizedData:
    """`load_data` for supervised fine-tuning (`options`: cache_dir, media)."""
    return load_data(data, tokenizer, chat_template, stage="sft", seed=seed, **options)


@dataclass
class _Part:
    dataset: Any
    rows: int
    truncated: int
    dropped: int


class DataStep:
    """What every dataset of a run is read and encoded with."""

    def __init__(
        self,
        data: DataSection,
        tokenizer,
        chat_template: str,
        stage: str,
        seed: int,
        root: Path,
        media: ModelMedia | None = None,
    ) -> None:
        check_column_map(data.column_map)
        self.data = data
        self.stage = stage
        self.seed = seed
        self.root = root
        self.chat_template = chat_template
        self.tokenizer = tokenizer
        self.placeholders = {"name": data.name, "author": data.author}
        renders_calls, renders_tools = (True, True) if reads_text(stage) else tool_support(tokenizer, chat_template)
        self.settings = EncodeSettings(
            stage=stage,
            cutoff_len=data.cutoff_len,
            train_on_prompt=data.train_on_prompt,
            mask_history=data.mask_history,
            calls_in_content=not renders_calls,
            tools_in_system=not renders_tools,
        )
        self.encoder = Encoder(tokenizer, chat_template, self.settings, media)

    @cached_property
    def tokenizer_digest(self) -> str:
        return tokenizer_digest(self.tokenizer)

    def reader(self, spec: DatasetSpec) -> RowReader:
        column_map = self.data.column_map if spec.from_path else None
        return RowReader(spec, self.stage, column_map, self.placeholders, self.data.default_system)

    # --- in memory, cached --------------------------------------------------------------------------------------

    def tokenized(self, spec: DatasetSpec) -> _Part:
        """One dataset encoded, from the cache when it holds the same data encoded the same way."""
        from datasets import Dataset

        hub = None if spec.files else load_hub(spec, streaming=False)
        parts = self.key_parts(spec, hub)
        path = entry_path(self.root, spec.name, digest_of(parts))
        if not self.data.overwrite_cache and (cached := load_entry(path)):
            dataset, meta = cached
            print(f"using cached tokenized data: {path}")
            return _Part(dataset, meta["rows"], meta["truncated"], meta["dropped"])

        reader = self.reader(spec)
        split = spec.split if spec.files else Split(spec.split.name)  # the hub applied the slice itself
        rows = select_rows(reader.rows(hub), split, spec.entry.num_samples, self.data.max_samples, self.seed)
        if not rows:
            raise DataError(f"dataset {spec.name!r} ({spec.source}): split {spec.entry.split!r} selects no rows")
        examples = list(reader.examples(rows))
        self._note_tool_fallbacks(examples)
        dataset = Dataset.from_dict({"example": [example.to_json() for example in examples]})
        dataset = dataset.map(
            self.encoder,
            batched=True,
            remove_columns=["example"],
            features=features(self.stage),
            num_proc=worker_count(self.data.preprocessing_num_workers, len(examples)),
            desc=f"Tokenizing {spec.name}",
        )
        part = self._drop_unsupervised(dataset, spec, len(examples))
        meta = {
            "name": spec.name,
            "source": spec.source,
            "stage": self.stage,
            "rows": part.rows,
            "truncated": part.truncated,
            "dropped": part.dropped,
            "examples": len(part.dataset),
            "built_from": parts,
        }
        if save_entry(part.dataset, meta, path, replace=self.data.overwrite_cache) and (saved := load_entry(path)):
            part.dataset = saved[0]  # memory-mapped from the cache instead of held in memory
        return part

    def key_parts(self, spec: DatasetSpec, hub) -> dict[str, Any]:
        """Everything that decides the encoded rows of one dataset; its hash names the cache entry."""
        entry = spec.entry
        if spec.files:
            source: Any = [[path.suffix.lower(), file_digest(path)] for path in spec.files]
        else:
            source = {"hub": entry.hf_hub_url, "subset": entry.subset, "folder": entry.folder, "split": entry.split}
            source["fingerprint"] = getattr(hub, "_fingerprint", None)
        return {
            "code": code_digest(),
            "source": source,
            "entry": entry.model_dump(exclude={"file_name"}),
            "from_path": spec.from_path,
            "column_map": self.data.column_map if spec.from_path else None,
            "media_dirs": [str(folder.resolve()) for folder in spec.media_dirs],
            "max_samples": self.data.max_samples,
            "seed": self.seed if entry.num_samples else None,
            "placeholders": self.placeholders,
            "default_system": self.data.default_system,
            "encode": asdict(self.settings),
            "tokenizer": self.tokenizer_digest,
            "chat_template": digest_of(self.chat_template),
            "media": self.encoder.media.cache_key(),
        }

    def _drop_unsupervised(self, dataset, spec: DatasetSpec, rows: int) -> _Part:
        supervised = dataset["supervised"]
        truncated = sum(dataset["truncated"])
        empty = sum(1 for count in supervised if count == 0)
        if empty * 2 > len(dataset):
            raise DataError(
                f"dataset {spec.name!r}: {empty} of {len(dataset)} examples have no supervised token: their prompts "
                f"fill cutoff_len={self.data.cutoff_len} before the answer starts. Raise cutoff_len, or shorten the "
                "prompts."
            )
        if empty:
            dataset = dataset.select([index for index, count in enumerate(supervised) if count > 0])
        return _Part(dataset.remove_columns(list(BOOKKEEPING)), rows, truncated, empty)

    def _note_tool_fallbacks(self, examples: list[Example]) -> None:
        settings = self.settings
        if settings.calls_in_content and any(m.get("tool_calls") for e in examples for m in e.messages):
            print("note: the chat template ignores `tool_calls`; tool calls are written into the answers as JSON")
        if settings.tools_in_system and any(example.tools for example in examples):
            print("note: the chat template ignores `tools`; tool definitions are written into the system message")

    # --- streamed -----------------------------------------------------------------------------------------------

    def stream(self, train_specs: list[DatasetSpec], eval_specs: list[DatasetSpec]) -> TokenizedData:
        from datasets import Dataset

        data = self.data
        sources = [self.streamed(spec) for spec in train_specs]
        evaluation = None
        if eval_specs:
            evaluation = mix([self.streamed(spec) for spec in eval_specs], "concat", None, self.seed)
        elif data.val_size:
            sources, held_out = hold_out(sources, int(data.val_size))
            evaluation = Dataset.from_list(held_out, features=features(self.stage, bookkeeping=False))
        train = mix(sources, data.mix_strategy, data.interleave_probs, self.seed)
        train = train.shuffle(seed=self.seed, buffer_size=data.buffer_size)
        return TokenizedData(train, evaluation, self.stage)

    def streamed(self, spec: DatasetSpec):
        """One dataset as a stream of encoded rows; its first row is read and encoded now, to fail fast."""
        from datasets import Features, IterableDataset, Value

        reader = self.reader(spec)
        # A stream cannot be upsampled: num_samples only limits it, like max_samples.
        limit = min(filter(None, [spec.entry.num_samples, self.data.max_samples]), default=None)
        first = next(stream_examples(reader, 1), None)
        if first is None:
            raise DataError(f"dataset {spec.name!r} ({spec.source}): split {spec.entry.split!r} selects no rows")
        self.encoder({"example": [first["example"]]})
        dataset = IterableDataset.from_generator(
            stream_examples,
            features=Features({"example": Value("string")}),
            gen_kwargs={"reader": reader, "limit": limit},
        )
        dataset = dataset.map(
            self.encoder, batched=True, batch_size=64, remove_columns=["example"], features=features(self.stage)
        )
        return dataset.filter(_has_supervised_tokens).remove_columns(list(BOOKKEEPING))


def hold_out(sources: list, count: int) -> tuple[list, list[dict[str, Any]]]:
    """The first `count` rows of the streamed datasets, in `dataset` order, and the streams without them.

    Taken from each dataset before mixing, so that no interleaving or shuffle can bring them back into training.
    """
    held: list[dict[str, Any]] = []
    kept = []
    for source in sources:
        rows = list(source.take(count - len(held))) if len(held) < count else []
        held += rows
        kept.append(source.skip(len(rows)) if rows else source)
    if len(held) < count:
        raise DataError(f"val_size={count} leaves no training rows: the datasets hold {len(held)} rows")
    return kept, held


def _has_supervised_tokens(row: dict[str, Any]) -> bool:
    return row["supervised"] > 0


def stream_examples(reader: RowReader, limit: int | None) -> Iterator[dict[str, str]]:
    """The examples of one dataset as `{"example": JSON}` rows, read lazily (the generator of a streamed dataset)."""
    spec = reader.spec
    rows = stream_rows(reader.rows(streaming=True), spec.split, limit, f"dataset {spec.name!r}")
    for example in reader.examples(rows):
        yield {"example": example.to_json()}


@dataclass(frozen=True)
class RowReader:
    """One dataset's rows → examples for a stage: `column_map`, the format (detected for a path), stage checks."""

    spec: DatasetSpec
    stage: str
    column_map: dict[str, str] | None
    placeholders: dict[str, str | None]
    default_system: str | None = None  # the system message of every chat example that has none

    def rows(self, hub=None, streaming: bool = False) -> Iterator[Row]:
        if self.spec.files:
            rows: Iterator[Row] = chain.from_iterable(read_rows(path) for path in self.spec.files)
        else:
            source = hub if hub is not None else load_hub(self.spec, streaming)
            rows = (Row(data, self.spec.source, number) for number, data in enumerate(source, start=1))
        return rename_columns(rows, self.column_map) if self.column_map else rows

    def examples(self, rows: Iterable[Row], errors: list[DataError] | None = None) -> Iterator[Example]:
        """The rows as examples; a bad row raises, or, given an `errors` list, is recorded there and skipped."""
        kind = "text" if reads_text(self.stage) else "chat"
        fmt: RowFormat | None = None
        for row in rows:
            if fmt is None:  # a dataset-level problem (unknown format, wrong stage): always raised
                fmt = self.row_format(row, kind)
            try:
                example = row_to_example(row, fmt, kind)
                self._check(example, row, fmt)
                if kind == "chat":
                    example = self.with_default_system(fill_example_placeholders(example, self.placeholders))
                yield example
            except DataError as error:
                if errors is None:
                    raise
                errors.append(error)

    def with_default_system(self, example: Example) -> Example:
        if self.default_system and not (example.messages and example.messages[0]["role"] == "system"):
            example.messages = [{"role": "system", "content": self.default_system}, *example.messages]
        return example

    def row_format(self, first_row: Row, kind: str) -> RowFormat:
        spec, stage = self.spec, self.stage
        if spec.from_path:
            fmt = replace(detect_format(first_row, kind), media_dirs=spec.media_dirs)
        else:
            fmt = spec.row_format()
        about = f"dataset {spec.name!r} ({spec.source})"
        if stage in PAIRWISE_STAGES and not fmt.ranking:
            raise DataError(
                f"{about} has no preference pairs, which stage {stage} needs: `ranking: true` in its dataset_info.json "
                "entry, and `chosen` and `rejected` columns"
            )
        if stage not in PAIRWISE_STAGES and fmt.ranking:
            raise DataError(
                f"{about} holds preference pairs (chosen/rejected); it is for stages {', '.join(PAIRWISE_STAGES)}, "
                f"not {stage}"
            )
        if kind == "text" and fmt.formatting == "sharegpt":
            raise DataError(
                f"{about} holds conversations; pre-training reads plain text (a `text` column, .txt lines, or "
                "`columns: {prompt: ...}`)"
            )
        return fmt

    def _check(self, example: Example, row: Row, fmt: RowFormat) -> None:
        column = fmt.columns.kto_tag
        if self.stage == "kto" and example.kto_tag is None:
            raise DataError(
                f"{row.where(column)}: missing; stage kto needs a true/false label in every row "
                "(name its column with `columns: {kto_tag: ...}`)"
            )
        if self.stage != "kto" and example.kto_tag is not None:
            raise DataError(
                f"{row.where(column)}: a KTO label; rows with labels are for `stage: kto`, not {self.stage}"
            )


def rename_columns(rows: Iterable[Row], column_map: dict[str, str]) -> Iterator[Row]:
    """`column_map` (our name → the file's name) applied to each row; the file's first row must have those columns."""
    checked: set[str] = set()
    sources = set(column_map.values())
    for row in rows:
        if row.file not in checked:
            checked.add(row.file)
            for ours, theirs in column_map.items():
                if theirs not in row.data:
                    raise DataError(
                        f"{row.where(theirs)}: no such column, but column_map maps `{ours}` to it; the file's columns "
                        f"are {', '.join(map(str, row.data))}"
                    )
        data = {key: value for key, value in row.data.items() if key not in sources}
        data |= {ours: row.data.get(theirs) for ours, theirs in column_map.items()}
        yield Row(data, row.file, row.number)


def load_hub(spec: DatasetSpec, streaming: bool):
    """A registry entry's `hf_hub_url` via `datasets.load_dataset` (which applies the split slice, unless streamed)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError
    from huggingface_hub.errors import EntryNotFoundError

    entry = spec.entry
    split = spec.split.name if streaming else entry.split
    try:
        return load_dataset(entry.hf_hub_url, entry.subset, data_dir=entry.folder, split=split, streaming=streaming)
    except ConnectionError as error:
        raise DataError(
            f"dataset {spec.name!r}: cannot download {entry.hf_hub_url} from the Hugging Face hub: no network "
            f"connection ({error}). Download it where there is one, save it as a file in dataset_dir and set the "
            "entry's `file_name`"
        ) from None
    except (OSError, ValueError, DatasetsError, EntryNotFoundError) as error:
        # a missing or gated repository, a missing file (OSError); a wrong subset or split name (ValueError)
        raise DataError(
            f"dataset {spec.name!r}: loading {entry.hf_hub_url} from the Hugging Face hub failed "
            f"({type(error).__name__}: {error})"
        ) from None


def _save_tokenized(data: TokenizedData, path: Path) -> None:
    from datasets import DatasetDict

    splits = {"train": data.train} | ({"eval": data.eval} if data.eval is not None else {})
    meta = {"stage": data.stage, "rows": data.rows, "truncated": data.truncated, "dropped": data.dropped}
    if save_entry(DatasetDict(splits), meta, path, replace=True):
        print(f"tokenized data saved to {path}; later runs with this tokenized_path load it instead")


def _load_tokenized(path: Path, stage: str) -> TokenizedData:
    if not (path / META_FILE).is_file():
        raise DataError(
            f"tokenized_path {path} exists but holds no data saved by tunesmith ({META_FILE} is missing); "
            "choose a new path, where the tokenized data will be saved"
        )
    loaded = load_entry(path)
    if loaded is None:
        raise DataError(f"tokenized_path {path}: cannot be read; delete the folder to tokenize again")
    splits, meta = loaded
    if meta.get("stage") != stage:
        raise DataError(f"tokenized_path {path} holds data for stage {meta.get('stage')}, not {stage}")
    print(f"using tokenized data from tokenized_path {path}; the other data keys are ignored (delete it to rebuild)")
    return TokenizedData(splits["train"], splits.get("eval"), stage, meta["rows"], meta["truncated"], meta["dropped"])


def worker_count(requested: int | None, rows: int) -> int | None:
    """Tokenizing processes: copied configs ask for 16; more processes than cores only adds start-up time."""
    count = min(requested or 1, os.cpu_count() or 1, max(1, rows // 100))
    return count if count > 1 else None
