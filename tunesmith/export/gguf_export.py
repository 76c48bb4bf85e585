"""GGUF files that llama.cpp, Ollama and transformers read, written from the exported safetensors directory.

Written with the `gguf` library, one tensor at a time: the header and every tensor's type and size are planned from
the shard headers, then each tensor is read, converted and appended, so memory stays near one tensor. What
llama.cpp's `convert_hf_to_gguf.py` does for these families, and why:
- Llama/Mistral (arch `llama`): q_proj and k_proj rows are permuted from Hugging Face's rotate-half layout to the
  interleaved one GGML's RoPE expects; without it the file loads and answers gibberish.
- Qwen2/Qwen3 (arch `qwen2`/`qwen3`) and Gemma: no permutation (llama.cpp applies NeoX-style RoPE for them).
- Gemma/Gemma2/Gemma3: Hugging Face's Gemma RMSNorm multiplies by (1 + weight), llama.cpp's by weight, so every
  `*norm.weight` is written plus one. The output head is always the embedding (llama.cpp scales the embeddings by
  sqrt(hidden) itself, as transformers does). Gemma2 adds its soft-capping and sliding window, Gemma3 its global
  RoPE base.
- 1-D tensors and norms are float32; a row whose length is not a multiple of the type's block falls back to f16.
- A tied output head is not written: llama.cpp reuses token_embd, transformers reads the absence as tied.
- Tokenizers: byte-level BPE (Llama 3, Qwen, SmolLM, Mistral Nemo) is written as `gpt2` with its merges, and
  `tokenizer.ggml.pre` names its pre-tokenizer, found by hashing the tokenization of llama.cpp's probe text.
  SentencePiece-style BPE (Gemma, Llama 2, Mistral 7B: `▁` for spaces, byte fallback) is written as `llama`: pieces,
  scores and token types, pre `default`. Its merge order is carried by the scores (a piece made by merge number n
  scores -n), which is the order llama.cpp's SentencePiece tokenizer merges in.
K-quants (q4_k_m, ...) are made from an f16 file by llama.cpp's `llama-quantize`, which must be on PATH.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tunesmith.config.export import GGUF_K_QUANTS
from tunesmith.errors import ConfigError, ModelError
from tunesmith.export.hf_files import end_of_turn_tokens
from tunesmith.export.safetensors_io import TensorInfo, TensorReader, read_tensor_infos, weight_files


@dataclass(frozen=True)
class Architecture:
    gguf_name: str
    permute_qk: bool  # Hugging Face's rotate-half rows → GGML's interleaved ones (Llama's RoPE)
    norm_plus_one: bool  # Gemma's RMSNorm scales by (1 + weight), llama.cpp's by weight


# Hugging Face model_type → how llama.cpp names and reads it
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", permute_qk=True, norm_plus_one=False),
    "mistral": Architecture("llama", permute_qk=True, norm_plus_one=False),
    "qwen2": Architecture("qwen2", permute_qk=False, norm_plus_one=False),
    "qwen3": Architecture("qwen3", permute_qk=False, norm_plus_one=False),
    "gemma": Architecture("gemma", permute_qk=False, norm_plus_one=True),
    "gemma2": Architecture("gemma2", permute_qk=False, norm_plus_one=True),
    "gemma3_text": Architecture("gemma3", permute_qk=False, norm_plus_one=True),
}
SENTENCEPIECE_SPACE = "\u2581"  # "▁": SentencePiece's spelling of a space
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

# llama.cpp's probe text for naming the pre-tokenizer (convert_hf_to_gguf.py, get_vocab_base_pre), and the names
# of the hashes of its tokenization for the tokenizers of the families above.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple "
    "emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told "
    "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

NORM_SUFFIXES = ("norm.weight",)


@dataclass(frozen=True)
class GgufTensor:
    gguf_name: str
    source: TensorInfo
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None  # rows are permuted for RoPE with this many heads
    plus_one: bool  # a Gemma norm: written as 1 + weight


def gguf_qtype(name: str):
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
        "q5_0": gguf.GGMLQuantizationType.Q5_0,
        "q5_1": gguf.GGMLQuantizationType.Q5_1,
    }[name]


def file_type(name: str):
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    }[name]


def check_gguf_export(types: list[str], model_config: dict[str, Any], tokenizer) -> None:
    """Everything that would stop a GGUF export, checked before any weight is merged."""
    if not types:
        return
    model_type = model_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"`export_gguf`: tunesmith writes GGUF for {', '.join(ARCHITECTURES)} models; this one is {model_type!r}. "
            "Remove export_gguf and convert the exported directory with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = model_config.get("rope_parameters") or model_config.get("rope_scaling") or {}
    # Gemma3 keeps one RoPE setting per attention kind (sliding_attention, full_attention)
    settings = [value for value in rope.values() if isinstance(value, dict)] or [rope]
    rope_types = {setting.get("rope_type", setting.get("type", "default")) for setting in settings} - {None}
    if rope_types - {"default"}:
        raise ConfigError(
            f"`export_gguf`: this model uses {', '.join(sorted(rope_types - {'default'}))} RoPE scaling, which "
            "tunesmith's GGUF writer does not write yet; convert the exported directory with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    if ARCHITECTURES[model_type].gguf_name.startswith("gemma") and model_config.get("tie_word_embeddings") is False:
        raise ConfigError(
            "`export_gguf`: llama.cpp's Gemma reads no separate output head, and this model's is untied; "
            "remove export_gguf"
        )
    check_gguf_tokenizer(tokenizer, model_config["vocab_size"])
    k_quants = [name for name in types if name in GGUF_K_QUANTS]
    if k_quants and shutil.which("llama-quantize") is None:
        raise ConfigError(
            f"`export_gguf`: {', '.join(k_quants)} needs llama.cpp's llama-quantize on PATH (build llama.cpp, "
            "https://github.com/ggml-org/llama.cpp, or install a package that ships it); q8_0, q5_1, q5_0, q4_1 "
            "and q4_0 need nothing else"
        )


def tokenizer_model(tokenizer) -> str:
    """llama.cpp's name for the tokenizer: `gpt2` (byte-level BPE) or `llama` (SentencePiece-style BPE)."""
    model = tokenizer.backend_tokenizer.model if tokenizer.is_fast else None
    kind = type(model).__name__ if model is not None else "slow"
    if kind == "BPE" and "ByteLevel" in str(tokenizer.backend_tokenizer.decoder):
        return "gpt2"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a b", add_special_tokens=False))
    if kind == "BPE" and model.byte_fallback and any(SENTENCEPIECE_SPACE in piece for piece in pieces):
        return "llama"
    raise ModelError(
        "tunesmith writes GGUF for byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, Mistral Nemo) and "
        "SentencePiece-style BPE ones with byte fallback (Gemma, Llama 2, Mistral 7B); this one is neither (a "
        f"{kind} tokenizer); convert the exported directory with llama.cpp's convert_hf_to_gguf.py"
    )


def check_gguf_tokenizer(tokenizer, vocab_size: int) -> tuple[str, str]:
    """The tokenizer can be written for llama.cpp; returns its tokenizer model and pre-tokenizer names."""
    model = tokenizer_model(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}")
    return model, pre_tokenizer_name(tokenizer) if model == "gpt2" else "default"


def pre_tokenizer_name(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise ModelError(
            f"the tokenizer's pre-tokenizer is not one llama.cpp knows by tunesmith's table (probe hash {digest}); "
            "convert the exported directory with llama.cpp's convert_hf_to_gguf.py"
        )
    return name


def write_gguf_files(
    model_dir: Path, model_config: dict[str, Any], tokenizer, types: list[str], name: str, out_dir: Path
) -> list[Path]:
    """Write `<name>-<type>.gguf` into `out_dir` for each type; K-quants go through an f16 file."""
    written = []
    for type_name in types:
        target = out_dir / f"{name}-{type_name}.gguf"
        if type_name in GGUF_K_QUANTS:
            f16 = out_dir / f".{name}-f16-for-{type_name}.gguf"
            write_gguf(model_dir, model_config, tokenizer, "f16", name, f16)
            run_llama_quantize(f16, target, type_name)
            f16.unlink()
        else:
            write_gguf(model_dir, model_config, tokenizer, type_name, name, target)
        print(f"wrote {target.name}: {target.stat().st_size / 1e6:.1f} MB")
        written.append(target)
    return written


def run_llama_quantize(source: Path, target: Path, type_name: str) -> None:
    command = ["llama-quantize", str(source), str(target), type_name.upper()]
    print(f"running {' '.join(command)}")
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0 or not target.is_file():
        last_lines = "\n".join((finished.stderr or finished.stdout).strip().splitlines()[-5:])
        raise ModelError(f"llama-quantize failed making {type_name} (exit status {finished.returncode}):\n{last_lines}")


def plan_tensors(infos: list[TensorInfo], config: dict[str, Any], type_name: str) -> list[GgufTensor]:
    import gguf

    architecture = ARCHITECTURES[config["model_type"]]
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture.gguf_name)
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    qtype = gguf_qtype(type_name)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    planned = []
    for info in infos:
        if architecture.norm_plus_one and info.name == "lm_head.weight":
            raise ModelError(
                "the merged Gemma model has a separate output head (a modules_to_save copy of lm_head); llama.cpp's "
                "Gemma reads none, so no GGUF can be written: remove export_gguf"
            )
        gguf_name = name_map.get_name(info.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor {info.name} of a {config['model_type']} model")
        is_norm = info.name.endswith(NORM_SUFFIXES)
        tensor_type = qtype
        if len(info.shape) == 1 or is_norm:
            tensor_type = gguf.GGMLQuantizationType.F32
        elif info.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
            tensor_type = gguf.GGMLQuantizationType.F16  # as llama.cpp falls back when a row is not whole blocks
        permute_heads = None
        if architecture.permute_qk and ".self_attn.q_proj." in info.name:
            permute_heads = heads
        elif architecture.permute_qk and ".self_attn.k_proj." in info.name:
            permute_heads = kv_heads
        plus_one = architecture.norm_plus_one and is_norm
        planned.append(GgufTensor(gguf_name, info, tensor_type, permute_heads, plus_one))
    return planned


def to_gguf_layout(tensor: torch.Tensor, planned: GgufTensor) -> np.ndarray:
    data = tensor.to(torch.float32)
    if planned.plus_one:
        data = data + 1
    if planned.permute_heads is not None:
        # Hugging Face keeps each head's rotary pairs as two halves; GGML wants them interleaved.
        heads, rows = planned.permute_heads, data.shape[0]
        data = data.reshape(heads, 2, rows // heads // 2, *data.shape[1:])
        data = data.swapaxes(1, 2).reshape(rows, *tensor.shape[1:])
    return data.numpy()


def write_gguf(model_dir: Path, config: dict[str, Any], tokenizer, type_name: str, name: str, target: Path) -> None:
    import gguf

    infos = read_tensor_infos(weight_files(model_dir))
    planned = plan_tensors(infos, config, type_name)
    writer = gguf.GGUFWriter(target, ARCHITECTURES[config["model_type"]].gguf_name)
    add_model_metadata(writer, config, type_name, name)
    add_tokenizer(writer, model_dir, tokenizer, config["vocab_size"])
    for tensor in planned:
        byte_shape = gguf.quant_shape_to_byte_shape(tensor.source.shape, tensor.qtype)
        if tensor.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if tensor.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            nbytes = int(np.prod(tensor.source.shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(tensor.gguf_name, tensor.source.shape, np.dtype(dtype), nbytes)
        else:
            nbytes = int(np.prod(byte_shape))
            writer.add_tensor_info(tensor.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    reader = TensorReader()
    try:
        for tensor in tqdm(planned, desc=f"writing {target.name}", unit="tensor"):
            data = to_gguf_layout(reader.get(tensor.source), tensor)
            writer.write_tensor_data(gguf.quants.quantize(data, tensor.qtype))
    finally:
        reader.close()
        writer.close()


def add_model_metadata(writer, config: dict[str, Any], type_name: str, name: str) -> None:
    import gguf

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma3: the global layers' base, as llama.cpp reads it
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # readers default it (transformers: 128 for qwen3) rather than derive it
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if config.get("attn_logit_softcapping"):  # Gemma2
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):  # Gemma2, some Gemma3
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config["model_type"] in ("gemma2", "gemma3_text") and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    writer.add_file_type(file_type(type_name))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(writer, model_dir: Path, tokenizer, vocab_size: int) -> None:
    """The vocabulary with token types (and merges or scores), special ids, BOS/EOS flags and the chat template."""
    import gguf

    model, pre = check_gguf_tokenizer(tokenizer, vocab_size)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    if model == "gpt2":
        tokens, types = byte_level_vocab(tokenizer, vocab_size)
    else:
        tokens, scores, types = sentencepiece_vocab(tokenizer, vocab_size)
        writer.add_token_scores(scores)
        # llama.cpp puts a space before the text when the tokenizer does (Llama 2), not when it does not (Gemma)
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
        writer.add_add_space_prefix(bool(first) and first[0].startswith(SENTENCEPIECE_SPACE))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=model == "gpt2", n_vocab=vocab_size)
    # Said explicitly: transformers 5 no longer saves add_bos_token, and llama.cpp would otherwise add a BOS that
    # the tokenizer never adds (SmolLM2's BOS is <|im_start|>, which doubled opens every chat).
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer)
    end_of_turn = [token for token in end_of_turn_tokens(tokenizer) if token != tokenizer.eos_token]
    if end_of_turn:  # Gemma's <end_of_turn>: llama.cpp stops there as well as at EOS
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(end_of_turn[0]))


def byte_level_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def sentencepiece_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types as llama.cpp's convert writes them from a SentencePiece model.

    Scores: a piece made by merge number n scores -n, so llama.cpp (which merges the adjacent pair whose joined
    piece scores highest) merges in the order the BPE merges are listed. Pieces no merge makes (characters, bytes)
    are never the result of a merge and score 0. Added tokens score -1000, as llama.cpp's convert gives them.
    """
    import gguf

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merge_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merge_rank.setdefault(left + right, rank)
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added and token_id != tokenizer.unk_token_id:
            special = added[token_id].special
            # llama.cpp matches a user-defined token in the text, which has spaces, not "▁"
            tokens.append(token if special else token.replace(SENTENCEPIECE_SPACE, " "))
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            scores.append(-float(merge_rank[token]) if token in merge_rank else 0.0)
            if token_id == tokenizer.unk_token_id:
                types.append(gguf.TokenType.UNKNOWN)
            elif BYTE_PIECE.match(token):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types
