"""Generated tokens/s of `tunesmith serve` with 1, 4 and 16 concurrent clients, batched vs one request at a time.

    python -m bench.serve [--model smollm2-135m-instruct] [--seconds 20] [--max-tokens 32] [--clients 1,4,16]
                          [--batch-size 16] [--threads 2] [--json out.json]

Two real server processes, one after the other, on the same model and settings (greedy, `--max-tokens` per
answer): `batched` (`--max-batch-size` = `--batch-size`) and `one at a time` (`--max-batch-size 1`, how
LLaMA-Factory's API serves: one generation at a time, the others wait). For each number of clients, every client
thread sends chat requests back to back for `--seconds`; generated tokens are the servers' own `usage` counts.
Printed per row: requests, errors, generated tokens/s over the window, and p50/p95 request latency; then the
batched/one-at-a-time ratio per client count. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for learning a new language.",
    "Who wrote Pride and Prejudice?",
    "What is 17 times 23?",
    "Describe the water cycle.",
    "Name a few uses of Python.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, body: dict) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {data}")
    return data


def start_server(model: str, batch_size: int, threads: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    env.pop("API_KEY", None)
    command = [sys.executable, "-m", "tunesmith", "serve", f"model_name_or_path={model}", "do_sample=false"]
    command += ["--port", str(port), "--served-model-name", "bench", "--max-batch-size", str(batch_size)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited:\n" + log_path.read_text())
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("the server did not start:\n" + log_path.read_text())


def measure(port: int, clients: int, seconds: float, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens, errors = [0], [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(number: int) -> None:
        turn = number
        while time.monotonic() < end:
            question = QUESTIONS[turn % len(QUESTIONS)]
            turn += clients
            body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
            started = time.monotonic()
            try:
                answer = post(port, body)
            except (RuntimeError, OSError):
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.monotonic() - started)
                tokens[0] += answer["usage"]["completion_tokens"]

    started = time.monotonic()
    workers = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started  # includes the requests still running at the end of the window
    ordered = sorted(latencies) or [float("nan")]
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "tokens_per_s": tokens[0] / elapsed,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(count) for count in args.clients.split(",")]

    results: dict[str, list[dict]] = {}
    for name, batch_size in (("batched", args.batch_size), ("one at a time", 1)):
        log_path = Path(f"/tmp/bench-serve-{batch_size}.log")
        process, port = start_server(args.model, batch_size, args.threads, log_path)
        try:
            post(port, {"model": "bench", "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})
            results[name] = [measure(port, count, args.seconds, args.max_tokens) for count in counts]
        finally:
            process.terminate()
            process.wait(timeout=60)
        for row in results[name]:
            print(
                f"{name:>14} clients={row['clients']:>3} requests={row['requests']:>4} errors={row['errors']} "
                f"tokens/s={row['tokens_per_s']:7.1f} p50={row['p50_s']:.2f}s p95={row['p95_s']:.2f}s",
                flush=True,
            )
    for batched, single in zip(results["batched"], results["one at a time"], strict=True):
        ratio = batched["tokens_per_s"] / single["tokens_per_s"]
        print(f"clients={batched['clients']:>3}: batched / one at a time = {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
