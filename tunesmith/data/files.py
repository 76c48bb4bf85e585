"""Data files → rows: `.json`, `.jsonl`, `.csv`, `.parquet` and `.txt`, read lazily; each row knows its origin.

A row is a plain mapping of column names to values. `.txt` files give one row per non-empty line, in a `text`
column (pre-training text). CSV cells are strings; the converters in `formats.py` read JSON held in a cell where a
list or an object is expected (ShareGPT `conversations`, `tools`, `history`). Every error names the file and the
row (the line, for line-based files) and says what a valid file looks like.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
VALID_FILE = (
    "a .json list of objects, a .jsonl file with one object per line, a .csv or .parquet table with a header, "
    "or a .txt file of plain text lines"
)


@dataclass(frozen=True)
class Row:
    """One raw row and where it came from, so that every error can point at it."""

    data: Mapping[str, Any]
    file: str
    number: int  # 1-based: the line of a .jsonl/.txt file, the position in a .json list or a table

    def where(self, field_name: str | None = None) -> str:
        field_part = f", field `{field_name}`" if field_name else ""
        return f"{self.file} row {self.number}{field_part}"


def read_rows(path: Path) -> Iterator[Row]:
    """The rows of one data file, read lazily; a file that holds no row at all is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUPPORTED_SUFFIXES)}")
    count = 0
    for row in reader(path):
        count += 1
        yield row
    if count == 0:
        raise DataError(f"{path}: the file is empty (no rows); expected {VALID_FILE}")


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path} line {number}: invalid JSON ({error.msg} at column {error.colno}); "
                    "a .jsonl file holds one JSON object per line"
                ) from None
            if not isinstance(data, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, found {type(data).__name__}")
            yield Row(data, str(path), number)


def _read_json(path: Path) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        if error.lineno > 1 and text.lstrip().startswith("{"):  # JSON lines saved with a .json name
            yield from _read_jsonl(path)
            return
        raise DataError(
            f"{path} line {error.lineno}: invalid JSON ({error.msg} at column {error.colno}); "
            "a .json dataset is a list of objects, [{...}, {...}]"
        ) from None
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a list of objects, found {type(content).__name__}")
    for number, data in enumerate(content, start=1):
        if not isinstance(data, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, found {type(data).__name__}")
        yield Row(data, str(path), number)


def _read_csv(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for number, data in enumerate(reader, start=1):
            if None in data:  # more cells than header names
                raise DataError(
                    f"{path} row {number}: {len(data[None])} more cell(s) than the header has columns; "
                    "quote cells that contain commas"
                )
            yield Row(data, str(path), number)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq
    from pyarrow import ArrowException

    try:
        table = pq.ParquetFile(path)
    except (ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            number += 1
            yield Row(data, str(path), number)


def _read_txt(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield Row({"text": text}, str(path), number)


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}


def data_files(path: Path) -> list[Path]:
    """A data file, or the data files of a folder (sorted; one type only, as the rows must have one shape)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise DataError(f"folder {path} holds no data file; expected {', '.join(SUPPORTED_SUFFIXES)} files")
    kinds = {p.suffix.lower() for p in files}
    if len(kinds) > 1:
        raise DataError(f"folder {path} mixes file types ({', '.join(sorted(kinds))}); keep one type per dataset")
    return files
