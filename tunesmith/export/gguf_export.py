"""GGUF files that llama.cpp, Ollama and transformers read, written from the exported safetensors directory.

Written with the `gguf` library, one tensor at a time: the header and every tensor's type and size are planned from
the shard headers, then each tensor is read, converted and appended, so memory stays near one tensor. What
llama.cpp's `convert_hf_to_gguf.py` does for these families, and why:
- Llama/Mistral (arch `llama`): q_proj and k_proj rows are permuted from Hugging Face's rotate-half layout to the
  interleaved one GGML's RoPE expects; without it the file loads and answers gibberish.
- Qwen2/Qwen3 (arch `qwen2`/`qwen3`): no permutation (llama.cpp applies NeoX-style RoPE for them).
- 1-D tensors and norms are float32; a row whose length is not a multiple of the type's block falls back to f16.
- A tied output head is not written: llama.cpp reuses token_embd, transformers reads the absence as tied.
- `tokenizer.ggml.pre` names the pre-tokenizer: found by hashing the tokenization of llama.cpp's probe text.
K-quants (q4_k_m, ...) are made from an f16 file by llama.cpp's `llama-quantize`, which must be on PATH.
"""

from __future__ import annotations

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
from tunesmith.export.safetensors_io import TensorInfo, TensorReader, read_tensor_infos, weight_files

# Hugging Face model_type → (GGUF architecture, permute Q/K rows)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}

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
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(
            f"`export_gguf`: this model uses {rope_type} RoPE scaling, which tunesmith's GGUF writer does not "
            "write yet; convert the exported directory with llama.cpp's convert_hf_to_gguf.py"
        )
    check_gguf_tokenizer(tokenizer, model_config["vocab_size"])
    k_quants = [name for name in types if name in GGUF_K_QUANTS]
    if k_quants and shutil.which("llama-quantize") is None:
        raise ConfigError(
            f"`export_gguf`: {', '.join(k_quants)} needs llama.cpp's llama-quantize on PATH (build llama.cpp, "
            "https://github.com/ggml-org/llama.cpp, or install a package that ships it); q8_0, q5_1, q5_0, q4_1 "
            "and q4_0 need nothing else"
        )


def check_gguf_tokenizer(tokenizer, vocab_size: int) -> str:
    """The tokenizer can be written as llama.cpp's byte-level BPE (`gpt2`); returns its pre-tokenizer name."""
    backend = tokenizer.backend_tokenizer if tokenizer.is_fast else None
    byte_level = backend is not None and "ByteLevel" in str(backend.decoder)
    if backend is None or backend.model.__class__.__name__ != "BPE" or not byte_level:
        raise ModelError(
            "tunesmith writes GGUF for byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, Mistral Nemo), not "
            "SentencePiece ones (Llama 2, Mistral 7B v0.1-0.3, Gemma); convert this model with "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    if len(tokenizer) > vocab_size:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}")
    return pre_tokenizer_name(tokenizer)


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
            subprocess.run(["llama-quantize", str(f16), str(target), type_name.upper()], check=True)
            f16.unlink()
        else:
            write_gguf(model_dir, model_config, tokenizer, type_name, name, target)
        print(f"wrote {target.name}: {target.stat().st_size / 1e6:.1f} MB")
        written.append(target)
    return written


def plan_tensors(infos: list[TensorInfo], config: dict[str, Any], type_name: str) -> list[GgufTensor]:
    import gguf

    arch_name, permute = ARCHITECTURES[config["model_type"]]
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch_name)
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    qtype = gguf_qtype(type_name)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    planned = []
    for info in infos:
        gguf_name = name_map.get_name(info.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor {info.name} of a {config['model_type']} model")
        tensor_type = qtype
        if len(info.shape) == 1 or info.name.endswith(NORM_SUFFIXES):
            tensor_type = gguf.GGMLQuantizationType.F32
        elif info.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
            tensor_type = gguf.GGMLQuantizationType.F16  # as llama.cpp falls back when a row is not whole blocks
        permute_heads = None
        if permute and ".self_attn.q_proj." in info.name:
            permute_heads = heads
        elif permute and ".self_attn.k_proj." in info.name:
            permute_heads = kv_heads
        planned.append(GgufTensor(gguf_name, info, tensor_type, permute_heads))
    return planned


def to_gguf_layout(tensor: torch.Tensor, permute_heads: int | None) -> np.ndarray:
    data = tensor.to(torch.float32)
    if permute_heads is not None:
        # Hugging Face keeps each head's rotary pairs as two halves; GGML wants them interleaved.
        rows = data.shape[0]
        data = data.reshape(permute_heads, 2, rows // permute_heads // 2, *data.shape[1:])
        data = data.swapaxes(1, 2).reshape(rows, *tensor.shape[1:])
    return data.numpy()


def write_gguf(model_dir: Path, config: dict[str, Any], tokenizer, type_name: str, name: str, target: Path) -> None:
    import gguf

    arch_name, _ = ARCHITECTURES[config["model_type"]]
    infos = read_tensor_infos(weight_files(model_dir))
    planned = plan_tensors(infos, config, type_name)
    writer = gguf.GGUFWriter(target, arch_name)
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
            data = to_gguf_layout(reader.get(tensor.source), tensor.permute_heads)
            writer.write_tensor_data(gguf.quants.quantize(data, tensor.qtype))
    finally:
        reader.close()
        writer.close()


def add_model_metadata(writer, config: dict[str, Any], type_name: str, name: str) -> None:
    import gguf

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = config.get("rope_parameters") or {}
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
    writer.add_file_type(file_type(type_name))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(writer, model_dir: Path, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary (`gpt2`), token types, merges, special ids and the chat template."""
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
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(check_gguf_tokenizer(tokenizer, vocab_size))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    # Said explicitly: transformers 5 no longer saves add_bos_token, and llama.cpp would otherwise add a BOS that
    # the tokenizer never adds (SmolLM2's BOS is <|im_start|>, which doubled opens every chat).
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer)
