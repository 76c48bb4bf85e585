"""What every benchmark driver shares: run one measured step in a subprocess, note the machine's load around it,
and find the converted default model. The drivers import no torch, so their own size never reaches a child's peak.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_ALIAS = "smollm2-135m-instruct"

# 1-minute load average before and after each run. One run alone keeps it near the CPU count (torch uses every
# core); well above that, another process was competing and the timings are noisy.
LOADS: dict[str, tuple[float, float]] = {}


def run_logged(name: str, command: list[str]) -> None:
    """Run `command` from the repository root, printing it with the load average and recording the load after."""
    before = os.getloadavg()[0]
    print(f"\n[{name}] $ {' '.join(command)}  (load average {before:.2f})", flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    LOADS[name] = (before, os.getloadavg()[0])


def describe_loads() -> str:
    loads = ", ".join(f"{name} {before:.1f} → {after:.1f}" for name, (before, after) in LOADS.items())
    return f"load average before → after each run on {os.cpu_count()} CPUs: {loads}"


def converted_model_dir() -> Path:
    """The default model's cached safetensors directory (converted from its GGUF on first use)."""
    code = f"from tunesmith.model.resolve import resolve_model; print(resolve_model({MODEL_ALIAS!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return Path(result.stdout.strip().splitlines()[-1])
