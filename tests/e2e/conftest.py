"""Fixtures the SmolLM2 end-to-end tests share: one identity training run per test session."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session")
def identity_run(tmp_path_factory) -> Path:
    """The README's command, with the output in a temporary folder; test_identity.py checks it, test_serve_smollm2.py
    serves it."""
    output_dir = tmp_path_factory.mktemp("identity") / "identity_lora"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "train",
            "examples/identity_lora.yaml",
            "name=Tunesmith",
            "author=the tunesmith team",
            f"output_dir={output_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output_dir
