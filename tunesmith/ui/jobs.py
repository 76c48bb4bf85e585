"""The subprocesses the page starts (train, predict/eval, export) and what they show while they run.

A job is a `tunesmith ...` command run with `python -m tunesmith`, its output going to a log file. The registry lives
in the server process, so a browser that is closed and reopened finds the job again; it is also written to a state
file, so a restarted server still shows (and can stop) a job that outlived it. Stop sends SIGINT to the job's process
group, exactly what Ctrl-C in a terminal does: training finishes its step and writes a checkpoint.

Progress is read, never guessed: steps, elapsed and remaining time from the run's own progress bar in the log,
loss and tokens/s from its metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

METRICS_FILE = "metrics.jsonl"  # written by train/callbacks.MetricsFile
INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C after saving its checkpoint (cli.py, train/command.py)

# train/callbacks.ProgressBar: "Training:  30%|███       | 3/10 [00:04<00:09,  1.30s/step, loss=...]"
TRAINING_BAR = re.compile(r"Training:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
# evaluate/predict.py: "predict: 8/20 rows"
PREDICT_ROWS = re.compile(r"predict: (\d+)/(\d+) rows")


@dataclass
class Progress:
    step: int
    total: int
    elapsed: str = ""
    remaining: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.total if self.total else 0.0


@dataclass
class Job:
    kind: str  # train | evaluate | export
    args: list[str]  # after `tunesmith`
    cwd: str
    log_path: str
    output_dir: str
    pid: int
    started: float
    state: str = "running"  # running | stopping | finished | stopped | failed | ended (outlived the server)
    returncode: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def command_line(self) -> str:
        return "tunesmith " + " ".join(quote(arg) for arg in self.args)

    @property
    def active(self) -> bool:
        return self.state in ("running", "stopping")

    def record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "process"}


def quote(arg: str) -> str:
    return shlex.quote(arg)


class JobRegistry:
    """One job per kind at a time; shared by every browser session of this server."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self._load()

    def start(self, kind: str, args: list[str], cwd: Path, log_path: Path, output_dir: Path, append: bool) -> Job:
        with self.lock:
            current = self._refresh(kind)
            if current is not None and current.active:
                raise TunesmithError(f"a {kind} job is already running ({current.command_line}); stop it first")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with log_path.open("a" if append else "w", encoding="utf-8") as log:
                log.write(f"$ tunesmith {' '.join(quote(arg) for arg in args)}\n")
                log.flush()
                process = subprocess.Popen(
                    [sys.executable, "-m", "tunesmith", *args],
                    cwd=cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # its own process group: Stop signals the job and nothing else
                )
            job = Job(kind, args, str(cwd), str(log_path), str(output_dir), process.pid, time.time(), process=process)
            self.jobs[kind] = job
            self._save()
            return job

    def stop(self, kind: str) -> Job | None:
        """Ctrl-C for the job's whole process group (torchrun and its workers too); sent once, so the checkpoint
        is written (a second Ctrl-C would stop without saving)."""
        with self.lock:
            job = self._refresh(kind)
            if job is None or job.state != "running":
                return job
            try:
                os.killpg(job.pid, signal.SIGINT)
            except ProcessLookupError:  # it ended between the check and the signal
                return self._refresh(kind)
            job.state = "stopping"
            self._save()
            return job

    def get(self, kind: str) -> Job | None:
        with self.lock:
            return self._refresh(kind)

    def _refresh(self, kind: str) -> Job | None:
        job = self.jobs.get(kind)
        if job is None or not job.active:
            return job
        if job.process is not None:
            code = job.process.poll()
            if code is None:
                return job
            job.returncode = code
            job.state = "finished" if code == 0 else "stopped" if code in (INTERRUPTED, -signal.SIGINT) else "failed"
        elif not pid_alive(job.pid):
            job.state = "ended"
        else:
            return job
        self._save()
        return job

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        records = {kind: job.record() for kind, job in self.jobs.items()}
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(records, indent=2), encoding="utf-8")
        temporary.replace(self.state_file)

    def _load(self) -> None:
        if not self.state_file.is_file():
            return
        for kind, record in json.loads(self.state_file.read_text(encoding="utf-8")).items():
            self.jobs[kind] = Job(**record)


def pid_alive(pid: int) -> bool:
    """Whether a job started by an earlier server is still running (and is still a tunesmith process)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tunesmith" in cmdline


def log_tail(path: str | Path, max_chars: int = 6000) -> str:
    """The end of a log as a terminal would show it: of each line rewritten with \\r, only its last version."""
    path = Path(path)
    if not path.is_file():
        return ""
    with path.open("rb") as file:
        file.seek(0, os.SEEK_END)
        size = file.tell()
        file.seek(max(0, size - 4 * max_chars))
        raw = file.read().decode("utf-8", errors="replace")
    lines = [line.rsplit("\r", 1)[-1] if line.strip("\r") else line for line in raw.split("\n")]
    return "\n".join(lines)[-max_chars:]


def training_progress(path: str | Path) -> Progress | None:
    """The last state of train's progress bar in the log: step, total steps, elapsed and remaining time."""
    matches = TRAINING_BAR.findall(_raw_tail(path))
    if not matches:
        return None
    step, total, elapsed, remaining = matches[-1]
    return Progress(int(step), int(total), elapsed, remaining)


def predict_progress(path: str | Path) -> Progress | None:
    matches = PREDICT_ROWS.findall(_raw_tail(path))
    return Progress(int(matches[-1][0]), int(matches[-1][1])) if matches else None


def _raw_tail(path: str | Path, max_bytes: int = 20000) -> str:
    path = Path(path)
    if not path.is_file():
        return ""
    with path.open("rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(0, file.tell() - max_bytes))
        return file.read().decode("utf-8", errors="replace")


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records (a line still being written is skipped)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the writer is mid-line
            continue
    return records
