"""GGUF sizes by type, and answers from llama.cpp next to transformers', for SmolLM2 and a tiny Gemma.

    python bench/export_gguf.py [--work DIR]   (run under `flock /tmp/heavy.lock`; needs node-llama-cpp, see
                                                tests/e2e/test_identity.py, which installs it once)

1. Exports SmolLM2-135M-Instruct with every GGUF type the gguf library writes and prints each file's size.
2. Asks the same prompts to the exported directory through transformers (greedy, float32) and to the f16, q8_0 and
   q4_0 files through real llama.cpp (node-llama-cpp, the GGUF's own chat template), and prints the answers.
3. Writes a tiny random Gemma2 and Gemma3 with a SentencePiece-style vocabulary to GGUF f32 and compares llama.cpp's
   tokenization and greedy tokens with transformers': real llama.cpp reading tunesmith's Gemma metadata.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TYPES = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 12 plus 7?",
    "Name three colors.",
]
MAX_TOKENS = 30
GEMMA_TEXTS = ["who are you?", "the user asks", "i am tunesmith, a model", "answers and", "the model", "a? who"]


def node_dir() -> Path:
    from tests.e2e.test_identity import node_llama_cpp_dir

    directory = node_llama_cpp_dir()
    shutil.copy(REPO / "bench" / "llama_cpp_tokens.mjs", directory / "llama_cpp_tokens.mjs")
    return directory


def export(overrides: list[str]) -> None:
    from tunesmith.config.export import load_export_config
    from tunesmith.export.pipeline import export_model

    export_model(load_export_config(None, overrides))


def smollm2(work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.model.resolve import resolve_model

    out = work / "smollm2"
    model_dir = resolve_model("smollm2-135m-instruct")
    export([f"model_name_or_path={model_dir}", f"export_dir={out}", f"export_gguf={','.join(TYPES)}"])
    print("\n== SmolLM2-135M-Instruct GGUF sizes")
    print(f"{'safetensors (bf16)':20s} {sum(p.stat().st_size for p in out.glob('*.safetensors')) / 1e6:8.1f} MB")
    for type_name in TYPES:
        print(f"{type_name:20s} {(out / f'smollm2-{type_name}.gguf').stat().st_size / 1e6:8.1f} MB")

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    answers: dict[str, list[str]] = {"transformers (merged dir, float32)": []}
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        generated = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        reply = generated[0, ids["input_ids"].shape[1] :]
        answers["transformers (merged dir, float32)"].append(tokenizer.decode(reply, skip_special_tokens=True))
    system = (out / "Modelfile").read_text().split('SYSTEM """', 1)[1].split('"""', 1)[0]
    directory = node_dir()
    for type_name in ("f16", "q8_0", "q4_0"):
        command = ["node", "llama_cpp_chat.mjs", str(out / f"smollm2-{type_name}.gguf"), str(MAX_TOKENS), system]
        done = subprocess.run([*command, *PROMPTS], cwd=directory, capture_output=True, text=True, check=True)
        answers[f"llama.cpp ({type_name})"] = json.loads(done.stdout.strip().splitlines()[-1])["answers"]
    print(f"\n== answers, greedy, {MAX_TOKENS} tokens at most")
    for index, prompt in enumerate(PROMPTS):
        print(f"\nprompt: {prompt}")
        for source, replies in answers.items():
            print(f"  {source:36s} {replies[index].strip()!r}")


def tiny_gemma(work: Path, model_type: str) -> bool:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tests.unit.test_export import sentencepiece_style_tokenizer

    base = work / f"{model_type}-base"
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_style_tokenizer(base))
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,  # = head_dim: the scaling llama.cpp uses for Gemma models of this kind
        max_position_embeddings=512,
        initializer_range=1.0,  # large random weights, so the next token depends on the text
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # small embeddings: else each token's own embedding decides the next, whatever the layers do
        model.model.embed_tokens.weight.mul_(0.02)
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(base)
    out = work / model_type
    export([f"model_name_or_path={base}", f"export_dir={out}", "export_gguf=f32", "infer_dtype=float32"])
    done = subprocess.run(
        ["node", "llama_cpp_tokens.mjs", str(out / f"{model_type}-f32.gguf"), "4", *GEMMA_TEXTS],
        cwd=node_dir(),
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"\n== tiny random {model_type}, SentencePiece-style vocabulary, GGUF f32 in llama.cpp")
    if done.returncode != 0:
        print(f"llama.cpp failed:\n{done.stderr[-2000:]}")
        return False
    same_prompts = same_tokens = 0
    for text, from_llama_cpp in zip(GEMMA_TEXTS, json.loads(done.stdout.strip().splitlines()[-1]), strict=True):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        from_transformers = generated[0, ids.shape[1] :].tolist()
        same_prompts += from_llama_cpp["prompt"] == ids[0].tolist()
        same_tokens += from_llama_cpp["generated"] == from_transformers
        print(f"{text!r}: llama.cpp {from_llama_cpp['generated']}, transformers {from_transformers}")
    print(f"same prompt ids {same_prompts}/{len(GEMMA_TEXTS)}; same greedy ids {same_tokens}/{len(GEMMA_TEXTS)}")
    return same_prompts == same_tokens == len(GEMMA_TEXTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--only", choices=["smollm2", "gemma"])
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="export-gguf-bench-"))
    ok = True
    try:
        if args.only in (None, "gemma"):
            for model_type in ("gemma2", "gemma3_text"):
                ok = tiny_gemma(work, model_type) and ok
        if args.only in (None, "smollm2"):
            smollm2(work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
