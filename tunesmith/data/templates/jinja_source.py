"""Reading a .jinja template file: its shared parts put in, and the token that ends its assistant turns.

A template file is an ordinary Jinja chat template with two additions, both resolved here, so that the tokenizer gets
one self-contained template (transformers renders chat templates in a sandbox without a loader, so Jinja's own
`include` cannot work there):

- a line `{%- include "tools_qwen.jinja" -%}` is replaced by that file from `parts/`: the macros every template uses
  (`calls.jinja`) and one tool style (`tools_*.jinja`), which the template then calls;
- a line `{#- end_of_turn: <|im_end|> -#}` names the token that ends an assistant turn: generation stops there and the
  saved tokenizer gets it as its EOS. A template without it ends turns with the tokenizer's EOS token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent
PARTS_DIR = TEMPLATE_DIR / "parts"
PARTS = tuple(sorted(path.name for path in PARTS_DIR.glob("*.jinja")))

_INCLUDE = re.compile(r'^[ \t]*\{%-?\s*include\s+"([^"]*)"\s*-?%\}[ \t]*\n?', re.MULTILINE)
_END_OF_TURN = re.compile(r"^\{#-?\s*end_of_turn:\s*(\S+)\s*-?#\}[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class Template:
    name: str
    jinja: str  # self-contained: what `apply_chat_template` renders and a saved tokenizer carries
    end_of_turn: str | None  # the token that ends an assistant turn; None: the tokenizer's EOS


def read_jinja_template(path: Path) -> Template:
    text = path.read_text(encoding="utf-8")
    return Template(path.stem, with_parts(text, path), end_of_turn(text, path))


def with_parts(text: str, where: Path) -> str:
    """The template with each `include` line replaced by the part it names."""

    def part(include: re.Match) -> str:
        name = include[1]
        if name not in PARTS:
            raise ConfigError(f"template {where}: it includes {name!r}; the parts are {', '.join(PARTS)}")
        return (PARTS_DIR / name).read_text(encoding="utf-8")

    return _INCLUDE.sub(part, text)


def end_of_turn(text: str, where: Path) -> str | None:
    tokens = _END_OF_TURN.findall(text)
    if len(tokens) > 1:
        raise ConfigError(f"template {where}: `end_of_turn` is given {len(tokens)} times ({', '.join(tokens)})")
    return tokens[0] if tokens else None
