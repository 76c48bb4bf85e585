"""A small interpreter for the part of Go's text/template that Ollama's chat templates use, for tests.

Covers: text, `{{ .Field }}`, `{{ $.Field }}`, `{{ $var }}`, string/bool/number literals, `if` / `else if` /
`else` / `end`, `range PIPELINE` and `range $i, $m := PIPELINE`, `$var := x` and `$var = x`, the functions
eq, ne, and, or, not, len and slice, parentheses, and `{{-`/`-}}` trimming. Truthiness is Go's: empty string, 0,
false, nil and empty lists are false. Go is not installed here; https://pkg.go.dev/text/template is the reference.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

ACTION = re.compile(r"\{\{(-?)\s?(.*?)\s?(-?)\}\}", re.S)


def render(template: str, data: dict[str, Any]) -> str:
    nodes, rest = _parse(_lex(template), 0, ())
    assert rest == len(_lex(template)), "unbalanced {{ end }}"
    out: list[str] = []
    _run(nodes, data, [{"$": data}], out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    position = 0
    for match in ACTION.finditer(template):
        text = template[position : match.start()]
        if match.group(1):
            text = text.rstrip()
        items.append(("text", text))
        items.append(("action", match.group(2).strip()))
        position = match.end()
        if match.group(3):
            remaining = template[position:]
            position += len(remaining) - len(remaining.lstrip())
    items.append(("text", template[position:]))
    return items


def _parse(items, index, stop_words):
    nodes = []
    while index < len(items):
        kind, value = items[index]
        if kind == "text":
            nodes.append(("text", value))
            index += 1
            continue
        word = value.split(" ", 1)[0]
        if word in stop_words or value.startswith("else"):
            return nodes, index
        if word == "if":
            branches, index = _parse_if(items, index)
            nodes.append(("if", branches))
        elif word == "range":
            header = value[len("range") :].strip()
            body, index = _parse(items, index + 1, ("end",))
            index += 1
            nodes.append(("range", header, body))
        else:
            nodes.append(("action", value))
            index += 1
    return nodes, index


def _parse_if(items, index):
    branches = []
    condition = items[index][1][len("if") :].strip()
    index += 1
    while True:
        body, index = _parse(items, index, ("end",))
        branches.append((condition, body))
        value = items[index][1]
        index += 1
        if value == "end":
            return branches, index
        condition = None if value == "else" else value[len("else if") :].strip()


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, list | dict) and not value)


def _lookup(scopes, name):
    for scope in reversed(scopes):
        if name in scope:
            return scope
    raise KeyError(f"undefined variable {name}")


def _run(nodes, dot, scopes, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            result = _statement(node[1], dot, scopes)
            if result is not None:
                out.append(str(result).lower() if isinstance(result, bool) else str(result))
        elif node[0] == "if":
            for condition, body in node[1]:
                if condition is None or _truthy(_eval(condition, dot, scopes)):
                    _run(body, dot, [*scopes, {}], out)
                    break
        elif node[0] == "range":
            header = node[1]
            names: list[str] = []
            if ":=" in header:
                declared, header = header.split(":=", 1)
                names = [name.strip() for name in declared.split(",")]
            for position, element in enumerate(_eval(header.strip(), dot, scopes) or []):
                scope = {}
                if len(names) == 2:
                    scope = {names[0]: position, names[1]: element}
                elif len(names) == 1:
                    scope = {names[0]: element}
                _run(node[2], element, [*scopes, scope], out)


def _statement(text, dot, scopes):
    declare = re.match(r"^(\$\w+)\s*(:?=)\s*(.+)$", text, re.S)
    if declare:
        name, operator, expression = declare.groups()
        value = _eval(expression, dot, scopes)
        (scopes[-1] if operator == ":=" else _lookup(scopes, name))[name] = value
        return None
    return _eval(text, dot, scopes)


def _tokens(expression: str) -> list[str]:
    lexer = shlex.shlex(expression.replace("(", " ( ").replace(")", " ) "), posix=False)
    lexer.wordchars += "$.-"
    lexer.whitespace_split = True
    return list(lexer)


def _eval(expression, dot, scopes):
    value, rest = _expression(_tokens(expression), 0, dot, scopes)
    assert rest == len(_tokens(expression)), f"cannot evaluate {expression!r}"
    return value


FUNCTIONS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "not": lambda a: not _truthy(a),
    "len": len,
    "slice": lambda items, *bounds: items[slice(*bounds)] if len(bounds) > 1 else items[bounds[0] :],
}


def _expression(tokens, index, dot, scopes):
    token = tokens[index]
    if token in FUNCTIONS:
        arguments = []
        index += 1
        while index < len(tokens) and tokens[index] != ")":
            argument, index = _operand(tokens, index, dot, scopes)
            arguments.append(argument)
        return FUNCTIONS[token](*arguments), index
    return _operand(tokens, index, dot, scopes)


def _operand(tokens, index, dot, scopes):
    token = tokens[index]
    if token == "(":
        value, index = _expression(tokens, index + 1, dot, scopes)
        assert tokens[index] == ")"
        return value, index + 1
    if token.startswith('"'):
        return token[1:-1].encode().decode("unicode_escape"), index + 1
    if token in ("true", "false"):
        return token == "true", index + 1
    if re.fullmatch(r"-?\d+", token):
        return int(token), index + 1
    if token == ".":
        return dot, index + 1
    if token.startswith("$"):
        name, _, path = token.partition(".")
        value = _lookup(scopes, name)[name]
        return _fields(value, path), index + 1
    if token.startswith("."):
        return _fields(dot, token[1:]), index + 1
    raise AssertionError(f"unsupported token {token!r}")


def _fields(value, path):
    for field in filter(None, path.split(".")):
        value = value.get(field) if isinstance(value, dict) else getattr(value, field)
    return value
