"""Golden renderings and label masks for the named templates (LLaMA-Factory's layouts)."""

import pytest
from transformers import AutoTokenizer

from tunesmith.data.encode import IGNORE_INDEX, encode_conversation
from tunesmith.data.templates import TEMPLATES, resolve_chat_format
from tunesmith.errors import ConfigError

CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]
E = "<|im_end|>"  # the tiny model's eos token (SmolLM2's tokenizer)
B = "<|im_start|>"  # and its bos token

GOLDEN = {
    "alpaca": f"S### Instruction:\nU1\n\n### Response:\nA1{E}\n\n### Instruction:\nU2\n\n### Response:\nA2{E}\n\n",
    "chatml": (f"{B}system\nS{E}\n{B}user\nU1{E}\n{B}assistant\nA1{E}\n{B}user\nU2{E}\n{B}assistant\nA2{E}\n"),
    "qwen": f"{B}system\nS{E}\n{B}user\nU1{E}\n{B}assistant\nA1{E}\n{B}user\nU2{E}\n{B}assistant\nA2{E}\n",
    "qwen3_nothink": f"{B}system\nS{E}\n{B}user\nU1{E}\n{B}assistant\nA1{E}\n{B}user\nU2{E}\n{B}assistant\nA2{E}\n",
    "llama2": f"{B}[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST]A1{E}{B}[INST] U2 [/INST]A2{E}",
    "default": f"System: S{E}\nHuman: U1{E}\nAssistant:A1{E}\nHuman: U2{E}\nAssistant:A2{E}\n",
    "empty": f"SU1A1{E}U2A2{E}",
}
SUPERVISED = {
    "alpaca": f"A1{E}\n\nA2{E}\n\n",
    "llama2": f"A1{E}A2{E}",
    "default": f"A1{E}\nA2{E}\n",
    "empty": f"A1{E}A2{E}",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_every_template_has_a_golden_rendering():
    assert set(GOLDEN) | {"llama3"} == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_rendering_and_mask(tokenizer, name):
    chat_format = resolve_chat_format(name, tokenizer)
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=chat_format.jinja, tokenize=False)
    assert text == GOLDEN[name]
    encoded = encode_conversation(tokenizer, chat_format.jinja, CONVERSATION, cutoff_len=512)
    supervised = [
        token for token, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(supervised) == SUPERVISED.get(name, f"A1{E}\nA2{E}\n")
    assert encoded.input_ids.count(tokenizer.bos_token_id) == GOLDEN[name].count(B)


def test_default_system_prompt_is_used_when_none_given(tokenizer):
    jinja = TEMPLATES["qwen"].jinja()
    text = tokenizer.apply_chat_template(CONVERSATION[1:3], chat_template=jinja, tokenize=False)
    assert text.startswith(f"{B}system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.{E}\n")


def test_llama3_renders_its_header_tokens_and_refuses_a_tokenizer_without_them(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION[1:3], chat_template=TEMPLATES["llama3"].jinja(), tokenize=False)
    assert text == (
        f"{B}<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
    )
    with pytest.raises(ConfigError, match=r"template 'llama3' ends turns with <\|eot_id\|>"):
        resolve_chat_format("llama3", tokenizer)


def test_unknown_template_lists_known_ones(tokenizer):
    with pytest.raises(ConfigError, match=r"unknown template 'vicunaa'; known templates: alpaca, chatml"):
        resolve_chat_format("vicunaa", tokenizer)
