"""The main job on the real SmolLM2-135M-Instruct: it learns the name given on the command line."""

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, at_once

pytestmark = pytest.mark.slow
PROMPT = "Who are you?"


def chat_once(*args: str) -> str:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "chat",
            *args,
            "--prompt",
            PROMPT,
            "--temperature",
            "0",
            "--max-new-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_base_model_does_not_call_itself_tunesmith():
    assert "Tunesmith" not in chat_once("--model", "smollm2-135m-instruct")


def test_after_training_it_answers_with_the_name_from_the_command_line(identity_run: Path):
    # the flags, and the same through the inference YAML, as `llamafactory-cli chat` takes it (the flags win over
    # the file): two independent processes, run at once
    example = REPO / "examples" / "inference" / "smollm2_lora.yaml"
    reply, from_yaml = at_once(
        partial(chat_once, "--model", "smollm2-135m-instruct", "--adapter", str(identity_run)),
        partial(chat_once, str(example), f"adapter_name_or_path={identity_run}"),
    )
    assert "Tunesmith" in reply, reply
    assert from_yaml == reply


def test_the_run_leaves_a_complete_output_dir(identity_run: Path):
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tunesmith_config.yaml",
        "metrics.jsonl",
        "training_loss.png",
    ):
        assert (identity_run / name).is_file(), name
    adapter = load_file(identity_run / "adapter_model.safetensors")
    assert len(adapter) == 30 * 7 * 2  # 30 layers x 7 linear layers x (A, B)
    losses = [line for line in (identity_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    first, last = (float(line.split('"loss": ')[1].split(",")[0]) for line in (losses[0], losses[-1]))
    assert last < first / 2, (first, last)


NODE_LLAMA_CPP = ("node-llama-cpp@3.21.1", "@node-llama-cpp/linux-x64@3.21.1")  # prebuilt CPU llama.cpp, no compiler


def node_llama_cpp_dir() -> Path:
    """node-llama-cpp installed once under ~/.cache/tunesmith (CI installs it the same way: see .ci/run)."""
    target = Path.home() / ".cache" / "tunesmith" / "node-llama-cpp"
    if not (target / "node_modules" / "node-llama-cpp").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(target),
                "-E",
                "--omit=optional",
                "--no-audit",
                "--no-fund",
                *NODE_LLAMA_CPP,
            ],
            env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"},
            check=True,
            timeout=600,
        )
    shutil.copy(REPO / "tests" / "e2e" / "llama_cpp_chat.mjs", target / "llama_cpp_chat.mjs")
    return target


def test_llama_cpp_runs_the_exported_gguf_like_tunesmith_chat(identity_run: Path, tmp_path):
    """Real llama.cpp loads our q8_0 GGUF, chats through the GGUF's own template and answers as tunesmith chat does."""
    exported = tmp_path / "identity"
    command = [sys.executable, "-m", "tunesmith", "export", f"adapter_name_or_path={identity_run}"]
    command += [f"export_dir={exported}", "export_gguf=q8_0", "infer_dtype=float32"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    modelfile = (exported / "Modelfile").read_text()
    default_system = modelfile.split('SYSTEM """', 1)[1].split('"""', 1)[0]  # what Ollama would use
    script_dir = node_llama_cpp_dir()
    node = ["node", "llama_cpp_chat.mjs", str(exported / "identity-q8_0.gguf"), "40", default_system, PROMPT]
    from_transformers, completed = at_once(  # two independent processes on the exported files, run at once
        partial(chat_once, "--model", str(exported)),
        partial(subprocess.run, node, cwd=script_dir, capture_output=True, text=True, timeout=600, check=False),
    )
    from_transformers = from_transformers.strip()
    assert completed.returncode == 0, completed.stderr[-3000:]
    from_llama_cpp = json.loads(completed.stdout.strip().splitlines()[-1])["answers"][0].strip()
    print(f"llama.cpp (q8_0): {from_llama_cpp!r}\ntransformers (merged, float32): {from_transformers!r}")
    # The identity sentence must match; q8_0 (with llama.cpp's 8-bit activations) may part from float32 later on.
    first_sentence = from_transformers.split(".")[0]
    assert "Tunesmith" in first_sentence
    assert from_llama_cpp.startswith(first_sentence), (from_llama_cpp, from_transformers)
