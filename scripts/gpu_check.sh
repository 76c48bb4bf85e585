#!/usr/bin/env bash
# GPU proof for tunesmith, one table in under 8 minutes on one H100-class GPU (bench/gpu_check.py says what it runs):
#   scripts/gpu_check.sh                        # gpu-marked tests + LoRA/QLoRA/FA2/Liger bench on Qwen2.5-0.5B
#   scripts/gpu_check.sh --model /path/to/model # another ~0.5B-1B model (hub id or folder)
#   scripts/gpu_check.sh --dry-run              # the plan, on any machine
# Refuses to start (exit 2) where CUDA is absent. The table is also written to gpu_check_out/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m bench.gpu_check "$@"
