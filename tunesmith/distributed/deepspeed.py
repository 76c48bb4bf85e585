"""DeepSpeed ZeRO through Transformers' Trainer: the shipped JSON configs, and the checks a config file must pass.

Trainer fills every "auto" value from the training arguments (batch sizes, accumulation, learning rate, clipping,
precision). On CPU, DeepSpeed runs over gloo without oneCCL. Two traps are checked here: DeepSpeed clips gradients
at 1.0 when `gradient_clipping` is absent (so the file must name it, "auto" takes max_grad_norm), and ZeRO-Offload
refuses a torch optimizer (so an offloading file must name its optimizer).
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
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
    offloads = any(zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))
    if offloads and "optimizer" not in config:
        raise ValueError(f'{path} offloads to CPU but names no "optimizer": ZeRO-Offload needs its own optimizer')
    return str(path)
