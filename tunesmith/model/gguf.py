"""GGUF files → a cached, ordinary safetensors model directory.

transformers de-quantizes a GGUF file on every load (about 20 s for SmolLM2-135M on 2 cores) and refuses to
`save_pretrained` the result because its config says `quant_method: gguf`. We convert once: load, copy the
weights into a fresh model built from the same config without the quantization entry, save, and reuse.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

from tunesmith.errors import ModelError


def convert_gguf(gguf_file: Path, target_dir: Path) -> Path:
    """Write `target_dir` (model.safetensors, config, tokenizer with its chat template) from `gguf_file`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target_dir / "config.json").is_file():
        return target_dir
    print(f"Converting {gguf_file.name} to safetensors in {target_dir} (once; later loads reuse it) ...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # A missing file (OSError), a damaged one (ValueError: bad magic, arrays that do not fit; struct.error: cut
    # short inside the header) or an architecture transformers cannot read from GGUF (ValueError).
    except (OSError, ValueError, struct.error) as error:
        raise ModelError(f"cannot read GGUF file {gguf_file}: {error}") from error

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    # Write into a sibling temporary folder and rename, so that parallel processes never see half a model.
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target_dir.name + ".", dir=target_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target_dir)
        except OSError:  # another process finished first
            if not (target_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target_dir
