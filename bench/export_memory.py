"""Peak memory and time of `tunesmith export` (streaming merge) against peft's merge_and_unload + save_pretrained.

    python bench/export_memory.py [--size-gb 2.2] [--work DIR] [--keep]   (run under `flock /tmp/heavy.lock`)

Generates a random-weight Llama of at least 2 GB in bfloat16 (sharded, as hub models are) and a random LoRA adapter
on every linear layer, then runs, each in its own process: tunesmith's export, and the in-memory merge. Prints each
one's wall time and peak resident memory (VmHWM) next to the model's size, checks the streaming peak is at most
half the model, and compares the two results tensor by tensor. Also runs both on SmolLM2-135M-Instruct with a
random rank-16 LoRA adapter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def generate(target: Path, size_gb: float) -> None:
    """A Llama config sized to `size_gb` in bfloat16, written shard by shard, plus a rank-16 adapter."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from tunesmith.export.safetensors_io import PlannedTensor, shard_writer
    from tunesmith.model.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    hidden, ffn, vocab = 2048, 5632, len(tokenizer)
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer + 0.5))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="bfloat16",
    )
    base = target / "base"
    base.mkdir(parents=True)
    config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    shapes["model.norm.weight"] = (hidden,)
    linear = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }
    for layer in range(layers):
        for module, shape in linear.items():
            shapes[f"model.layers.{layer}.{module}.weight"] = shape
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (hidden,)
    # Base shards of ~400 MB, as hub checkpoints are sharded (5 GB shards of 70B models, here scaled down).
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        if shards[-1] and used + size > 400e6:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for index, names in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        planned = [PlannedTensor(name, shapes[name], torch.bfloat16) for name in names]
        with shard_writer(base / file_name, planned) as writer:
            for name in names:
                scale = 1.0 if name.endswith("norm.weight") else 0.02
                writer.write(name, (torch.randn(shapes[name], generator=generator) * scale).to(torch.bfloat16))
                weight_map[name] = file_name
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_adapter(target / "adapter", base)


def write_adapter(adapter: Path, base: Path, seed: int = 1) -> None:
    """A random rank-16 LoRA adapter on every linear layer of the decoder layers of the model in `base`."""
    import torch
    from safetensors.torch import save_file

    from tunesmith.export.safetensors_io import read_tensor_infos, weight_files

    generator = torch.Generator().manual_seed(seed)
    adapter.mkdir(parents=True)
    rank = 16
    tensors, targets = {}, set()
    for info in read_tensor_infos(weight_files(base)):
        if ".layers." not in info.name or not info.name.endswith("_proj.weight"):
            continue
        rows, columns = info.shape
        prefix = f"base_model.model.{info.name.removesuffix('.weight')}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, columns, generator=generator) * 0.02
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * 0.02
        targets.add(info.name.removesuffix(".weight").rsplit(".", 1)[-1])
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 32,
        "target_modules": sorted(targets),
        "base_model_name_or_path": str(base),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))


def run_tunesmith(base: Path, adapter: Path, out: Path, shard: str) -> None:
    from tunesmith.config.export import load_export_config
    from tunesmith.export.pipeline import export_model

    overrides = [f"model_name_or_path={base}", f"export_dir={out}", f"export_size={shard}", "infer_dtype=bfloat16"]
    if adapter.is_dir():
        overrides.append(f"adapter_name_or_path={adapter}")
    export_model(load_export_config(None, overrides))


def run_peft(base: Path, adapter: Path, out: Path, shard: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Loaded in its own dtype, merged, then cast, as tunesmith writes it: merging into weights already cast to
    # bfloat16 would round twice (a float32 base then differs by hundreds of bfloat16 steps in 17% of its values).
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    if adapter.is_dir():
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=shard)


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor, one at a time: the largest difference, in units of the bfloat16 spacing of the value."""
    import torch

    from tunesmith.export.safetensors_io import TensorReader, read_tensor_infos, weight_files

    mine = {info.name: info for info in read_tensor_infos(weight_files(ours))}
    other = {info.name: info for info in read_tensor_infos(weight_files(theirs))}
    if set(mine) != set(other):
        return {
            "same_names": False,
            "only_ours": sorted(set(mine) - set(other)),
            "only_peft": sorted(set(other) - set(mine)),
        }
    reader_a, reader_b = TensorReader(), TensorReader()
    worst_abs, worst_ulps, differing, total = 0.0, 0.0, 0, 0
    for name in sorted(mine, key=lambda n: (str(mine[n].file), n)):
        a, b = reader_a.get(mine[name]).float(), reader_b.get(other[name]).float()
        diff = (a - b).abs()
        spacing = torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
        worst_abs = max(worst_abs, diff.max().item())
        worst_ulps = max(worst_ulps, (diff / spacing).max().item())
        differing += int((diff > 0).sum())
        total += diff.numel()
    reader_a.close()
    reader_b.close()
    return {
        "same_names": True,
        "max_abs_diff": worst_abs,
        "max_diff_in_bf16_ulps": worst_ulps,
        "fraction_differing": differing / total,
    }


def child(role: str, work: Path, base: Path, adapter: Path, shard: str) -> None:
    started = time.perf_counter()
    {"tunesmith": run_tunesmith, "peft": run_peft}[role](base, adapter, work / f"out-{role}", shard)
    result = {"seconds": time.perf_counter() - started, "peak_rss": peak_rss_bytes()}
    (work / f"{role}.json").write_text(json.dumps(result))


def measure(role: str, work: Path, base: Path, adapter: Path, shard: str) -> dict:
    shutil.rmtree(work / f"out-{role}", ignore_errors=True)
    command = [
        sys.executable,
        __file__,
        "--child",
        role,
        "--work",
        str(work),
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--shard",
        shard,
    ]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads((work / f"{role}.json").read_text())


def model_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def bench(name: str, work: Path, base: Path, adapter: Path, shard: str, check_half: bool) -> bool:
    size = model_bytes(base)
    ours = measure("tunesmith", work, base, adapter, shard)
    theirs = measure("peft", work, base, adapter, shard)
    comparison = compare(work / "out-tunesmith", work / "out-peft")
    dtype = json.loads((base / "config.json").read_text()).get("dtype")
    print(f"\n== {name}: {size / 1e9:.2f} GB of {dtype} weights, written as bfloat16 in shards of {shard}")
    for role, result in (("tunesmith export (streaming)", ours), ("peft merge_and_unload + save", theirs)):
        print(
            f"{role:32s} {result['seconds']:7.1f} s   peak RSS {result['peak_rss'] / 1e9:6.2f} GB "
            f"({result['peak_rss'] / size:.2f}x the model)"
        )
    print(f"result vs peft: {comparison}")
    ok = comparison.get("same_names", False) and comparison["max_diff_in_bf16_ulps"] <= 2.0
    if check_half:
        ok = ok and ours["peak_rss"] <= 0.5 * size
        print(f"streaming peak ≤ 0.5x model: {ours['peak_rss'] <= 0.5 * size}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.2)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--base", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--shard", default="300MB")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.base, args.adapter, args.shard)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="export-bench-"))
    try:
        if not (work / "base").is_dir():
            print(f"generating a {args.size_gb} GB random-weight Llama in {work} ...", flush=True)
            generate(work, args.size_gb)
        ok = bench(
            "generated Llama + rank-16 LoRA on every linear layer",
            work,
            work / "base",
            work / "adapter",
            "300MB",
            check_half=True,
        )
        from tunesmith.model.resolve import resolve_model

        smollm = Path(resolve_model("smollm2-135m-instruct"))
        if not (work / "smollm2-adapter").is_dir():
            write_adapter(work / "smollm2-adapter", smollm)
        ok = (
            bench(
                "SmolLM2-135M-Instruct + rank-16 LoRA on every linear layer",
                work,
                smollm,
                work / "smollm2-adapter",
                "100MB",
                check_half=False,
            )
            and ok
        )
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
