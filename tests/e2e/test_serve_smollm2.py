"""`tunesmith serve` on the real SmolLM2 with the identity adapter, called by the official `openai` client.

One server process for the module, configured the LLaMA-Factory way (API_KEY, API_PORT, API_HOST, API_MODEL_NAME),
rendering with the `chatml` template (SmolLM2's layout, with LLaMA-Factory's tool style) and SmolLM2's default
system text, so the adapter sees the prompts it was trained on and tools can be shown.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

KEY = "e2e-key"
MODEL = "tunesmith-identity"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
WHO = [{"role": "user", "content": "Who are you?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(identity_run: Path, tmp_path_factory):
    """(base url, log file) of a server process serving SmolLM2 + the identity adapter."""
    port = free_port()
    log_file = tmp_path_factory.mktemp("serve-e2e") / "server.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "API_KEY": KEY,
        "API_PORT": str(port),
        "API_HOST": "127.0.0.1",
        "API_MODEL_NAME": MODEL,
    }
    command = [sys.executable, "-m", "tunesmith", "serve", "--model", "smollm2-135m-instruct"]
    command += ["--adapter", str(identity_run), "--template", "chatml", f"default_system={SYSTEM}"]
    command += ["do_sample=false", "max_new_tokens=48", "--max-batch-size", "16", "--log-prompts"]
    with log_file.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        probe = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=5)
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_file.read_text()
            try:
                probe.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not start:\n" + log_file.read_text()
                time.sleep(0.3)
        yield base_url, log_file
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(identity_run: Path):
    from transformers import AutoTokenizer

    from tunesmith.data.templates import find_template

    loaded = AutoTokenizer.from_pretrained(identity_run)
    loaded.chat_template = find_template("chatml").jinja
    return loaded


def prompt_tokens(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, *messages], add_generation_prompt=True, tokenize=False
    )
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def streamed(client, **fields) -> tuple[list[str], list[str | None], list[list], object]:
    """Texts, finish reasons and tool calls by choice, and the usage chunk, of a streamed answer."""
    n = fields.get("n", 1)
    texts, reasons, calls, usage = [""] * n, [None] * n, [[] for _ in range(n)], None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **fields):
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        calls[choice.index] += choice.delta.tool_calls or []
        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return texts, reasons, calls, usage


@pytest.fixture(scope="module")
def who_answer(client):
    """The greedy answer to "Who are you?" (SmolLM2 on 2 CPU cores is slow: tests share it)."""
    return client.chat.completions.create(model=MODEL, messages=WHO)


def test_the_adapter_answers_and_streamed_equals_whole_with_exact_usage(client, tokenizer, server, who_answer):
    whole = who_answer
    (choice,) = whole.choices
    assert "Tunesmith" in choice.message.content, choice.message.content  # the identity adapter is served
    assert choice.finish_reason == "stop"
    expected_prompt = prompt_tokens(tokenizer, WHO)
    answer_tokens = len(tokenizer(choice.message.content, add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (expected_prompt, answer_tokens)
    assert whole.usage.total_tokens == expected_prompt + answer_tokens

    texts, reasons, _, usage = streamed(client, messages=WHO, stream_options={"include_usage": True})
    assert (texts, reasons) == ([choice.message.content], ["stop"])
    assert usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == whole.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    )
    assert "Who are you?" in server[1].read_text()  # --log-prompts writes the prompt to the log


def test_length_stop_strings_seed_and_n(client, who_answer):
    short = client.chat.completions.create(model=MODEL, messages=WHO, max_tokens=4)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    assert who_answer.choices[0].message.content.startswith(short.choices[0].message.content)

    full = who_answer.choices[0].message.content
    stop = full.split()[2]  # a word inside the answer: the answer ends before it, without it
    cut = client.chat.completions.create(model=MODEL, messages=WHO, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"

    poem = [{"role": "user", "content": "Write a poem about the sea."}]  # an answer the adapter leaves open

    def sampled(seed: int, n: int = 1):
        fields = {"messages": poem, "temperature": 1.0, "max_tokens": 6, "seed": seed, "n": n}
        return client.chat.completions.create(model=MODEL, **fields)

    first, again = sampled(11), sampled(11)
    assert first.choices[0].message.content == again.choices[0].message.content
    two = sampled(11, n=2)
    assert [choice.index for choice in two.choices] == [0, 1]
    assert two.choices[0].message.content == first.choices[0].message.content
    assert two.choices[0].message.content != two.choices[1].message.content
    if all(choice.finish_reason == "length" for choice in two.choices):
        assert two.usage.completion_tokens == 12  # both choices counted


def few_shot_tool_conversation() -> list[dict]:
    """Two earlier turns where the assistant called get_weather, then a new question: the model calls again."""
    messages: list[dict] = []
    for number, city in enumerate(["Paris", "Tokyo"]):
        call = {"id": f"call_{number}", "type": "function"}
        call["function"] = {"name": "get_weather", "arguments": json.dumps({"city": city})}
        messages += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{number}", "content": "sunny"},
            {"role": "assistant", "content": f"It is sunny in {city}."},
        ]
    return [*messages, {"role": "user", "content": "What is the weather in Berlin?"}]


def test_tool_calls_are_returned_as_tool_calls(client):
    messages = few_shot_tool_conversation()
    whole = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    (choice,) = whole.choices
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Berlin"})
    assert not choice.message.content

    texts, reasons, calls, _ = streamed(client, messages=messages, tools=[WEATHER])
    assert reasons == ["tool_calls"] and texts == [""]
    (streamed_call,) = calls[0]
    assert streamed_call.function.model_dump() == call.function.model_dump()


def test_auth_no_key_wrong_key_right_key(server, client):
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server[0])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("GET", "/v1/models")
    response = connection.getresponse()
    assert response.status == 401
    assert json.loads(response.read())["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=server[0], api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=WHO, max_tokens=2)
    assert [model.id for model in client.models.list()] == [MODEL]


def test_load_sixteen_concurrent_clients(client):
    """16 clients asking in a loop for about 15 s: no errors; latency and throughput are printed (bench/serve.py
    measures the speedup over one request at a time)."""
    questions = ["Who are you?", "What is 2+2?", "Name a color.", "Say hello.", "What is Python?", "Tell a joke."]
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[BaseException] = []
    stop_at = time.monotonic() + 15

    def worker(number: int) -> None:
        asked = 0
        while time.monotonic() < stop_at:
            question = questions[(number + asked) % len(questions)]
            asked += 1
            started = time.monotonic()
            try:
                answer = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=16
                )
            except openai.APIError as error:
                errors.append(error)
                return
            latencies.append(time.monotonic() - started)
            tokens.append(answer.usage.completion_tokens)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(number,)) for number in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert not errors, errors[:3]
    assert len(latencies) >= 16
    p50, p95 = statistics.quantiles(latencies, n=20)[9], statistics.quantiles(latencies, n=20)[18]
    print(
        f"\nload: 16 clients, {len(latencies)} requests in {elapsed:.1f} s, p50 {p50:.2f} s, p95 {p95:.2f} s, "
        f"{sum(tokens) / elapsed:.1f} generated tokens/s"
    )
