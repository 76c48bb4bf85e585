"""CPU allocator and precision candidates, A/B in one command: seconds per step and resident memory.

    python -m bench.allocator [--steps 4] [--variants glibc,mmap1m,trim,...] [--precisions fp32,autocast]
    python -m bench.allocator --layers 8 --repeat 2    # lighter: random weights, SmolLM2's shapes, 8 layers

Each variant runs in its own process, one after the other: SmolLM2-135M-Instruct, LoRA r=8 on every linear
layer, AdamW, tunesmith's chunked loss, batches of 4 rows whose lengths cycle through 512, 300, 420 and 180 tokens
(as dynamic padding makes them). One step warms up, then `--steps` are timed. Printed per variant: wall and CPU
seconds per step (CPU time, user + system, is what to compare on a shared machine: other processes stretch the
wall time, not the work), system seconds and minor page faults per step (the cost of fresh mappings), peak
resident memory (VmHWM), resident memory after the steps, and the CPU-time ratio to the first variant.

Allocator variants (train/allocator.py explains the one tunesmith uses):
- `glibc`: glibc's defaults (its mmap threshold grows up to 32 MiB, freed blocks stay in the arenas);
- `mmap1m`: a fixed 1 MiB mmap threshold (every larger tensor mapped and unmapped; each page faults in zeroed);
- `trim`: glibc's defaults plus `malloc_trim(0)` after every step;
- `big+trim`: a fixed 64 MiB mmap threshold, M_TRIM_THRESHOLD 128 MiB, and `malloc_trim(0)` after every step;
- `jemalloc`, `tcmalloc`: the Debian libraries (libjemalloc2, libtcmalloc-minimal4) through LD_PRELOAD.
Precisions: `fp32`; `autocast` (fp32 weights, bf16 autocast); `bf16base` (frozen base weights in bf16, adapters in
fp32, bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.runs import REPO, converted_model_dir

PRELOADS = {
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}
LENGTHS = (512, 300, 420, 180)

CHILD = r"""
import ctypes, json, resource, sys, time
variant, precision, steps, model_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
libc = ctypes.CDLL("libc.so.6")
if variant == "mmap1m":
    libc.mallopt(-3, 1 << 20)
if variant == "big+trim":
    libc.mallopt(-3, 64 << 20)
    libc.mallopt(-1, 128 << 20)
trim = variant in ("trim", "big+trim")
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from tunesmith.train.loss import chunked_causal_lm_loss

def status(field):
    text = open("/proc/self/status").read()
    return int(text.split(field + ":")[1].split()[0]) / 1024

torch.manual_seed(0)
dtype = torch.bfloat16 if precision == "bf16base" else torch.float32
layers = int(sys.argv[6])
if layers:  # SmolLM2's shapes with fewer layers and random weights: a lighter run of the same tensor sizes
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
lengths = [int(x) for x in sys.argv[5].split(",")]
autocast = precision in ("autocast", "bf16base")

def step(length):
    ids = torch.randint(100, 40000, (4, length))
    labels = ids.clone()
    labels[:, : length // 3] = -100
    mask = torch.ones_like(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = chunked_causal_lm_loss(model, {"input_ids": ids, "labels": labels, "attention_mask": mask})
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if trim:
        libc.malloc_trim(0)
    return float(loss)

def usage():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), u.ru_utime + u.ru_stime, u.ru_stime, u.ru_minflt

step(lengths[0])
start = usage()
losses = [step(lengths[(i + 1) % len(lengths)]) for i in range(steps)]
end = usage()
wall, cpu, system, faults = ((b - a) / steps for a, b in zip(start, end))
print(json.dumps({"s_per_step": wall, "cpu_s_per_step": cpu, "sys_s_per_step": system, "faults_per_step": faults,
                  "peak_mib": status("VmHWM"), "rss_after_mib": status("VmRSS"), "loss": losses[-1]}))
"""


def run_variant(variant: str, precision: str, steps: int, model_dir: str, layers: int) -> dict:
    env = dict(os.environ)
    if variant in PRELOADS:
        env["LD_PRELOAD"] = PRELOADS[variant]
    lengths = ",".join(str(n) for n in LENGTHS)
    command = [sys.executable, "-c", CHILD, variant, precision, str(steps), model_dir, lengths, str(layers)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default="glibc,mmap1m,trim,big+trim,jemalloc,tcmalloc")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--layers", type=int, default=0, help="N > 0: random weights, SmolLM2's shapes, N layers")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole list N times (interleaved)")
    args = parser.parse_args()
    model_dir = str(converted_model_dir())
    variants = [v for v in args.variants.split(",") if v not in PRELOADS or os.path.exists(PRELOADS[v])]
    cases = [(v, p) for p in args.precisions.split(",") for v in variants]
    results: dict[tuple[str, str], list[dict]] = {case: [] for case in cases}
    for _ in range(args.repeat):
        for case in cases:
            results[case].append(run_variant(*case, args.steps, model_dir, args.layers))
            print(case, results[case][-1], f"load {os.getloadavg()[0]:.2f}", flush=True)
    first = None
    print(
        f"\n{'allocator':<10}{'precision':<10}{'s/step':>8}{'cpu s':>7}{'sys s':>7}{'faults':>9}{'peak MiB':>10}"
        f"{'after MiB':>10}{'loss':>8}{'x cpu s':>8}"
    )
    for (variant, precision), runs in results.items():
        best = {key: min(r[key] for r in runs) for key in runs[0]}
        first = first or best["cpu_s_per_step"]
        print(
            f"{variant:<10}{precision:<10}{best['s_per_step']:>8.2f}{best['cpu_s_per_step']:>7.2f}"
            f"{best['sys_s_per_step']:>7.2f}{best['faults_per_step']:>9.0f}{best['peak_mib']:>10.0f}"
            f"{best['rss_after_mib']:>10.0f}{runs[-1]['loss']:>8.4f}{best['cpu_s_per_step'] / first:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
