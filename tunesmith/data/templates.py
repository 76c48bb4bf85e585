"""Prompt templates: the tokenizer's own chat template by default, or a named one, or one read from a file.

A named template is a few format strings (LLaMA-Factory's layouts, so its tutorials' `template:` values render the
same text). Each is turned into an ordinary Jinja chat template, so that training, `tunesmith chat` and the saved
tokenizer all render through `tokenizer.apply_chat_template`: one code path, and a saved model carries its template.

In the format strings `{content}` is the message text, `{bos}` the tokenizer's BOS token (nothing if it has none)
and `{eos}` the token that ends an assistant turn: the first stop word when the template has stop words, else the
tokenizer's EOS. The user format ends with the assistant header (the generation prompt), as in LLaMA-Factory.

Messages are `{"role": system|user|assistant|tool, "content": ...}`. An assistant message may carry OpenAI-style
`tool_calls` and a `reasoning_content`; tool definitions come as `apply_chat_template(..., tools=[...])` and are
written after the system text in the template's tool style.

Every rendering is prefix-stable: a turn renders the same whatever comes after it, which the label masking in
`encode.py` relies on. The one exception is opt-in: reasoning templates rendered with `preserve_thinking=False` drop
the thoughts of assistant turns before the last user message, as the models do at inference; only the last turn can
then be located, which is what `mask_history` trains.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from tunesmith.data.template_files import looks_like_template_file, read_template_file
from tunesmith.errors import ConfigError


@dataclass(frozen=True)
class NamedTemplate:
    name: str
    user: str  # a user turn followed by the assistant header
    assistant: str  # an assistant turn with its end-of-turn marker
    system: str = "{content}"
    default_system: str = ""
    prefix: str = ""  # written once at the start, e.g. "{bos}"
    system_in_first_user: bool = False  # llama2 puts <<SYS>> inside the first [INST]
    function: str = ""  # an assistant turn that calls tools; default: the assistant format
    observation: str = ""  # a tool result (role `tool`) followed by the assistant header; default: the user format
    tool_style: str = "default"  # how tool definitions and calls are written: one of TOOL_STYLES
    thought_words: tuple[str, str] | None = None  # reasoning templates: the words around a thought
    efficient_eos: bool = False  # a turn ends with the stop word that opens the next one (glm4, baichuan2)
    user_with_input: str = ""  # Alpaca-LoRA's prompt_input: for user messages carrying `instruction` and `input`
    stop_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "thought_words":
                if value is not None and not (_words(value) and len(value) == 2):
                    raise ValueError("`thought_words` must be two non-empty strings, e.g. ['<think>', '</think>']")
            elif item.name == "stop_words":
                if not _words(value):
                    raise ValueError("`stop_words` must be a list of non-empty strings")
            elif not isinstance(value, bool if isinstance(item.default, bool) else str):
                expected = "true or false" if isinstance(item.default, bool) else "a string"
                raise ValueError(f"`{item.name}` must be {expected}, not {value!r}")
        for name in ("user", "assistant", "system", "function", "observation"):
            fmt = getattr(self, name)
            if fmt and "{content}" not in fmt:
                raise ValueError(f"the `{name}` format must contain {{content}}: {fmt!r}")
        if "{content}" in self.prefix:
            raise ValueError("the `prefix` cannot contain {content}")
        if self.tool_style not in TOOL_STYLES:
            raise ValueError(f"`tool_style` must be one of {', '.join(TOOL_STYLES)}, not {self.tool_style!r}")
        if self.user_with_input:
            if not ("{instruction}" in self.user_with_input and "{input}" in self.user_with_input):
                raise ValueError("`user_with_input` must contain {instruction} and {input}")
            if self.system_in_first_user or self.efficient_eos:
                raise ValueError("`user_with_input` cannot be combined with system_in_first_user or efficient_eos")
        if self.efficient_eos:
            for name in ("user", "observation"):
                fmt = getattr(self, name) or self.user
                if _opener(fmt, self.stop_words) is None:
                    raise ValueError(f"with efficient_eos the `{name}` format must start with one of the stop_words")

    def jinja(self) -> str:
        """This template as a Jinja chat template for `tokenizer.apply_chat_template`."""
        parts = [_ARGUMENTS_MACRO, _TOOL_STYLES[self.tool_style]]
        parts.append(
            f"{{%- set ns = namespace(system={_literal(self.default_system)}, prev='', started=false, last_user=-1)"
            " -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] or '' -%}{%- endif -%}"
            "{%- if tools -%}{%- set ns.system = ns.system + tools_text(tools) -%}{%- endif -%}"
        )
        parts.append(self._out(self.prefix))
        if not self.system_in_first_user:
            parts.append(f"{{%- if ns.system -%}}{self._out(self.system, content='ns.system')}{{%- endif -%}}")
        if self.thought_words:
            parts.append(_THINKING_SETUP)
        parts.append(
            "{%- for message in messages -%}"
            "{%- set role = message['role'] -%}"
            "{%- set content = message.get('content') or '' -%}"
            "{%- if role == 'system' -%}"
            "{%- if not loop.first -%}"
            f"{{{{- raise_exception({_literal(f'template {self.name}: a system message must come first')}) -}}}}"
            "{%- endif -%}"
            f"{{%- elif role == 'user' -%}}{self._prompt_turn(self.user, user=True)}"
            f"{{%- elif role == 'tool' -%}}{self._prompt_turn(self.observation or self.user)}"
            f"{{%- elif role == 'assistant' -%}}{self._assistant_turn()}"
            "{%- else -%}"
            f"{{{{- raise_exception({_literal(f'template {self.name} has no format for role ')} + role) -}}}}"
            "{%- endif -%}"
            "{%- if role != 'system' -%}{%- set ns.prev = role -%}{%- set ns.started = true -%}{%- endif -%}"
            "{%- endfor -%}"
        )
        if self.thought_words:
            parts.append(
                "{%- if thinking_off and add_generation_prompt and messages and messages[-1]['role'] != 'assistant' -%}"
                f"{{{{- {_literal(''.join(self.thought_words))} -}}}}{{%- endif -%}}"
            )
        return "".join(parts)

    def _expression(self, fmt: str, **variables: str) -> str:
        """A format string as a Jinja expression: its placeholders become the given expressions."""
        eos = _literal(self.stop_words[0]) if self.stop_words else "eos_token"
        variables = {"bos": "(bos_token or '')", "eos": eos, **variables}
        marker = re.compile("(" + "|".join(re.escape("{" + name + "}") for name in variables) + ")")
        pieces = [
            f"({variables[piece[1:-1]]})" if marker.fullmatch(piece) else _literal(piece)
            for piece in marker.split(fmt)
            if piece
        ]
        return " + ".join(pieces)

    def _out(self, fmt: str, **variables: str) -> str:
        expression = self._expression(fmt, **variables)
        return f"{{{{- {expression} -}}}}" if expression else ""

    def _prompt_turn(self, fmt: str, user: bool = False) -> str:
        """A user or tool turn; the variants depend only on earlier messages, so rendering stays prefix-stable."""
        branches = []
        if self.system_in_first_user:
            system = self._expression(self.system, content="ns.system")
            branches.append(("not ns.started and ns.system", self._out(fmt, content=f"{system} + content")))
        if self.efficient_eos:  # the previous assistant turn already wrote this turn's opening stop word
            opener = _opener(fmt, self.stop_words)
            branches.append(("ns.prev == 'assistant'", self._out(fmt[len(opener) :], content="content")))
        if user and self.user_with_input:
            branches.append(
                (
                    "message.get('instruction') and message.get('input')",
                    self._out(self.user_with_input, instruction="message['instruction']", input="message['input']"),
                )
            )
        plain = self._out(fmt, content="content")
        if not branches:
            return plain
        chain = "".join(
            f"{{%- {'if' if i == 0 else 'elif'} {condition} -%}}{out}" for i, (condition, out) in enumerate(branches)
        )
        return f"{chain}{{%- else -%}}{plain}{{%- endif -%}}"

    def _assistant_turn(self) -> str:
        parts = [
            "{%- set text = content -%}"
            "{%- if message.get('tool_calls') -%}"
            "{%- set calls = tool_calls_text(message['tool_calls']) -%}"
            "{%- set text = (text + '\\n' + calls) if text else calls -%}"
            "{%- endif -%}"
        ]
        if self.thought_words:
            parts.append(self._thought())
        answer = self._out(self.assistant, content="text")
        if self.function:
            answer = (
                f"{{%- if message.get('tool_calls') -%}}{self._out(self.function, content='text')}"
                f"{{%- else -%}}{answer}{{%- endif -%}}"
            )
        parts.append(answer)
        if self.efficient_eos:
            user_opener = _opener(self.user, self.stop_words)
            tool_opener = _opener(self.observation or self.user, self.stop_words)
            parts.append(
                f"{{%- if message.get('tool_calls') -%}}{{{{- {_literal(tool_opener)} -}}}}"
                f"{{%- else -%}}{{{{- {_literal(user_opener)} -}}}}{{%- endif -%}}"
            )
        return "".join(parts)

    def _thought(self) -> str:
        """Write the answer's thought, an empty one if it has none, or drop it from history (see module docstring)."""
        opening, closing = self.thought_words
        empty = _literal(opening + closing)
        open_word, close_word = _literal(opening.strip()), _literal(closing.strip())
        return (
            "{%- set reasoning = message.get('reasoning_content') or '' -%}"
            "{%- if thinking_off or (not keep_thoughts and loop.index0 < ns.last_user) -%}"
            f"{{%- if {close_word} in text -%}}{{%- set text = text.split({close_word})[-1].lstrip('\\n') -%}}"
            "{%- endif -%}"
            f"{{%- if thinking_off -%}}{{%- set text = {empty} + text -%}}{{%- endif -%}}"
            "{%- elif reasoning -%}"
            f"{{%- set text = {_literal(opening)} + reasoning + {_literal(closing)} + text -%}}"
            f"{{%- elif {open_word} not in text and {close_word} not in text -%}}{{%- set text = {empty} + text -%}}"
            "{%- endif -%}"
        )


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid Jinja string literal


def _words(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(word, str) and word for word in value)


def _opener(fmt: str, stop_words: tuple[str, ...]) -> str | None:
    return next((word for word in stop_words if fmt.startswith(word)), None)


# Thinking switches: `enable_thinking=False` drops thoughts and puts an empty one in the prompt (so it is not
# trained); `preserve_thinking=False` drops the thoughts of turns before the last user message (not prefix-stable).
_THINKING_SETUP = (
    "{%- set thinking_off = enable_thinking is defined and enable_thinking is false -%}"
    "{%- set keep_thoughts = preserve_thinking is not defined or preserve_thinking -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
)

_ARGUMENTS_MACRO = (
    "{%- macro arguments_json(arguments) -%}"
    "{{- arguments if arguments is string else arguments | tojson -}}"
    "{%- endmacro -%}"
)

# Each tool style defines two macros: tools_text(tools), appended to the system text, and tool_calls_text(calls),
# an assistant turn's calls. The texts are LLaMA-Factory's (its tool_utils), so the same data renders the same.
_DEFAULT_TOOL_PROMPT_TAIL = (
    "Use the following format if using a tool:\n```\nAction: tool name (one of [{names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
)
_QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)
_LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n{tools}"
)
_GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tools}"
)


def _fill(jinja: str, **texts: str) -> str:
    """Put texts into Jinja code as string literals, at markers written `<<name>>`."""
    for name, text in texts.items():
        jinja = jinja.replace(f"<<{name}>>", _literal(text))
    return jinja


_FUNCTION = "{%- set fn = tool['function'] if tool.get('type') == 'function' else tool -%}"
_WRAPPED = "(tool if tool.get('type') == 'function' else {'type': 'function', 'function': tool})"
_CALL = "{%- set fn = call['function'] if call.get('function') else call -%}"
_DEFAULT_HEAD, _DEFAULT_TAIL = _DEFAULT_TOOL_PROMPT_TAIL.split("{names}")
_QWEN_HEAD, _QWEN_TAIL = _QWEN_TOOL_PROMPT.split("{tools}")
_LLAMA3_HEAD, _LLAMA3_TAIL = _LLAMA3_TOOL_PROMPT.removesuffix("{tools}").split("{date}")
_GLM4_HEAD = _GLM4_TOOL_PROMPT.removesuffix("{tools}")

_TOOL_STYLES = {
    "default": _fill(
        "{%- macro tools_text(tools) -%}"
        "{%- set t = namespace(text='', names=[]) -%}"
        "{%- for tool in tools -%}" + _FUNCTION + "{%- set params = fn.get('parameters') or {} -%}"
        "{%- set required = params.get('required') or [] -%}"
        "{%- set t.args = '' -%}"
        "{%- for name, param in (params.get('properties') or {}).items() -%}"
        "{%- set t.args = t.args + '  - ' + name + ' (' + (param.get('type', '') | string)"
        " + (', required' if name in required else '') + '): ' + (param.get('description', '') | string)"
        " + ((', should be one of [' + param['enum'] | join(', ') + ']') if param.get('enum') else '')"
        " + ((', where each item should be ' + (param['items'].get('type', '') | string))"
        " if param.get('items') else '')"
        " + '\\n' -%}"
        "{%- endfor -%}"
        "{%- set t.text = t.text + '> Tool Name: ' + fn['name'] + '\\nTool Description: '"
        " + (fn.get('description', '') | string) + '\\nTool Args:\\n' + t.args + '\\n' -%}"
        "{%- set t.names = t.names + [fn['name']] -%}"
        "{%- endfor -%}"
        "{{- 'You have access to the following tools:\\n' + t.text + <<head>> + t.names | join(', ') + <<tail>> -}}"
        "{%- endmacro -%}"
        "{%- macro tool_calls_text(calls) -%}"
        "{%- for call in calls -%}" + _CALL + "{{- ('\\n' if not loop.first else '') + 'Action: ' + fn['name']"
        " + '\\nAction Input: ' + arguments_json(fn['arguments']) -}}"
        "{%- endfor -%}"
        "{%- endmacro -%}",
        head=_DEFAULT_HEAD,
        tail=_DEFAULT_TAIL,
    ),
    "qwen": _fill(
        "{%- macro tools_text(tools) -%}{{- <<head>> -}}"
        "{%- for tool in tools -%}{{- '\\n' + (" + _WRAPPED + " | tojson) -}}{%- endfor -%}"
        "{{- <<tail>> -}}{%- endmacro -%}"
        "{%- macro tool_calls_text(calls) -%}"
        "{%- for call in calls -%}" + _CALL + "{{- ('\\n' if not loop.first else '')"
        " + '<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": '"
        " + arguments_json(fn['arguments']) + '}\\n</tool_call>' -}}"
        "{%- endfor -%}"
        "{%- endmacro -%}",
        head=_QWEN_HEAD,
        tail=_QWEN_TAIL,
    ),
    "llama3": _fill(
        "{%- macro tools_text(tools) -%}"
        "{{- <<head>> + (date_string if date_string is defined else strftime_now('%d %b %Y')) + <<tail>> -}}"
        "{%- for tool in tools -%}{{- (" + _WRAPPED + " | tojson(indent=4)) + '\\n\\n' -}}{%- endfor -%}"
        "{%- endmacro -%}"
        "{%- macro tool_calls_text(calls) -%}"
        "{{- '[' if calls | length > 1 else '' -}}"
        "{%- for call in calls -%}" + _CALL + "{{- (', ' if not loop.first else '')"
        " + '{\"name\": ' + (fn['name'] | tojson) + ', \"parameters\": ' + arguments_json(fn['arguments']) + '}' -}}"
        "{%- endfor -%}"
        "{{- ']' if calls | length > 1 else '' -}}"
        "{%- endmacro -%}",
        head=_LLAMA3_HEAD,
        tail=_LLAMA3_TAIL,
    ),
    "mistral": (
        "{%- macro tools_text(tools) -%}"
        "{%- set t = namespace(wrapped=[]) -%}"
        "{%- for tool in tools -%}{%- set t.wrapped = t.wrapped + [" + _WRAPPED + "] -%}{%- endfor -%}"
        "{{- '[AVAILABLE_TOOLS] ' + (t.wrapped | tojson) + '[/AVAILABLE_TOOLS]' -}}"
        "{%- endmacro -%}"
        "{%- macro tool_calls_text(calls) -%}"
        "{{- '[' -}}"
        "{%- for call in calls -%}" + _CALL + "{{- (', ' if not loop.first else '')"
        " + '{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' + arguments_json(fn['arguments']) + '}' -}}"
        "{%- endfor -%}"
        "{{- ']' -}}"
        "{%- endmacro -%}"
    ),
    "glm4": _fill(
        "{%- macro tools_text(tools) -%}{{- <<head>> -}}"
        "{%- for tool in tools -%}" + _FUNCTION + "{{- '\\n\\n## ' + fn['name'] + '\\n\\n'"
        " + (fn | tojson(indent=4)) + <<each>> -}}"
        "{%- endfor -%}{%- endmacro -%}"
        "{%- macro tool_calls_text(calls) -%}"
        "{%- if calls | length > 1 -%}{{- raise_exception('glm4 does not support parallel tool calls') -}}"
        "{%- endif -%}"
        "{%- for call in calls -%}" + _CALL + "{{- fn['name'] + '\\n' + arguments_json(fn['arguments']) -}}"
        "{%- endfor -%}"
        "{%- endmacro -%}",
        head=_GLM4_HEAD,
        each="\n在调用上述函数时，请使用 Json 格式表示调用的参数。",
    ),
}
TOOL_STYLES = tuple(_TOOL_STYLES)

_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_ASSISTANT = "{content}<|im_end|>\n"
_CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
_QWEN_OBSERVATION = "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")

TEMPLATES: dict[str, NamedTemplate] = {
    template.name: template
    for template in [
        NamedTemplate(
            name="alpaca",
            user="### Instruction:\n{content}\n\n### Response:\n",
            assistant="{content}{eos}\n\n",
            default_system=(
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.\n\n"
            ),
        ),
        NamedTemplate(
            name="baichuan2",
            user="<reserved_106>{content}<reserved_107>",
            assistant="{content}",
            efficient_eos=True,
            stop_words=("<reserved_106>",),
        ),
        NamedTemplate(
            name="chatml",
            user=_CHATML_USER,
            assistant=_CHATML_ASSISTANT,
            system=_CHATML_SYSTEM,
            observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
            stop_words=("<|im_end|>", "<|im_start|>"),
        ),
        NamedTemplate(
            name="cohere",
            prefix="{bos}",
            user=(
                "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>"
                "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
            ),
            assistant="{content}{eos}",
            system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        ),
        NamedTemplate(
            name="deepseek",
            prefix="{bos}",
            user="User: {content}\n\nAssistant:",
            assistant="{content}{eos}",
            system="{content}\n\n",
        ),
        NamedTemplate(
            name="deepseek3",
            prefix="{bos}",
            user="<｜User｜>{content}<｜Assistant｜>",
            assistant="{content}{eos}",
        ),
        NamedTemplate(
            name="deepseekr1",
            prefix="{bos}",
            user="<｜User｜>{content}<｜Assistant｜>",
            assistant="{content}{eos}",
            thought_words=_THOUGHT_WORDS,
        ),
        NamedTemplate(
            name="default",
            user="Human: {content}{eos}\nAssistant:",
            assistant="{content}{eos}\n",
            system="System: {content}{eos}\n",
        ),
        NamedTemplate(name="empty", user="{content}", assistant="{content}{eos}"),
        NamedTemplate(
            name="gemma",
            prefix="{bos}",
            user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
            assistant="{content}<end_of_turn>\n",
            system="{content}\n\n",
            system_in_first_user=True,
            observation="<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n",
            stop_words=("<end_of_turn>",),
        ),
        NamedTemplate(
            name="glm4",
            prefix="[gMASK]<sop>",
            user="<|user|>\n{content}<|assistant|>",
            assistant="\n{content}",
            system="<|system|>\n{content}",
            function="{content}",
            observation="<|observation|>\n{content}<|assistant|>",
            tool_style="glm4",
            efficient_eos=True,
            stop_words=("<|user|>", "<|observation|>"),
        ),
        NamedTemplate(
            name="llama2",
            user="{bos}[INST] {content} [/INST]",
            assistant="{content}{eos}",
            system="<<SYS>>\n{content}\n<</SYS>>\n\n",
            system_in_first_user=True,
        ),
        NamedTemplate(
            name="llama3",
            prefix="{bos}",
            user=(
                "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            assistant="{content}<|eot_id|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            observation=(
                "<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            tool_style="llama3",
            stop_words=("<|eot_id|>", "<|eom_id|>"),
        ),
        NamedTemplate(
            name="mistral",
            prefix="{bos}",
            user="[INST] {content}[/INST]",
            assistant=" {content}{eos}",
            system="{content}\n\n",
            system_in_first_user=True,
            function="[TOOL_CALLS] {content}{eos}",
            observation='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]',
            tool_style="mistral",
        ),
        NamedTemplate(
            name="phi",
            user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
            assistant="{content}<|end|>\n",
            system="<|system|>\n{content}<|end|>\n",
            stop_words=("<|end|>",),
        ),
        NamedTemplate(
            name="qwen",
            user=_CHATML_USER,
            assistant=_CHATML_ASSISTANT,
            system=_CHATML_SYSTEM,
            observation=_QWEN_OBSERVATION,
            tool_style="qwen",
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            stop_words=("<|im_end|>",),
        ),
        NamedTemplate(
            name="qwen3",
            user=_CHATML_USER,
            assistant=_CHATML_ASSISTANT,
            system=_CHATML_SYSTEM,
            observation=_QWEN_OBSERVATION,
            tool_style="qwen",
            thought_words=_THOUGHT_WORDS,
            stop_words=("<|im_end|>",),
        ),
        NamedTemplate(
            name="qwen3_nothink",
            user=_CHATML_USER,
            assistant=_CHATML_ASSISTANT,
            system=_CHATML_SYSTEM,
            observation=_QWEN_OBSERVATION,
            tool_style="qwen",
            stop_words=("<|im_end|>",),
        ),
        NamedTemplate(  # torchtune's SummarizeTemplate on a base model's tokenizer (BOS, prompt, answer, EOS)
            name="summarize",
            prefix="{bos}",
            user="Summarize this dialogue:\n{content}\n---\nSummary:\n",
            assistant="{content}{eos}",
        ),
        NamedTemplate(
            name="vicuna",
            user="USER: {content} ASSISTANT:",
            assistant="{content}{eos}",
            default_system=(
                "A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions."
            ),
        ),
        NamedTemplate(
            name="yi",
            user=_CHATML_USER,
            assistant=_CHATML_ASSISTANT,
            system=_CHATML_SYSTEM,
            stop_words=("<|im_end|>",),
        ),
    ]
}


@dataclass(frozen=True)
class ChatFormat:
    """The chat template a run uses, and the token that ends an assistant turn."""

    jinja: str
    eos_token: str
    source: str  # "tokenizer", the template's name, or the template file's path


def find_template(template: str) -> NamedTemplate:
    """A named template, or the template in a YAML/JSON file (our fields, or an Alpaca-LoRA template file)."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if not looks_like_template_file(template):
        raise ConfigError(
            f"`template`: unknown template {template!r}; known templates: {', '.join(sorted(TEMPLATES))}; "
            "or give the path of a .yaml/.json template file"
        )
    path = Path(template)
    values = {"name": path.stem, **read_template_file(path)}
    known = [item.name for item in fields(NamedTemplate)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"template file {path}: unknown keys {', '.join(unknown)}; the known keys are {', '.join(known)}"
        )
    missing = [key for key in ("user", "assistant") if key not in values]
    if missing:
        raise ConfigError(f"template file {path}: {' and '.join(missing)} must be given")
    try:
        return NamedTemplate(**values)
    except ValueError as error:
        raise ConfigError(f"template file {path}: {error}") from None


def resolve_chat_format(template: str | None, tokenizer) -> ChatFormat:
    """Pick the Jinja template for this run and check that the tokenizer can end an assistant turn with it."""
    if template is None:
        if not tokenizer.chat_template:
            raise ConfigError(
                "this tokenizer has no chat template; set `template:` to one of " + ", ".join(sorted(TEMPLATES))
            )
        return ChatFormat(tokenizer.chat_template, tokenizer.eos_token, "tokenizer")
    named = find_template(template)
    eos_token = tokenizer.eos_token
    if named.stop_words:
        eos_token = named.stop_words[0]
        if eos_token not in tokenizer.get_vocab():
            raise ConfigError(
                f"template {named.name!r} ends turns with {eos_token}, which this tokenizer does not have; "
                "use a template made for this model (by default its own chat template is used)"
            )
    elif eos_token is None:
        raise ConfigError(f"template {named.name!r} ends turns with the EOS token, which this tokenizer does not have")
    source = named.name if template in TEMPLATES else template
    return ChatFormat(named.jinja(), eos_token, source)


def use_chat_format(tokenizer, template: str | None) -> ChatFormat:
    """The run's chat format (`resolve_chat_format`), installed in the tokenizer (`install_chat_format`)."""
    chat_format = resolve_chat_format(template, tokenizer)
    install_chat_format(tokenizer, chat_format)
    return chat_format


def install_chat_format(tokenizer, chat_format: ChatFormat) -> None:
    """Make the tokenizer render and stop like the run, so that a saved tokenizer chats the way it was trained."""
    tokenizer.chat_template = chat_format.jinja
    tokenizer.eos_token = chat_format.eos_token
