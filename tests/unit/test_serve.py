"""`tunesmith serve` on the tiny random Llama: the official `openai` client against a real server process.

The server runs greedy (do_sample=false) with a repetition penalty that keeps the random model from repeating one
token, so replies are reproducible and long enough to cut with stop strings.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.conftest import REPO  # noqa: E402
from tunesmith import cli  # noqa: E402
from tunesmith.serve.batcher import Batcher, Delta, Failed, Finished, Job, Sampling, apply_openai_penalties  # noqa: E402

KEY = "test-key-123"
MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello there"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory) -> tuple[int, Path, int]:
    """A server process on a free port; yields (port, its log file, its process id)."""
    port = free_port()
    log_file = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "API_KEY": KEY, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tunesmith", "serve", f"model_name_or_path={tiny_model_dir}"]
    command += ["do_sample=false", "repetition_penalty=2.0", "max_new_tokens=24"]
    command += ["--port", str(port), "--served-model-name", MODEL, "--max-batch-size", "4"]
    with log_file.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log_file.read_text()
            try:
                if raw_request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("the server did not start:\n" + log_file.read_text())
        yield port, log_file, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def raw_request(port: int, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
    """(status, parsed JSON body or None, headers) for a request sent as these exact bytes."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return response.status, parsed, dict(response.getheaders())


def assert_openai_error(status: int, body, expected_status: int | None = None) -> None:
    assert 400 <= status < 500, (status, body)
    if expected_status is not None:
        assert status == expected_status, body
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]


def stream_text(client, **kwargs) -> tuple[list[str | None], dict, list]:
    """Texts by choice, usage and finish reasons of a streamed answer, checking the chunk order on the way."""
    n = kwargs.get("n", 1)
    texts, reasons, usage, roles = [""] * n, [None] * n, None, []
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        (choice,) = chunk.choices
        assert reasons[choice.index] is None, "a chunk after the finish_reason chunk"
        if choice.delta.role:
            roles.append(choice.index)
            assert texts[choice.index] == ""
        texts[choice.index] += choice.delta.content or ""
        reasons[choice.index] = choice.finish_reason
    assert sorted(roles) == list(range(n))
    return texts, usage, reasons


def test_models_and_health(server, client):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert raw_request(server[0], "GET", "/health", key=None)[:2] == (200, {"status": "ok"})


def test_streamed_and_whole_answers_match_with_exact_usage(client, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_tokens = len(tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True)["input_ids"])

    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    (choice,) = whole.choices
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 12)
    assert whole.usage.total_tokens == prompt_tokens + 12
    # The reply is what the tokenizer makes of 12 tokens: re-encoding it gives about as many tokens.
    assert abs(len(tokenizer(choice.message.content, add_special_tokens=False)["input_ids"]) - 12) <= 2

    texts, usage, reasons = stream_text(
        client, messages=HELLO, max_completion_tokens=12, stream_options={"include_usage": True}
    )
    assert texts == [choice.message.content]
    assert reasons == ["length"]
    assert usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }


def test_stop_strings_end_the_answer_and_are_not_returned(client):
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, stop=[stop, "\x00never"])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 24
    texts, _, reasons = stream_text(client, messages=HELLO, max_tokens=24, stop=stop)
    assert (texts, reasons) == ([expected], ["stop"])


def test_seed_repeats_a_sampled_answer_and_n_gives_distinct_choices(client):
    def sample(seed: int, n: int = 1):
        return client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, seed=seed, n=n
        )

    first, again, other = sample(7), sample(7), sample(8)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content

    two = sample(7, n=2)
    assert [choice.index for choice in two.choices] == [0, 1]
    assert two.choices[0].message.content == first.choices[0].message.content  # choice 0 uses the seed itself
    assert two.choices[0].message.content != two.choices[1].message.content
    assert two.usage.completion_tokens == 20
    texts, _, reasons = stream_text(client, messages=HELLO, max_tokens=10, temperature=1.0, seed=7, n=2)
    assert texts == [choice.message.content for choice in two.choices]
    assert reasons == ["length", "length"]


def test_concurrent_requests_are_batched_and_answer_as_alone(client):
    prompts = [[{"role": "user", "content": text}] for text in ("Hi", "What is the capital of France?", "2+2", "Tell")]
    alone = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=8) for m in prompts]
    together: list = [None] * len(prompts)

    def ask(index: int) -> None:
        together[index] = client.chat.completions.create(model=MODEL, messages=prompts[index], max_tokens=8)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.choices[0].message.content for a in together] == [a.choices[0].message.content for a in alone]
    assert [a.usage.prompt_tokens for a in together] == [a.usage.prompt_tokens for a in alone]


def test_api_key_is_required_on_v1(server, client):
    port = server[0]
    for key in (None, "wrong-key"):
        status, body, _ = raw_request(port, "GET", "/v1/models", key=key)
        assert_openai_error(status, body, 401)
        assert body["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices[0].message.content


def test_unsupported_fields_are_refused_by_name(client):
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    image = {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
    for field, value, param in (
        ("logit_bias", {"1": 5}, "logit_bias"),
        ("logprobs", True, "logprobs"),
        ("response_format", schema, "response_format.type"),
        ("tool_choice", "required", "tool_choice"),
        ("messages", [{"role": "user", "content": [image]}], "messages.0.content.0.type"),
        ("tools", [{"type": "function", "function": {"name": "f", "strict": True}}], "tools.0.function.strict"),
    ):
        fields = {"messages": HELLO, field: value, **({"tools": [WEATHER]} if field == "tool_choice" else {})}
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, max_tokens=2, **fields)
        assert caught.value.param == param
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"top_k": 5})
    assert caught.value.param == "top_k"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10**9)
    assert caught.value.code == "context_length_exceeded"


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_tools_need_a_template_with_a_tool_format_and_history_with_calls_renders(client):
    # The server renders with SmolLM2's own template, which cannot show tools (test_serve_smollm2.py serves one that
    # can): the request is refused naming `tools`, never answered as if the tools were seen.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER], max_tokens=2)
    assert caught.value.param == "tools" and "tool format" in caught.value.message
    # tool_choice none: the tools are not shown, so any template answers
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.tool_calls is None
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    history = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert client.chat.completions.create(model=MODEL, messages=history, max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as caught:  # a null content needs tool calls
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": None}], max_tokens=2)
    assert caught.value.param == "messages.0"


def test_json_object_answers_parse_as_json(client):
    # No message mentions JSON: the server tells the model; the random model's answers are JSON by the constraint.
    fields = {"messages": [{"role": "user", "content": "Describe a cat."}], "response_format": {"type": "json_object"}}
    fields |= {"max_tokens": 24, "temperature": 1.0, "seed": 1, "n": 2}
    whole = client.chat.completions.create(model=MODEL, **fields)
    for choice in whole.choices:
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    texts, _, reasons = stream_text(client, **fields)
    assert texts == [choice.message.content for choice in whole.choices]
    assert reasons == [choice.finish_reason for choice in whole.choices]


def test_a_body_over_the_cap_gets_413(server):
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    status, body, _ = raw_request(server[0], "POST", "/v1/chat/completions", huge)
    assert_openai_error(status, body, 413)


VALID = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
NOT_AN_INT = st.one_of(
    st.text(max_size=5), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.integers())
)
# Each entry: a field and values that are never valid for it.
BAD_VALUES = {
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=10**5), NOT_AN_INT.filter(bool)),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=9, max_value=10**12)),
    "temperature": st.one_of(st.floats(max_value=-0.001), st.floats(min_value=2.001), st.text(max_size=3)),
    "top_p": st.one_of(st.floats(max_value=0), st.floats(min_value=1.001)),
    "messages": st.one_of(
        st.just([]),
        st.lists(st.integers(), min_size=1, max_size=3),
        st.lists(
            st.fixed_dictionaries({"role": st.text(max_size=8), "content": st.text(max_size=8)}), min_size=1
        ).filter(lambda ms: any(m["role"] not in {"system", "developer", "user", "assistant", "tool"} for m in ms)),
        st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.integers()}), min_size=1, max_size=3),
        st.just([{"role": "user", "content": "hi"}] * 300),
        st.text(max_size=10),
    ),
    "stop": st.one_of(st.lists(st.text(min_size=1), min_size=5, max_size=8), st.just(""), st.integers()),
    "stream": st.one_of(st.integers(), st.text(max_size=3)),
    "seed": st.one_of(st.text(max_size=3), st.integers(min_value=2**64)),
    "model": st.one_of(st.integers(), st.none(), st.text(min_size=300, max_size=400)),
    "tools": st.one_of(
        st.integers(),
        st.lists(st.integers(), min_size=1, max_size=2),
        st.just([{"type": "function", "function": {"name": "no spaces allowed"}}]),
        st.just([{"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}}]),
        st.just([WEATHER] * 65),
    ),
    "tool_choice": st.one_of(st.just("required"), st.text(max_size=5), st.integers()),
    "response_format": st.one_of(st.text(max_size=5), st.just({"type": "xml"}), st.just({"type": "json_schema"})),
}


@st.composite
def bad_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["field", "unknown", "bytes", "not_object", "missing"]))
    body = dict(VALID)
    if kind == "field":
        field = draw(st.sampled_from(sorted(BAD_VALUES)))
        body[field] = draw(BAD_VALUES[field])
    elif kind == "unknown":
        name = draw(st.text(min_size=1, max_size=12).filter(lambda name: name not in KNOWN_FIELDS))
        body[name] = draw(st.one_of(st.integers(min_value=1), st.text(min_size=1), st.booleans()))
    elif kind == "bytes":
        raw = draw(st.binary(max_size=64))
        try:
            json.loads(raw)
        except ValueError:
            return raw
        return b"{" + raw  # valid JSON by chance: break it
    elif kind == "not_object":
        return json.dumps(draw(st.one_of(st.lists(st.integers()), st.text(), st.integers(), st.none()))).encode()
    else:
        del body[draw(st.sampled_from(["model", "messages"]))]
    return json.dumps(body).encode()


KNOWN_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop"}
KNOWN_FIELDS |= {"seed", "stream", "stream_options", "user", "presence_penalty", "frequency_penalty", "logit_bias"}
KNOWN_FIELDS |= {"logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls"}
KNOWN_FIELDS |= {"functions", "function_call", "audio", "modalities", "prediction", "reasoning_effort"}
KNOWN_FIELDS |= {"web_search_options", "service_tier", "store", "metadata"}


def resident_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_malformed_requests_get_openai_shaped_4xx_and_the_server_keeps_answering(server, client):
    port, _, pid = server
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    memory_before = resident_kib(pid)

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(bad_bodies(), st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def check(body: bytes, path: str) -> None:
        status, parsed, _ = raw_request(port, "POST", path, body)
        assert_openai_error(status, parsed)

    check()
    for body in (b"\xff\xfe{}", b"", b"{" * 10_000, b'{"model": "tiny", "messages": [' + b"[" * 5000 + b"]}"):
        status, parsed, _ = raw_request(port, "POST", "/v1/chat/completions", body)
        assert_openai_error(status, parsed, 400)
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert answer.usage.completion_tokens == 3
    assert resident_kib(pid) < 1.1 * memory_before


def test_access_log_has_one_line_per_request_and_no_prompt(server, client):
    log_file = server[1]
    secret = "my-private-question-42"
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": secret}], max_tokens=2)
    time.sleep(0.2)
    log = log_file.read_text()
    assert secret not in log
    lines = [line for line in log.splitlines() if "POST /v1/chat/completions 200" in line]
    assert lines and " out=2 " in lines[-1]


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server, client):
    port, log_file, _ = server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1900, "stream": True}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    connection.sock.close()  # gone without a word, as a killed client
    connection.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "cancelled" not in log_file.read_text():
        time.sleep(0.1)
    (line,) = [line for line in log_file.read_text().splitlines() if "cancelled" in line]
    assert int(line.split(" after ")[1].split()[0]) < 1900
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens == 2


def asgi_post(app, path: str, body: bytes) -> tuple[int, dict, dict]:
    """Send one POST straight to an ASGI app (no sockets); (status, headers, parsed body)."""
    import asyncio

    messages: list[dict] = []
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b""}
    scope |= {"headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http"}
    scope |= {"server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": "", "app": app}
    asyncio.run(app(scope, receive, send))
    start = next(message for message in messages if message["type"] == "http.response.start")
    headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
    data = b"".join(message.get("body", b"") for message in messages if message["type"] == "http.response.body")
    return start["status"], headers, json.loads(data)


def test_a_full_queue_answers_429_with_retry_after(batcher):
    from tunesmith.serve.app import CheckKeyAndLog, Engine, ServeSettings, create_app

    worker, prompt = batcher
    idle = Batcher(worker.model, worker.tokenizer, [0], max_batch_size=1, max_queue=1)  # not started: nothing drains
    idle.submit(Job(prompt, greedy(1), 1, deliver=lambda event: None, deadline=time.monotonic() + 1))
    settings = ServeSettings(model_name=MODEL, context_length=2048, default_sampling=greedy(4))
    engine = Engine(lambda messages, tools: "hi", worker.tokenizer, idle)
    app = CheckKeyAndLog(create_app(engine, settings), api_key=None)
    status, headers, body = asgi_post(app, "/v1/chat/completions", json.dumps(VALID).encode())
    assert_openai_error(status, body, 429)
    assert headers["retry-after"] == "1"
    assert body["error"]["code"] == "queue_full"


def test_a_missing_serve_extra_is_named(tiny_model_dir, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a)
    )
    assert cli.main(["serve", f"model_name_or_path={tiny_model_dir}"]) == 2
    assert "tunesmith[serve]" in capsys.readouterr().err


def test_a_public_host_without_a_key_is_refused(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("API_KEY", raising=False)
    assert cli.main(["serve", f"model_name_or_path={tiny_model_dir}", "--host", "0.0.0.0"]) == 2
    assert "--allow-no-key" in capsys.readouterr().err


# The batcher alone, in this process: cancellation, timeout and a full queue.


@pytest.fixture(scope="module")
def batcher(tiny_model_dir: Path):
    from tunesmith.chat.engine import load_chat_engine
    from tunesmith.config.sections import ModelSection

    engine = load_chat_engine(ModelSection(model_name_or_path=str(tiny_model_dir)))
    worker = Batcher(engine.model, engine.tokenizer, [engine.tokenizer.eos_token_id], max_batch_size=4, max_queue=2)
    worker.start()
    yield worker, engine.tokenizer("Hello")["input_ids"]
    worker.stop()


def run_job(batcher: Batcher, job_kwargs: dict, on_event=None, wait: float = 30.0) -> list:
    events, done = [], threading.Event()

    def deliver(event) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event, job)
        if isinstance(event, Finished | Failed):
            done.set()

    job = Job(deliver=deliver, **job_kwargs)
    batcher.submit(job)
    done.wait(wait)
    return events


def greedy(max_new_tokens: int) -> Sampling:
    return Sampling(max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=2.0, seed=None)


def test_a_cancelled_job_stops_at_the_next_step(batcher):
    worker, prompt = batcher

    events: list = []

    def record_and_cancel_after_three(event, job) -> None:
        events.append(event)
        if sum(isinstance(seen, Delta) for seen in events) >= 3:
            job.cancelled.set()

    job_kwargs = {"prompt_ids": prompt, "sampling": greedy(1000), "n": 1, "deadline": time.monotonic() + 60}
    run_job(worker, job_kwargs, record_and_cancel_after_three, wait=1)
    # Without the cancel flag the job would run to 1000 tokens; with it, nothing follows the step that set it.
    assert not any(isinstance(event, Finished) for event in events)
    assert sum(isinstance(event, Delta) for event in events) == 3


def test_a_job_past_its_deadline_fails_with_504(batcher):
    worker, prompt = batcher
    events = run_job(worker, {"prompt_ids": prompt, "sampling": greedy(5), "n": 1, "deadline": time.monotonic()})
    assert isinstance(events[-1], Failed) and events[-1].status == 504


def test_text_completions_stream_and_whole_match(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    (choice,) = whole.choices
    assert choice.finish_reason == "length" and choice.text
    assert whole.usage.completion_tokens == 8
    pieces, reasons = [], []
    for chunk in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == choice.text
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", echo=True)
    assert caught.value.param == "echo"


def test_openai_penalties_subtract_per_generated_token():
    logits = torch.zeros(5)
    apply_openai_penalties(logits, [1, 3, 3], presence=0.5, frequency=0.25)
    assert logits.tolist() == [0.0, -0.75, 0.0, -1.0, 0.0]  # the prompt is not counted; 3 twice: 0.5 + 2 * 0.25


def test_penalties_change_a_greedy_answer(client):
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12).choices[0].message.content
    repeat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, frequency_penalty=-2.0)
    assert repeat.choices[0].message.content != plain
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, presence_penalty=3.0)
    assert caught.value.param == "presence_penalty"


def test_listening_rules(monkeypatch, tiny_model_dir, capsys):
    from tunesmith.errors import ConfigError
    from tunesmith.serve.command import check_listen

    check_listen("127.0.0.1", None, False)
    check_listen("::1", None, False)
    check_listen("0.0.0.0", "a-key", False)
    check_listen("0.0.0.0", None, True)
    assert "without an API key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--allow-no-key"):
        check_listen("example.org", None, False)
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    monkeypatch.delenv("API_KEY", raising=False)
    assert cli.main(["serve", f"model_name_or_path={tiny_model_dir}"]) == 2  # the env name is read, and refused


def test_a_request_joins_a_running_batch_and_both_answer_as_alone(batcher, tiny_model_dir):
    from transformers import AutoTokenizer

    worker, _ = batcher
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_prompt = tokenizer("Tell me a very long story about a dragon")["input_ids"]
    short_prompt = tokenizer("Hi")["input_ids"]

    def text_of(events: list) -> str:
        return "".join(event.text for event in events if isinstance(event, Delta | Finished))

    def job(prompt: list[int], tokens: int, events: list, done: threading.Event, on_delta=None) -> Job:
        def deliver(event) -> None:
            events.append(event)
            if on_delta is not None and isinstance(event, Delta):
                on_delta()
            if isinstance(event, Finished | Failed):
                done.set()

        return Job(prompt, greedy(tokens), 1, deliver=deliver, deadline=time.monotonic() + 60)

    alone = {}
    for name, prompt, tokens in (("long", long_prompt, 200), ("short", short_prompt, 6)):
        events, done = [], threading.Event()
        worker.submit(job(prompt, tokens, events, done))
        assert done.wait(30)
        alone[name] = text_of(events)

    long_events, short_events, long_done, short_done = [], [], threading.Event(), threading.Event()
    long_at_short_end: list[bool] = []
    short_job = job(short_prompt, 6, short_events, short_done)
    submitted = threading.Event()

    def submit_short_once() -> None:  # while the long answer is under way
        if len(long_events) == 5 and not submitted.is_set():
            submitted.set()
            worker.submit(short_job)

    worker.submit(job(long_prompt, 200, long_events, long_done, submit_short_once))
    assert short_done.wait(30)
    long_at_short_end.append(long_done.is_set())
    assert long_done.wait(30)
    assert long_at_short_end == [False]  # the short answer did not wait for the long one
    assert text_of(short_events) == alone["short"]
    assert text_of(long_events) == alone["long"]
