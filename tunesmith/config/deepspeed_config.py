"""The `deepspeed` key: a shipped ZeRO config (`ds_z2`, in tunesmith/config/deepspeed/) or a JSON path, checked
while the config loads for the traps that would make a run silently differ: DeepSpeed clips gradients at 1.0 when
`gradient_clipping` is absent (so the file must name it, "auto" takes max_grad_norm), ZeRO-Offload refuses a torch
optimizer (so an offloading file must name its optimizer), and ZeRO-3 saves empty weights unless it gathers them at
save time (`stage3_gather_16bit_weights_on_model_save`). What DeepSpeed does inside a run is
`tunesmith.distributed.deepspeed`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "deepspeed"
SHIPPED = sorted(path.stem for path in CONFIG_DIR.glob("ds_*.json"))


def resolve_deepspeed_config(value: str) -> str:
    """A shipped config name (`ds_z2`) or a path → the path of a checked JSON file; ValueError says what is wrong."""
    path = CONFIG_DIR / f"{Path(value).stem}.json" if value.removesuffix(".json") in SHIPPED else Path(value)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {value!r} not found; give a JSON path or one of {', '.join(SHIPPED)}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {error}") from error
    if "gradient_clipping" not in config:
        raise ValueError(
            f'{path} has no "gradient_clipping": DeepSpeed would clip at 1.0 whatever max_grad_norm says; '
            'add "gradient_clipping": "auto"'
        )
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        # Otherwise each process holds a slice of every weight at save time: the saved model or adapter is empty.
        raise ValueError(
            f'{path} is ZeRO-3 without "stage3_gather_16bit_weights_on_model_save": true, so the saved weights '
            "would be empty; add it to zero_optimization"
        )
    offloads = any(zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))
    if offloads and "optimizer" not in config:
        raise ValueError(f'{path} offloads to CPU but names no "optimizer": ZeRO-Offload needs its own optimizer')
    return str(path)
