"""Where tunesmith keeps what it builds once and reuses: converted models (model/) and tokenized data (data/).

Below both layers, so that neither imports the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir` from the config, else $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    root = cache_dir or os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith"
    return Path(root).expanduser()
