"""Every shipped template and every template-file fixture renders a fixed set of conversations exactly as its golden.

A golden file holds one template's renderings of CASES (a failing render is written as its error), made by this
module from the code of the day; `python -m tests.unit.test_template_goldens` rewrites them after a deliberate change,
and `git diff` then shows what changed. A template without a golden file, or a golden without its template, fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from jinja2 import TemplateError
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from tests.conftest import REPO
from tests.unit.test_templates import THOUGHTFUL, TOOLS  # the same conversations and tools the rendering tests use
from tunesmith.data.templates import TEMPLATES, find_template
from tunesmith.data.templates.jinja_source import TEMPLATE_DIR

FIXTURES = REPO / "tests" / "fixtures" / "templates"
GOLDEN = FIXTURES / "golden"
TEMPLATE_FILES = ["zephyr.yaml", "reasoner.json", "inst_first.yaml", "handoff.yaml", "header.json"]
TEMPLATE_FILES += [f"alpaca_lora/{name}" for name in ("alpaca.json", "alpaca_legacy.json", "alpaca_short.json")]

BARE_TOOLS = [{"name": "get_time", "description": "The time now", "parameters": {"type": "object", "properties": {}}}]
CALL = {"type": "function", "function": {"name": "search_recipes", "arguments": {"ingredients": ["rice"]}}}
STRING_CALL = {"function": {"name": "get_time", "arguments": "{}"}}
SYSTEM = {"role": "system", "content": "S"}
TWO_TURNS = [
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]
TOOL_TURNS = [
    {"role": "user", "content": "Find a recipe"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"recipes": ["fried rice"]}'},
    {"role": "assistant", "content": "Try fried rice."},
]
PARALLEL_TURNS = [
    {"role": "user", "content": "Find a recipe, and what time is it?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL, STRING_CALL]},
    {"role": "tool", "content": '{"recipes": ["fried rice"]}'},
    {"role": "tool", "content": '{"time": "12:00"}'},
    {"role": "assistant", "content": "Fried rice, at noon."},
]
TRICKY_TEXT = [  # text that looks like the format strings' fields, quotes, backslashes, non-ASCII, edge whitespace
    {"role": "user", "content": 'Say "{content}" {eos} {bos} {instruction} {input} \\n 你好\n'},
    {"role": "assistant", "content": " \n{content}'s {{x}} 再见 "},
]
INSTRUCTION_AND_INPUT = [
    {"role": "user", "content": "Add\n2 and 3", "instruction": "Add", "input": "2 and 3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Double it", "instruction": "Double it", "input": ""},
    {"role": "assistant", "content": "10"},
]
DATE = {"date_string": "26 Jul 2024"}  # llama3's tool prompt writes today's date otherwise

# (case name, messages, apply_chat_template keyword arguments)
CASES = [
    ("system and two turns", [SYSTEM, *TWO_TURNS], {}),
    ("two turns, the default system", TWO_TURNS, {}),
    ("generation prompt", [SYSTEM, *TWO_TURNS[:3]], {"add_generation_prompt": True}),
    ("last user turn without generation prompt", [SYSTEM, *TWO_TURNS[:3]], {"add_generation_prompt": False}),
    ("text that looks like markup", [SYSTEM, *TRICKY_TEXT], {}),
    ("tools, a call and its result", [SYSTEM, *TOOL_TURNS], {"tools": TOOLS, **DATE}),
    ("tools without a system message", TOOL_TURNS, {"tools": TOOLS, **DATE}),
    ("parallel calls with text, bare schemas", [SYSTEM, *PARALLEL_TURNS], {"tools": BARE_TOOLS, **DATE}),
    ("calls without tool definitions", TOOL_TURNS, {}),
    ("thoughts kept", THOUGHTFUL, {}),
    ("thoughts before the last user turn dropped", THOUGHTFUL, {"preserve_thinking": False}),
    ("thinking off", THOUGHTFUL[:3], {"add_generation_prompt": True, "enable_thinking": False}),
    ("instruction and input", [SYSTEM, *INSTRUCTION_AND_INPUT], {}),
    ("a tool result first", [SYSTEM, *TOOL_TURNS[2:]], {}),
    ("an answer first", [SYSTEM, *TWO_TURNS[1:]], {}),
    ("a late system message", [*TWO_TURNS[:2], SYSTEM], {}),
    ("an unknown role", [{"role": "critic", "content": "C"}], {}),
]


def tokenizer() -> PreTrainedTokenizerFast:
    """Renders like any tokenizer: its BOS and EOS are what the templates see."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def renderings(jinja: str) -> str:
    """The golden text of one chat template: each case's rendering under a header line."""
    rendering_tokenizer = tokenizer()
    sections = []
    for case, messages, options in CASES:
        try:
            text = rendering_tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, **options)
        except TemplateError as error:
            text = f"error: {type(error).__name__}: {error}"
        sections.append(f"##### {case}\n{text}\n")
    return "".join(sections)


def named_template(name: str) -> str:
    return find_template(name).jinja


def file_template(file: str) -> str:
    return find_template(str(FIXTURES / file)).jinja


def golden_path(name: str) -> Path:
    return GOLDEN / f"{name}.txt"


def file_golden_path(file: str) -> Path:
    return GOLDEN / "files" / f"{file.replace('/', '.')}.txt"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_named_template_renders_its_golden(name):
    assert renderings(named_template(name)) == golden_path(name).read_text(encoding="utf-8")


@pytest.mark.parametrize("file", TEMPLATE_FILES)
def test_template_file_renders_its_golden(file):
    assert renderings(file_template(file)) == file_golden_path(file).read_text(encoding="utf-8")


def test_every_template_file_has_a_golden_and_every_golden_a_template():
    shipped = sorted(path.stem for path in TEMPLATE_DIR.glob("*.jinja"))
    assert shipped == sorted(TEMPLATES)
    assert sorted(path.stem for path in GOLDEN.glob("*.txt")) == shipped
    assert sorted(path.name for path in (GOLDEN / "files").glob("*.txt")) == sorted(
        file_golden_path(file).name for file in TEMPLATE_FILES
    )


def write_goldens() -> None:
    (GOLDEN / "files").mkdir(parents=True, exist_ok=True)
    for name in TEMPLATES:
        golden_path(name).write_text(renderings(named_template(name)), encoding="utf-8")
    for file in TEMPLATE_FILES:
        file_golden_path(file).write_text(renderings(file_template(file)), encoding="utf-8")


if __name__ == "__main__":
    write_goldens()
    print(f"wrote the goldens of {len(TEMPLATES)} templates and {len(TEMPLATE_FILES)} template files", file=sys.stderr)
