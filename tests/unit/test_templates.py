"""Named and custom templates: golden renderings and label masks, tools, thinking, mask_history, and ChatML = SmolLM2.

The goldens are LLaMA-Factory's renderings of the same conversations (checked against its `Template.encode_multiturn`
when they were written), except where a comment says otherwise.
"""

import json

import pytest
from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from transformers import AutoTokenizer

from tests.conftest import DEMO_DATA, REPO
from tunesmith.config.sections import DataSection
from tunesmith.data.encode import IGNORE_INDEX, encode_conversation
from tunesmith.data.formats import (
    AlpacaColumns,
    Row,
    ShareGPTTags,
    alpaca_to_messages,
    fill_placeholders,
    read_rows,
    sharegpt_to_messages,
)
from tunesmith.data.templates import TEMPLATES, find_template, resolve_chat_format
from tunesmith.errors import ConfigError, DataError
from tunesmith.model.resolve import resolve_model

FIXTURES = REPO / "tests" / "fixtures" / "templates"
B, E = "<s>", "</s>"  # the test tokenizer's BOS and EOS

CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]
GOLDEN = {
    "alpaca": f"S### Instruction:\nU1\n\n### Response:\nA1{E}\n\n### Instruction:\nU2\n\n### Response:\nA2{E}\n\n",
    # baichuan2 and glm4 end a turn with the stop word that opens the next (LLaMA-Factory: EOS after the last turn)
    "baichuan2": "S<reserved_106>U1<reserved_107>A1<reserved_106>U2<reserved_107>A2<reserved_106>",
    "chatml": (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"
    ),
    "cohere": (
        f"{B}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>S<|END_OF_TURN_TOKEN|>"
        f"<|START_OF_TURN_TOKEN|><|USER_TOKEN|>U1<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>A1{E}"
        f"<|START_OF_TURN_TOKEN|><|USER_TOKEN|>U2<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>A2{E}"
    ),
    "deepseek": f"{B}S\n\nUser: U1\n\nAssistant:A1{E}User: U2\n\nAssistant:A2{E}",
    "deepseek3": f"{B}S<｜User｜>U1<｜Assistant｜>A1{E}<｜User｜>U2<｜Assistant｜>A2{E}",
    "deepseekr1": (
        f"{B}S<｜User｜>U1<｜Assistant｜><think>\n\n</think>\n\nA1{E}<｜User｜>U2<｜Assistant｜><think>\n\n</think>\n\nA2{E}"
    ),
    "default": f"System: S{E}\nHuman: U1{E}\nAssistant:A1{E}\nHuman: U2{E}\nAssistant:A2{E}\n",
    "empty": f"SU1A1{E}U2A2{E}",  # LLaMA-Factory's empty template has no EOS; ours trains the end of the turn
    "gemma": (
        f"{B}<start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
        "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n"
    ),
    "glm4": "[gMASK]<sop><|system|>\nS<|user|>\nU1<|assistant|>\nA1<|user|>\nU2<|assistant|>\nA2<|user|>",
    "llama2": f"{B}[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST]A1{E}{B}[INST] U2 [/INST]A2{E}",
    "llama3": (
        f"{B}<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "A1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"
    ),
    "mistral": f"{B}[INST] S\n\nU1[/INST] A1{E}[INST] U2[/INST] A2{E}",
    "phi": (
        "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n"
        "<|user|>\nU2<|end|>\n<|assistant|>\nA2<|end|>\n"
    ),
    "qwen3": (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n"
    ),
    "summarize": (
        f"{B}SSummarize this dialogue:\nU1\n---\nSummary:\nA1{E}Summarize this dialogue:\nU2\n---\nSummary:\nA2{E}"
    ),
    "vicuna": f"SUSER: U1 ASSISTANT:A1{E}USER: U2 ASSISTANT:A2{E}",
}
for _same_as_chatml in ("qwen", "qwen3_nothink", "yi"):
    GOLDEN[_same_as_chatml] = GOLDEN["chatml"]

SUPERVISED = {  # what each template trains: every answer with its end of turn; nothing of the prompts
    "alpaca": f"A1{E}\n\nA2{E}\n\n",
    "baichuan2": "A1<reserved_106>A2<reserved_106>",
    "default": f"A1{E}\nA2{E}\n",
    "gemma": "A1<end_of_turn>\nA2<end_of_turn>\n",
    "glm4": "\nA1<|user|>\nA2<|user|>",
    "llama3": "A1<|eot_id|>A2<|eot_id|>",
    "mistral": f" A1{E} A2{E}",
    "phi": "A1<|end|>\nA2<|end|>\n",
    "deepseekr1": f"<think>\n\n</think>\n\nA1{E}<think>\n\n</think>\n\nA2{E}",  # the empty thought is trained
    "qwen3": "<think>\n\n</think>\n\nA1<|im_end|>\n<think>\n\n</think>\n\nA2<|im_end|>\n",
}
for _chatml_like in ("chatml", "qwen", "qwen3_nothink", "yi"):
    SUPERVISED[_chatml_like] = "A1<|im_end|>\nA2<|im_end|>\n"
for _eos_ended in ("cohere", "deepseek", "deepseek3", "empty", "llama2", "summarize", "vicuna"):
    SUPERVISED[_eos_ended] = f"A1{E}A2{E}"
BOS_COUNT = {"cohere": 1, "deepseek": 1, "deepseek3": 1, "deepseekr1": 1, "gemma": 1, "llama3": 1, "mistral": 1}
BOS_COUNT |= {"summarize": 1, "llama2": 2}  # llama2 opens every [INST] with BOS, as Llama-2 does

REASONING = {"deepseekr1", "qwen3"}  # templates that write a thought before each answer

# Markers that the models' own tokenizers hold as single tokens; thoughts are written by the data too, so the models'
# tokenizers keep them as plain added tokens, not special ones
THOUGHT_WORDS = {"<think>", "</think>"}
SPECIAL_WORDS = [
    *{find_template(name).end_of_turn for name in TEMPLATES} - {None},
    *("<|im_start|>", "<|observation|>", "<|eom_id|>"),
    *("<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<|assistant|>", "<|system|>", "<|tool|>"),
    *("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
    *("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "[gMASK]", "<sop>", "<reserved_107>"),
    *("[INST]", "[/INST]"),
    *("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's own tokenizer and ChatML chat template."""
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer made to look like the other families': BOS <s> (added by default), EOS </s>, markers."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    tokenizer.add_special_tokens({"bos_token": B, "eos_token": E})
    tokenizer.add_tokens(sorted(set(SPECIAL_WORDS) - {E} - THOUGHT_WORDS), special_tokens=True)
    tokenizer.add_tokens(sorted(THOUGHT_WORDS))  # plain added tokens, as in Qwen3's and DeepSeek-R1's tokenizers
    tokenizer.add_bos_token = True  # like Llama's: a template's BOS must not be doubled
    return tokenizer


def supervised_text(tokenizer, encoded) -> str:
    ids = [token for token, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def render(tokenizer, template: str, messages, **kwargs) -> str:
    jinja = resolve_chat_format(template, tokenizer).jinja
    return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, **kwargs)


def test_the_registry_covers_the_families_we_support():
    assert set(GOLDEN) == set(SUPERVISED) == set(TEMPLATES)
    assert {name for name in TEMPLATES if "<think>" in find_template(name).jinja} == REASONING


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_rendering_and_label_mask(tokenizer, name):
    chat_format = resolve_chat_format(name, tokenizer)
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=chat_format.jinja, tokenize=False)
    assert text == GOLDEN[name]
    encoded = encode_conversation(tokenizer, chat_format.jinja, CONVERSATION, cutoff_len=512)
    assert tokenizer.decode(encoded.input_ids) == text
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels, strict=True))
    assert supervised_text(tokenizer, encoded) == SUPERVISED[name]
    assert encoded.input_ids.count(tokenizer.bos_token_id) == BOS_COUNT.get(name, 0)
    if BOS_COUNT.get(name):
        assert encoded.input_ids[0] == tokenizer.bos_token_id
    last_answer_only = encode_conversation(tokenizer, chat_format.jinja, CONVERSATION, 512, mask_history=True)
    if name not in REASONING:  # reasoning templates drop history thoughts then (tested below)
        assert tokenizer.decode(last_answer_only.input_ids) == text
    prompt = render(tokenizer, name, CONVERSATION[:-1], add_generation_prompt=True, preserve_thinking=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids  # what inference feeds the model
    assert last_answer_only.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(last_answer_only.labels[: len(prompt_ids)]) == {IGNORE_INDEX}
    assert SUPERVISED[name].endswith(supervised_text(tokenizer, last_answer_only))
    assert "A1" not in supervised_text(tokenizer, last_answer_only)


def test_default_system_prompt_is_used_when_none_given(tokenizer):
    text = render(tokenizer, "qwen", CONVERSATION[1:3])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")


def test_llama3_refuses_a_tokenizer_without_its_end_of_turn_token(smollm2):
    with pytest.raises(ConfigError, match=r"template 'llama3' ends turns with <\|eot_id\|>"):
        resolve_chat_format("llama3", smollm2)


def test_unknown_template_lists_known_ones_and_mentions_files(smollm2):
    with pytest.raises(ConfigError, match=r"unknown template 'vicunaa'; known templates: alpaca, baichuan2, .*\.yaml"):
        resolve_chat_format("vicunaa", smollm2)


def test_a_system_message_after_the_first_turn_is_refused(tokenizer):
    with pytest.raises(TemplateError, match="a system message must come first"):
        render(tokenizer, "chatml", [*CONVERSATION[1:3], {"role": "system", "content": "late"}])


def test_mask_history_is_a_data_option():
    assert DataSection(mask_history=True).mask_history is True


# --- SmolLM2's own template and `chatml` -------------------------------------------------------------------------

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def demo_conversations() -> list[list[dict]]:
    """Every row of identity.json, the bundled alpaca_en_demo.json and the first 20 rows of
    glaive_toolcall_en_demo.json (tests/fixtures/demo_data), as our loaders read them.

    Glaive's rows are multi-turn with tool calls and tool results: a `function_call` turn is an assistant message
    whose content is the call's JSON, an `observation` a `tool` message. That is the only way SmolLM2's template can
    show a tool call (it writes each message's role and content, and ignores `tool_calls` and `tools`).
    """
    conversations = []
    for path in (DEMO_DATA / "identity.json", REPO / "data" / "alpaca_en_demo.json"):
        for row in read_rows(path):
            messages = alpaca_to_messages(row, AlpacaColumns())
            conversations.append(fill_placeholders(messages, {"name": "Tuna", "author": "Smith"}, row.where()))
    for row in read_rows(DEMO_DATA / "glaive_toolcall_en_demo.json"):
        conversations.append(sharegpt_to_messages(row, "conversations", ShareGPTTags(), None))
    return conversations


def test_chatml_gives_smollm2s_own_token_ids_on_the_demo_data(smollm2):
    """SmolLM2's template writes a default system prompt when there is none; `chatml` has no default system prompt
    (LLaMA-Factory's), so it gets SmolLM2's written in. With a system message of their own both render it."""
    conversations = demo_conversations()
    assert len(conversations) == 91 + 999 + 20
    assert sum(message["role"] == "tool" for messages in conversations for message in messages) == 12
    assert sum(len(messages) > 2 for messages in conversations) == 20  # glaive's multi-turn rows
    chatml = resolve_chat_format("chatml", smollm2).jinja

    with_default = [[{"role": "system", "content": SMOLLM2_DEFAULT_SYSTEM}, *messages] for messages in conversations]
    own = smollm2.apply_chat_template(conversations, tokenize=True)["input_ids"]
    assert smollm2.apply_chat_template(with_default, chat_template=chatml, tokenize=True)["input_ids"] == own

    with_system = [[{"role": "system", "content": "You are Tuna."}, *messages] for messages in conversations]
    own = smollm2.apply_chat_template(with_system, tokenize=True)["input_ids"]
    assert smollm2.apply_chat_template(with_system, chat_template=chatml, tokenize=True)["input_ids"] == own


def test_chatml_and_smollm2s_template_train_the_same_tokens(smollm2):
    chatml = resolve_chat_format("chatml", smollm2).jinja
    for messages in demo_conversations()[::10]:
        own = encode_conversation(smollm2, smollm2.chat_template, messages, cutoff_len=4096)
        with_default = [{"role": "system", "content": SMOLLM2_DEFAULT_SYSTEM}, *messages]
        assert encode_conversation(smollm2, chatml, with_default, cutoff_len=4096) == own


# --- tools -------------------------------------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_recipes",
            "description": "Search for recipes by ingredients",
            "parameters": {
                "type": "object",
                "properties": {
                    "ingredients": {"type": "array", "items": {"type": "string"}, "description": "What to use"},
                    "diet": {"type": "string", "enum": ["vegan", "none"], "description": "A diet"},
                },
                "required": ["ingredients"],
            },
        },
    }
]
CALL = {"type": "function", "function": {"name": "search_recipes", "arguments": {"ingredients": ["rice"]}}}
TOOL_CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Find a recipe"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"recipes": ["fried rice"]}'},
    {"role": "assistant", "content": "Try fried rice."},
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tool_definitions_calls_and_results(tokenizer, name):
    golden = json.loads((FIXTURES / "tool_goldens.json").read_text(encoding="utf-8"))[name]
    assert render(tokenizer, name, TOOL_CONVERSATION, tools=TOOLS, date_string="26 Jul 2024") == golden["text"]
    jinja = resolve_chat_format(name, tokenizer).jinja
    encoded = encode_conversation(tokenizer, jinja, TOOL_CONVERSATION, cutoff_len=2048, tools=TOOLS)
    supervised = supervised_text(tokenizer, encoded)
    assert supervised == golden["supervised"]
    assert "search_recipes" in supervised and "Try fried rice." in supervised
    assert 'fried rice"]' not in supervised and "Find a recipe" not in supervised  # the tool result and prompt


def test_bare_tool_schemas_and_string_arguments_render_like_the_openai_form(tokenizer):
    bare_tools = [TOOLS[0]["function"]]
    string_call = {"function": {"name": "search_recipes", "arguments": '{"ingredients": ["rice"]}'}}
    bare = [*TOOL_CONVERSATION[:2], {"role": "assistant", "tool_calls": [string_call]}, *TOOL_CONVERSATION[3:]]
    for name in ("qwen", "chatml", "mistral"):
        openai_form = render(tokenizer, name, TOOL_CONVERSATION, tools=TOOLS)
        assert render(tokenizer, name, bare, tools=bare_tools) == openai_form


def test_qwen_writes_parallel_calls_and_text_before_them(tokenizer):
    message = {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL, CALL]}
    text = render(tokenizer, "qwen", [TOOL_CONVERSATION[1], message])
    call = '<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": ["rice"]}}\n</tool_call>'
    assert text.endswith(f"<|im_start|>assistant\nLet me look.\n{call}\n{call}<|im_end|>\n")


def test_glm4_refuses_parallel_calls(tokenizer):
    message = {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]}
    with pytest.raises(TemplateError, match="glm4 does not support parallel tool calls"):
        render(tokenizer, "glm4", [TOOL_CONVERSATION[1], message])


# --- thinking ----------------------------------------------------------------------------------------------------

THOUGHTFUL = [
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "<think>\nT1\n</think>\n\nA1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2", "reasoning_content": "T2"},
    {"role": "user", "content": "U3"},
    {"role": "assistant", "content": "A3"},
]


def test_qwen3_trains_every_thought_and_keeps_them_in_history(tokenizer):
    jinja = resolve_chat_format("qwen3", tokenizer).jinja
    encoded = encode_conversation(tokenizer, jinja, THOUGHTFUL, cutoff_len=512)
    assert supervised_text(tokenizer, encoded) == (
        "<think>\nT1\n</think>\n\nA1<|im_end|>\n"
        "<think>\nT2\n</think>\n\nA2<|im_end|>\n"  # from reasoning_content
        "<think>\n\n</think>\n\nA3<|im_end|>\n"  # an answer without a thought gets an empty one, trained
    )


def test_qwen3_with_mask_history_drops_history_thoughts_like_at_inference(tokenizer):
    """LLaMA-Factory's mask_history for reasoning templates: history turns lose their thoughts (Qwen3 renders
    them so), only the last turn is trained. That rendering is not prefix-stable, which only the last turn needs."""
    jinja = resolve_chat_format("qwen3", tokenizer).jinja
    encoded = encode_conversation(tokenizer, jinja, THOUGHTFUL, cutoff_len=512, mask_history=True)
    text = tokenizer.decode(encoded.input_ids)
    assert "T1" not in text and "T2" not in text
    assert "<|im_start|>assistant\nA1<|im_end|>\n" in text and "<|im_start|>assistant\nA2<|im_end|>\n" in text
    assert supervised_text(tokenizer, encoded) == "<think>\n\n</think>\n\nA3<|im_end|>\n"
    last_thought = [*THOUGHTFUL[:-1], {"role": "assistant", "content": "A3", "reasoning_content": "T3"}]
    encoded = encode_conversation(tokenizer, jinja, last_thought, cutoff_len=512, mask_history=True)
    assert supervised_text(tokenizer, encoded) == "<think>\nT3\n</think>\n\nA3<|im_end|>\n"


def test_qwen3_with_thinking_off_puts_an_empty_thought_in_the_prompt(tokenizer):
    text = render(tokenizer, "qwen3", THOUGHTFUL[:3], add_generation_prompt=True, enable_thinking=False)
    assert "T1" not in text
    assert text.endswith("<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render(tokenizer, "qwen3", THOUGHTFUL[:3], add_generation_prompt=True).endswith("assistant\n")


def test_deepseekr1_thoughts(tokenizer):
    text = render(tokenizer, "deepseekr1", THOUGHTFUL[:4])
    assert text == (
        f"{B}<｜User｜>U1<｜Assistant｜><think>\nT1\n</think>\n\nA1{E}"
        f"<｜User｜>U2<｜Assistant｜><think>\nT2\n</think>\n\nA2{E}"
    )


def test_mask_history_lets_a_history_rewriting_template_train_its_last_turn(tokenizer):
    rewriting = (  # like many reasoning models' own templates: earlier answers are shortened
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[earlier answer]"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match="renders earlier turns differently"):
        encode_conversation(tokenizer, rewriting, CONVERSATION, cutoff_len=512)
    encoded = encode_conversation(tokenizer, rewriting, CONVERSATION, cutoff_len=512, mask_history=True)
    assert supervised_text(tokenizer, encoded) == f"A2{E}"


# --- template files ----------------------------------------------------------------------------------------------


def test_a_yaml_template_file(tokenizer):
    path = str(FIXTURES / "zephyr.yaml")
    chat_format = resolve_chat_format(path, tokenizer)
    assert (chat_format.source, chat_format.eos_token) == (path, E)
    assert render(tokenizer, path, CONVERSATION[1:3]) == (
        f"<|system|>\nYou are a friendly chatbot.{E}\n<|user|>\nU1{E}\n<|assistant|>\nA1{E}\n"
    )
    encoded = encode_conversation(tokenizer, chat_format.jinja, CONVERSATION, cutoff_len=512)
    assert supervised_text(tokenizer, encoded) == f"A1{E}\nA2{E}\n"


def test_a_json_template_file_with_thoughts_and_tools(tokenizer):
    path = str(FIXTURES / "reasoner.json")
    assert find_template(path).name == "reasoner"
    text = render(tokenizer, path, TOOL_CONVERSATION[1:], tools=TOOLS)
    assert text.startswith(f"{B}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.")
    assert text.endswith(
        '<|user|>Find a recipe<|assistant|><think></think><tool_call>\n{"name": "search_recipes", "arguments": '
        '{"ingredients": ["rice"]}}\n</tool_call><|end|><|tool|>{"recipes": ["fried rice"]}<|assistant|>'
        "<think></think>Try fried rice.<|end|>"
    )


PHI_LIKE = """{#- A user's own template: Phi-3's turns with Qwen's tools. -#}
{#- end_of_turn: <|end|> -#}
{%- include "calls.jinja" -%}
{%- include "tools_qwen.jinja" -%}
{%- if tools -%}
    {{- '<|system|>' + tools_text(tools) + '<|end|>' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'assistant' -%}
        {{- answer_text(message) + '<|end|>' -}}
    {%- else -%}
        {{- '<|' + message['role'] + '|>' + message['content'] + '<|end|><|assistant|>' -}}
    {%- endif -%}
{%- endfor -%}
"""


def test_a_jinja_template_file_with_its_end_of_turn_and_a_shipped_tool_style(tmp_path, tokenizer):
    path = tmp_path / "phi_like.jinja"
    path.write_text(PHI_LIKE, encoding="utf-8")
    chat_format = resolve_chat_format(str(path), tokenizer)
    assert (chat_format.source, chat_format.eos_token) == (str(path), "<|end|>")
    assert "include" not in chat_format.jinja  # self-contained: the tokenizer has no loader for parts
    text = render(tokenizer, str(path), TOOL_CONVERSATION[1:], tools=TOOLS)
    assert text.startswith("<|system|>\n\n# Tools\n\nYou may call one or more functions")
    assert text.endswith(
        '<|user|>Find a recipe<|end|><|assistant|><tool_call>\n{"name": "search_recipes", "arguments": '
        '{"ingredients": ["rice"]}}\n</tool_call><|end|><|tool|>{"recipes": ["fried rice"]}<|end|><|assistant|>'
        "Try fried rice.<|end|>"
    )
    encoded = encode_conversation(tokenizer, chat_format.jinja, TOOL_CONVERSATION[1:], cutoff_len=512, tools=TOOLS)
    assert supervised_text(tokenizer, encoded).endswith("</tool_call><|end|>Try fried rice.<|end|>")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{%- include "tools_xml.jinja" -%}\n',
            r"bad\.jinja: it includes 'tools_xml\.jinja'; the parts are calls\.jinja",
        ),
        ("{#- end_of_turn: <a> -#}\n{#- end_of_turn: <b> -#}\n", r"`end_of_turn` is given 2 times \(<a>, <b>\)"),
    ],
)
def test_jinja_template_file_errors_name_the_file(tmp_path, smollm2, content, message):
    path = tmp_path / "bad.jinja"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        resolve_chat_format(str(path), smollm2)


def test_templates_from_files_render_in_the_sandbox(tmp_path, tokenizer):
    """A template file is code from elsewhere: it renders in transformers' ImmutableSandboxedEnvironment, and the
    format strings of a YAML file are data, written out as they are, never run as Jinja."""
    escaping = tmp_path / "escape.jinja"
    escaping.write_text("{{ messages.__class__.__mro__[-1].__subclasses__() }}", encoding="utf-8")
    with pytest.raises(SecurityError):
        render(tokenizer, str(escaping), CONVERSATION)
    mutating = tmp_path / "mutate.jinja"
    mutating.write_text("{{ messages.append({'role': 'user', 'content': 'x'}) }}", encoding="utf-8")
    with pytest.raises(SecurityError):
        render(tokenizer, str(mutating), CONVERSATION)
    code_as_data = tmp_path / "code_as_data.yaml"
    code_as_data.write_text(
        "user: \"{{ ''.__class__ }}{% if true %}{content}{% endif %}\"\nassistant: '{content}{eos}'\n", encoding="utf-8"
    )
    text = render(tokenizer, str(code_as_data), CONVERSATION[1:3])
    assert text == "{{ ''.__class__ }}{% if true %}U1{% endif %}A1" + E


def read_row(instruction: str, input: str) -> Row:
    return Row({"instruction": instruction, "input": input, "output": "5"}, "row.json", 1)


@pytest.mark.parametrize("file", ["alpaca.json", "alpaca_legacy.json", "alpaca_short.json"])
def test_alpaca_lora_template_files_load_as_they_are(smollm2, file):
    path = FIXTURES / "alpaca_lora" / file  # Alpaca-LoRA's own files, as they are
    prompts = json.loads(path.read_text(encoding="utf-8"))
    jinja = resolve_chat_format(str(path), smollm2).jinja
    eos = smollm2.eos_token

    def render_row(instruction: str, input: str, split: bool) -> str:
        messages = alpaca_to_messages(read_row(instruction, input), AlpacaColumns())
        if split:  # the user message also carries the row's instruction and input
            messages[0] |= {"instruction": instruction, "input": input}
        return smollm2.apply_chat_template(messages, chat_template=jinja, tokenize=False)

    with_input = prompts["prompt_input"].format(instruction="Add", input="2 and 3")
    assert render_row("Add", "2 and 3", split=True) == f"{with_input}5{eos}"
    merged = prompts["prompt_no_input"].format(instruction="Add\n2 and 3")
    assert render_row("Add", "2 and 3", split=False) == f"{merged}5{eos}"
    without_input = prompts["prompt_no_input"].format(instruction="Add")
    assert render_row("Add", "", split=True) == render_row("Add", "", split=False) == f"{without_input}5{eos}"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add"}]
    assert smollm2.apply_chat_template(system, chat_template=jinja, tokenize=False) == f"Be brief.\n\n{without_input}"

    messages = [{"role": "user", "content": "Add\n2 and 3", "instruction": "Add", "input": "2 and 3"}]
    encoded = encode_conversation(smollm2, jinja, [*messages, {"role": "assistant", "content": "5"}], 512)
    assert supervised_text(smollm2, encoded) == f"5{eos}"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("usr: '{content}'\nassistant: '{content}'\n", r"unknown keys usr; the known keys are name, user, assistant"),
        ("assistant: '{content}'\n", r"bad\.yaml: user must be given"),
        ("user: 'U'\nassistant: '{content}'\n", r"the `user` format must contain \{content\}"),
        ("user: '{content}'\nassistant: '{content}'\ntool_style: xml\n", r"`tool_style` must be one of default"),
        ("user: '{content}'\nassistant: '{content}'\nstop_words: 5\n", r"`stop_words` must be a list"),
        ("- a list\n", r"must hold a mapping"),
        ("prompt_no_input: '{question}'\n", r"has the field \{question\}; expected instruction"),
    ],
)
def test_template_file_errors_name_the_file_and_the_problem(tmp_path, smollm2, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        resolve_chat_format(str(path), smollm2)


def test_a_missing_template_file(smollm2):
    with pytest.raises(ConfigError, match=r"template file nowhere/t\.yaml does not exist"):
        resolve_chat_format("nowhere/t.yaml", smollm2)


def test_tool_goldens_cover_every_template():
    goldens = json.loads((FIXTURES / "tool_goldens.json").read_text(encoding="utf-8"))
    assert set(goldens) == set(TEMPLATES)
