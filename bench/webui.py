"""Screenshots of every tab of `tunesmith webui`, and what the UI costs a run: time and memory.

    python -m bench.webui [--screenshots DIR] [--steps 10]

Starts the server on 127.0.0.1 and drives it with headless Chromium (Debian's /usr/bin/chromium, Playwright), then:
- writes a screenshot of each tab (the Train tab after a finished run, the Data tab with its preview) into DIR;
- times Start → the first progress line on the page, against the same YAML run by `tunesmith train` in a terminal
  (launch → the first progress line in its output): the difference is what the UI adds;
- samples the resident memory of the UI process and of the run's process tree every 0.2 s: the run is a subprocess,
  so the UI adds its own (constant) memory, never a share of the run's.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TABS = {"train": "Train", "chat": "Chat", "evaluate": "Evaluate & Predict", "export": "Export", "data": "Data"}
GiB = 1024**3


class RssSampler(threading.Thread):
    """Peak resident memory of a process (and, with `tree`, all its children summed) while it runs."""

    def __init__(self, pid: int, tree: bool) -> None:
        super().__init__(daemon=True)
        self.pid, self.tree, self.peak, self.stopped = pid, tree, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                root = psutil.Process(self.pid)
                processes = [root, *root.children(recursive=True)] if self.tree else [root]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in processes if p.is_running()))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "tunesmith", "webui", "--port", str(port), "--allow-path", str(workdir)]
    command += ["--state-dir", str(workdir / "state")]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if server.poll() is not None:
            raise SystemExit("the webui server exited; run `tunesmith webui` to see why")
        time.sleep(0.3)
    return server, f"http://127.0.0.1:{port}/"


def fill(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id}").locator("input, textarea").first
    field.fill(value)
    field.blur()


def terminal_run(config: Path, output_dir: Path) -> tuple[float, int]:
    """`tunesmith train config` as a person runs it: seconds to the first progress line, peak memory of its tree."""
    started = time.time()
    run = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "train", str(config), f"output_dir={output_dir}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    sampler = RssSampler(run.pid, tree=True)
    sampler.start()
    first_progress, buffer = None, ""
    while chunk := run.stdout.read1(4096).decode(errors="replace"):
        buffer = (buffer + chunk)[-4000:]
        if first_progress is None and re.search(r"Training:\s*\d+%\|[^|]*\|\s*[1-9]\d*/", buffer):
            first_progress = time.time() - started
    run.wait()
    sampler.stopped.set()
    return first_progress or float("nan"), sampler.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshots", type=Path, default=Path(tempfile.gettempdir()) / "tunesmith-webui-screens")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.screenshots.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="webui-bench-"))
    server, url = start_server(workdir)
    ui = psutil.Process(server.pid)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1300, "height": 1500})
            page.goto(url)
            page.get_by_role("tab", name="Train").wait_for()
            page.wait_for_timeout(3000)  # the memory estimate
            ui_idle = ui.memory_info().rss

            for key in ("chat", "evaluate", "export"):
                page.get_by_role("tab", name=TABS[key]).click()
                page.wait_for_timeout(500)
                page.screenshot(path=str(args.screenshots / f"{key}.png"), full_page=True)
            page.get_by_role("tab", name="Data").click()
            fill(page, "data-extra", "name: Tunesmith\nauthor: the tunesmith team")
            page.locator("#data-preview-button").click()
            page.locator("#data-preview .trained").first.wait_for(timeout=180_000)
            page.screenshot(path=str(args.screenshots / "data.png"), full_page=True)
            ui_after_preview = ui.memory_info().rss

            page.get_by_role("tab", name="Train").click()
            output_dir = workdir / "ui_run"
            fill(page, "train-output-dir", str(output_dir))
            fill(page, "train-max_steps", str(args.steps))
            fill(page, "train-logging_steps", "1")
            fill(page, "train-extra", "name: Tunesmith\nauthor: the tunesmith team")
            ui_sampler = RssSampler(server.pid, tree=False)
            ui_sampler.start()
            started = time.time()
            page.locator("#train-start").click()
            while not ui.children():  # the run, started by the click
                time.sleep(0.05)
            run_sampler = RssSampler(ui.children()[0].pid, tree=True)
            run_sampler.start()
            page.locator("#train-progress", has_text=re.compile(r"Running [1-9]\d*/\d+")).wait_for(timeout=600_000)
            ui_first_progress = time.time() - started
            page.locator('#train-progress[data-state="finished"]').wait_for(timeout=1_200_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.screenshots / "train.png"), full_page=True)
            page.locator("#language").get_by_label("zh").check()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(args.screenshots / "train_zh.png"), full_page=True)
            ui_sampler.stopped.set()
            run_sampler.stopped.set()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    terminal_first_progress, terminal_peak = terminal_run(output_dir / "train_config.yaml", workdir / "terminal_run")
    print(f"screenshots: {args.screenshots} ({', '.join(sorted(p.name for p in args.screenshots.glob('*.png')))})")
    added = ui_first_progress - terminal_first_progress
    print(
        f"Start → first progress step on the page: {ui_first_progress:.1f} s; the same YAML from a terminal: "
        f"{terminal_first_progress:.1f} s to its first progress step (the UI adds {added:+.1f} s)"
    )
    print(
        f"memory: UI process {ui_idle / GiB:.2f} GiB idle, {ui_after_preview / GiB:.2f} GiB after a data preview, "
        f"peak {ui_sampler.peak / GiB:.2f} GiB during the run; the run's own peak {run_sampler.peak / GiB:.2f} GiB "
        f"(from a terminal: {terminal_peak / GiB:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
