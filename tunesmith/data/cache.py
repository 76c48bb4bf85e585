"""Tokenized datasets cached on disk, so that a second run on the same data skips tokenizing.

An entry is a `datasets.Dataset.save_to_disk` folder plus `tunesmith_cache.json` (the counts for the summary and
the settings it was built with, for people). Its name holds a hash of everything that shapes the ids: the data
files' contents, the registry entry, the selection, the stage and encoding settings, the tokenizer (its vocabulary,
merges and special tokens), the chat template and the source of the modules that read and encode rows.

Two processes may build the same entry at once: each writes to its own temporary folder and renames it into place
(atomic on one file system); the second rename fails and that process keeps the first one's entry, which holds the
same data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from tunesmith.paths import cache_root as tunesmith_cache

META_FILE = "tunesmith_cache.json"
# bump when an entry's layout or the encoding changes (2: answers tokenized apart, data specials; 3: data specials
# stay text and answers are tokenized apart with SentencePiece tokenizers too)
CACHE_FORMAT = 3


def cache_root(cache_dir: str | None) -> Path:
    """`datasets/` in tunesmith's cache folder (`tunesmith.paths`), next to the converted models."""
    return tunesmith_cache(cache_dir) / "datasets"


def entry_path(root: Path, name: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "dataset"
    return root / f"{slug}-{key[:20]}"


def digest_of(value: Any) -> str:
    """A stable hash of a JSON-able value (keys sorted; paths and other objects by their text)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's vocabulary, merges, normalizer and special tokens: what decides the ids of a text."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    settings = {
        "class": type(tokenizer).__name__,
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def code_digest() -> str:
    """The source of the modules that turn rows into ids: a change to them must not reuse old entries."""
    from tunesmith.data import encode, files, formats, multimodal, stages

    digest = hashlib.sha256(str(CACHE_FORMAT).encode())
    for module in (files, formats, stages, encode, multimodal):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def load_entry(path: Path):
    """The cached dataset (or DatasetDict) and its metadata, or None if there is no complete entry."""
    from datasets import load_from_disk
    from pyarrow import ArrowException

    meta_path = path / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return load_from_disk(str(path)), meta
    # A damaged entry is rebuilt, never trusted: a file gone (OSError), cut short or garbled (ArrowInvalid, a
    # ValueError; JSONDecodeError, also one).
    except (OSError, ValueError, ArrowException) as error:
        print(f"note: ignoring the unreadable cache entry {path} ({type(error).__name__}: {error})")
        return None


@contextlib.contextmanager
def _quiet_progress():
    """No "Saving the dataset" bars: the cache is written after the tokenizing bar, which is the one that matters."""
    from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    was_enabled = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()


def save_entry(dataset, meta: dict[str, Any], path: Path, replace: bool) -> bool:
    """Write `dataset` with its metadata to `path` through a temporary folder and a rename.

    With `replace` an existing entry is moved aside first (overwrite_cache). Returns False if the entry could not
    be written (a read-only cache is not an error: the run goes on with the data in memory).
    """
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary = path.parent / f".{path.name}.{token}.tmp"
    old = path.parent / f".{path.name}.{token}.old"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_progress():
            dataset.save_to_disk(str(temporary))
        (temporary / META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        if replace:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, old)
        try:
            os.rename(temporary, path)
        except OSError:
            if not (path / META_FILE).is_file():
                raise
            # another process finished the same entry first; its data is the same
        return True
    except OSError as error:
        print(f"note: could not write the tokenized-data cache {path} ({error}); continuing without it")
        return False
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
