"""Function calls read back from each template's tool style, and the JSON-object constraint (no server process)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.data.templates import TEMPLATES, find_template
from tunesmith.data.templates.jinja_source import TEMPLATE_DIR
from tunesmith.serve.batcher import Batcher, Finished, Job, Sampling
from tunesmith.serve.json_mode import JsonPrefix
from tunesmith.serve.tools import TOOL_STYLES, parse_tool_calls, tool_style

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}
CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
]
QUESTION = [{"role": "user", "content": "Weather in Paris and Zürich?"}]


def included_style(name: str) -> str:
    """The tool style a named template includes (its `tools_*.jinja` part)."""
    return re.search(r'include "tools_(\w+)\.jinja"', (TEMPLATE_DIR / f"{name}.jinja").read_text())[1]


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_tool_style_is_recognised(name):
    assert tool_style(find_template(name).jinja) == included_style(name)


def test_a_template_without_tools_has_no_style(tiny_model_dir):
    from transformers import AutoTokenizer

    assert tool_style(AutoTokenizer.from_pretrained(tiny_model_dir).chat_template) is None  # SmolLM2's own
    assert set(TOOL_STYLES) == {included_style(name) for name in TEMPLATES}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("name", TEMPLATES)
def test_calls_the_template_writes_parse_back(name, tokenizer):
    """The assistant turn a template renders for tool calls (what a model trained on it answers) is parsed back
    into the same calls; history with a tool result renders too."""
    template = find_template(name)
    style = tool_style(template.jinja)
    calls = CALLS[:1] if style == "glm4" else CALLS  # GLM-4's style has one call per turn
    tokenizer.chat_template = template.jinja

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(
            messages, tools=[WEATHER], add_generation_prompt=generation_prompt, tokenize=False, date_string="1 Jan"
        )

    prompt = render(QUESTION, True)
    assert "get_weather" in prompt  # the tool definitions are shown
    answer = {"role": "assistant", "content": None, "tool_calls": calls}
    whole = render([*QUESTION, answer], False)
    assert whole.startswith(prompt)
    text = whole[len(prompt) :]
    # generation stops at the end token (GLM-4 models also stop at <|observation|>, in their generation config)
    for end in (template.end_of_turn, tokenizer.eos_token, "<|observation|>"):
        if end and end in text:
            text = text[: text.index(end)]
    content, parsed = parse_tool_calls(style, text, {"get_weather"})
    assert [(call.name, json.loads(call.arguments)) for call in parsed] == [
        (call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls
    ]
    assert not content
    tool_result = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}
    assert "sunny, 21 C" in render([*QUESTION, answer, tool_result], True)


@pytest.mark.parametrize(
    ("style", "text"),
    [
        ("qwen", "The weather is nice."),
        ("qwen", '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>'),
        ("qwen", "<tool_call>\n{not json}\n</tool_call>"),
        ("llama3", '{"name": "get_weather"'),
        ("mistral", '[{"name": "get_weather", "arguments": [1]}]'),
        ("default", "Action: get_weather\nAction Input: city=Paris"),
        ("glm4", "get_weather\nParis"),
    ],
)
def test_text_that_is_not_a_call_stays_text(style, text):
    assert parse_tool_calls(style, text, {"get_weather"}) == (text, [])


def test_text_before_calls_is_the_content():
    content, calls = parse_tool_calls(
        "qwen", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}', {"get_weather"}
    )
    assert content == "Let me check."
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Oslo"})]


# The JSON-object constraint.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=5), st.sampled_from([None, 2]), st.booleans())
def test_every_prefix_of_a_json_object_is_accepted_and_completes(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    state = JsonPrefix()
    for end in range(len(text)):
        state = state.feed(text[end])
        assert state is not None, text[: end + 1]
        if end < len(text) - 1:
            assert not state.done
            assert isinstance(json.loads(text[: end + 1] + state.completion()), dict)
    assert state.done


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='{}[]":,. -+0123456789eEtruefalsn\\\nab', max_size=24))
def test_accepted_text_completes_to_json_and_refused_text_is_not_json(text):
    state = JsonPrefix().feed(text)
    if state is None and text[:1] not in (" ", "\n"):  # the answer must start with its `{`
        with pytest.raises(ValueError):
            if not isinstance(json.loads(text), dict):
                raise ValueError("not an object")
    elif state is not None:
        assert isinstance(json.loads(text + state.completion()), dict)


@pytest.fixture(scope="module")
def batcher(tiny_model_dir):
    from tunesmith.chat.engine import load_chat_engine
    from tunesmith.config.sections import ModelSection

    engine = load_chat_engine(ModelSection(model_name_or_path=str(tiny_model_dir)))
    worker = Batcher(engine.model, engine.tokenizer, [engine.tokenizer.eos_token_id], max_batch_size=4, max_queue=8)
    worker.start()
    yield worker, engine.tokenizer
    worker.stop()


def answers(worker: Batcher, prompt: list[int], sampling: Sampling, n: int) -> list[Finished | str]:
    texts, finished, done = [""] * n, {}, threading.Event()

    def deliver(event) -> None:
        texts[event.index] += getattr(event, "text", "")
        if isinstance(event, Finished):
            finished[event.index] = event
            if len(finished) == n:
                done.set()

    worker.submit(Job(prompt, sampling, n, deliver, deadline=time.monotonic() + 120))
    assert done.wait(120)
    return [(texts[index], finished[index].reason) for index in range(n)]


def test_json_mode_makes_a_random_model_answer_json_objects(batcher):
    worker, tokenizer = batcher
    prompt = tokenizer("Describe a cat as JSON:")["input_ids"]

    def sampling(json_object: bool, temperature: float, max_new_tokens: int = 24) -> Sampling:
        return Sampling(max_new_tokens, temperature, 1.0, 0, 1.3, seed=3, json_object=json_object)

    (free,) = answers(worker, prompt, sampling(False, 0.0), 1)
    with pytest.raises(ValueError):  # without the constraint the random model's text is not JSON
        json.loads(free[0])
    constrained = answers(worker, prompt, sampling(True, 0.0), 1) + answers(worker, prompt, sampling(True, 1.0), 3)
    constrained += answers(worker, prompt, sampling(True, 1.0, max_new_tokens=6), 2)  # closed within the limit
    for text, _ in constrained:
        assert isinstance(json.loads(text), dict), text
    assert len({text for text, _ in constrained}) > 2  # sampling still samples


# infer_backend: vllm, and chat templates read from files.


def test_vllm_backend_is_refused_clearly_where_it_cannot_run(tiny_model_dir, capsys):
    import importlib.util

    import torch

    from tunesmith import cli

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are here: the backend would start")
    assert cli.main(["serve", f"model_name_or_path={tiny_model_dir}", "infer_backend=vllm"]) == 2
    error = capsys.readouterr().err
    reason = "not installed" if importlib.util.find_spec("vllm") is None else "needs a CUDA GPU"
    assert "`infer_backend: vllm`" in error and reason in error, error
    # the other commands generate with transformers only, and say so before loading anything
    assert cli.main(["chat", "--model", "/no/such/model", "infer_backend=vllm", "--prompt", "hi"]) == 2
    assert "only `tunesmith serve` has it" in capsys.readouterr().err


class ScriptedVllmEngine:
    """vLLM's LLMEngine surface that VllmBackend uses (add_request, step, abort_request), replaying scripted
    cumulative outputs, as vLLM's default output kind reports them; vLLM itself needs a GPU."""

    def __init__(self, script: list[list[tuple[str, int, str | None]]]):
        self.script, self.requests, self.aborted = script, [], []

    def add_request(self, request_id, prompt, params, lora_request=None):
        self.requests.append((request_id, prompt, params, lora_request))

    def abort_request(self, request_ids):
        self.aborted += request_ids

    def step(self):
        from types import SimpleNamespace

        if not self.script:
            time.sleep(0.01)
            return []
        outputs = [
            SimpleNamespace(index=index, text=text, token_ids=[0] * tokens, finish_reason=reason)
            for index, (text, tokens, reason) in enumerate(self.script.pop(0))
        ]
        finished = all(output.finish_reason for output in outputs)
        return [SimpleNamespace(request_id=self.requests[-1][0], outputs=outputs, finished=finished)]


def test_vllm_backend_turns_cumulative_outputs_into_the_batchers_events(monkeypatch):
    from tunesmith.serve import vllm_backend

    monkeypatch.setattr(vllm_backend, "sampling_params", lambda job, skip: ("params", job.n))
    script = [
        [("Hel", 1, None), ("A", 1, None)],
        [("Hello", 2, None), ("A\ufffd", 2, None)],  # half a character is held back
        [("Hello!", 3, "stop"), ("Aé b", 3, None)],
        [("Hello!", 3, "stop"), ("Aé bc", 4, "length")],
    ]
    engine = ScriptedVllmEngine(script)
    backend = vllm_backend.VllmBackend(engine, lora_request="the-lora", max_queue=2)
    events, done = [], threading.Event()

    def deliver(event) -> None:
        events.append(event)
        if sum(isinstance(seen, Finished) for seen in events) == 2:
            done.set()

    sampling = Sampling(8, 0.0, 1.0, 0, 1.0, None)
    backend.start()
    try:
        backend.submit(Job([1, 2, 3], sampling, 2, deliver, deadline=time.monotonic() + 30, label="r1"))
        assert done.wait(10)
    finally:
        backend.stop()
    ((_, prompt, params, lora),) = engine.requests
    assert (prompt, params, lora) == ({"prompt_token_ids": [1, 2, 3]}, ("params", 2), "the-lora")
    by_choice = {index: [event for event in events if event.index == index] for index in (0, 1)}
    assert "".join(event.text for event in by_choice[0]) == "Hello!"
    assert "".join(event.text for event in by_choice[1]) == "Aé bc"
    assert all("\ufffd" not in event.text for event in events)
    assert [(event.reason, event.completion_tokens) for event in events if isinstance(event, Finished)] == [
        ("stop", 3),
        ("length", 4),
    ]


def test_a_chat_template_file_renders_in_the_sandbox(tmp_path, tokenizer):
    import jinja2.exceptions

    from tunesmith.data.templates import install_chat_format, resolve_chat_format

    hostile = tmp_path / "hostile.jinja"
    hostile.write_text(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    install_chat_format(tokenizer, resolve_chat_format(str(hostile), tokenizer))
    with pytest.raises(jinja2.exceptions.SecurityError):
        tokenizer.apply_chat_template(QUESTION, tokenize=False)


def test_json_rows_never_take_special_tokens(tokenizer):
    from tunesmith.serve.json_mode import TokenTexts

    # Printed as text (skip_special_tokens: false), `<|im_end|>` would be valid inside a JSON string, yet generating
    # it ends the answer there: a JSON row must not take it before the object is complete.
    texts = TokenTexts(tokenizer, skip_special_tokens=False).texts
    assert all(texts[token] is None for token in tokenizer.all_special_ids)
    assert texts[tokenizer.convert_tokens_to_ids("{")] == "{"
