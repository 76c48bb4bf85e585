"""Pre-training (`stage: pt`): sft's recipe on plain text.

Only the data differ: each text (a `text` column, `.txt` lines, `columns: {prompt: ...}` in the registry) is
tokenized as it is, ends with EOS and is cut into cutoff_len pieces, every token a label (data/stages.py). Packing is
on unless `packing: false` or streaming (config/sections.py): the pieces fill cutoff_len rows without seeing each
other (data/packing.py). Model, method, Trainer with the chunked loss, callbacks and saving are sft's, unchanged.
"""

from __future__ import annotations

from tunesmith.config import RunConfig
from tunesmith.train.sft import TrainResult, run_sft


def run_pt(config: RunConfig) -> TrainResult:
    if config.method.stage != "pt":
        raise ValueError(f"run_pt runs stage pt, not {config.method.stage}")  # a dispatch bug, not a user's mistake
    if config.data.streaming and not config.data.packs:
        print("note: stage pt packs by default, but a streamed dataset cannot be packed: each batch is padded")
    return run_sft(config)
