"""`tunesmith webui` in a real headless Chromium (Debian's, driven by Playwright), on the real SmolLM2.

One server on 127.0.0.1 with a password serves the module; one training run (started, stopped, resumed, finished)
is shared by the chat and export tests. A failing test leaves a screenshot in the folder printed at the start.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tunesmith.ui.jobs import TRAINING_BAR

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
USER, PASSWORD = "tester", "correct-horse"
STEPS = 6

playwright_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).is_file():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("gradio")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("webui")


@pytest.fixture(scope="module")
def server(workspace: Path):
    port = free_port()
    log = (workspace / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "webui",
            "--port",
            str(port),
            "--auth",
            f"{USER}:{PASSWORD}",
            "--allow-path",
            str(workspace),
            "--state-dir",
            str(workspace / "state"),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        assert process.poll() is None, (workspace / "server.log").read_text()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.3)
    yield f"http://127.0.0.1:{port}/"
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("webui-screenshots")
    print(f"webui screenshots on failure: {folder}")
    return folder


@pytest.fixture
def page(request, browser, server, screenshots):
    """A logged-in page; on failure its screenshot is saved as <test name>.png."""
    context = browser.new_context(viewport={"width": 1300, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server)
    login(page, USER, PASSWORD)
    page.get_by_role("tab", name="Train").wait_for()
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:
        page.screenshot(path=str(screenshots / f"{request.node.name}.png"), full_page=True)
    context.close()


def login(page, user: str, password: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def fill(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id}").locator("input, textarea").first
    field.fill(value)
    field.blur()


def progress_state(page) -> str:
    return page.locator("#train-progress").get_attribute("data-state") or "idle"


def wait_until(page, condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"waited {timeout_s} s for {what}")


def wait_for_state(page, wanted: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if progress_state(page) == wanted:
            return
        page.wait_for_timeout(250)
    raise AssertionError(
        f"train job not {wanted} after {timeout_s} s; progress: {page.locator('#train-progress').inner_text()}\n"
        f"log: {page.locator('#train-log textarea').input_value()[-2000:]}"
    )


def state_in_a_new_page(browser, server) -> str:
    """The train job's state as a browser opened now sees it (the job belongs to the server, not to a page)."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(server)
    login(page, USER, PASSWORD)
    page.locator("#train-progress[data-state]").wait_for(timeout=30_000)
    state = progress_state(page)
    context.close()
    return state


def test_wrong_password_is_refused(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server)
    login(page, USER, "wrong-password")
    page.get_by_text("Incorrect Credentials").wait_for(timeout=10_000)
    assert page.get_by_role("tab", name="Train").count() == 0
    context.close()


def test_page_has_its_tabs_in_english_and_chinese(page):
    english = ["Train", "Chat", "Evaluate & Predict", "Export", "Data"]
    for name in english:
        assert page.get_by_role("tab", name=name).is_visible()
    page.locator("#language").get_by_label("zh").check()
    for name in ["训练", "对话", "评估与预测", "导出", "数据"]:
        page.get_by_role("tab", name=name).wait_for(timeout=10_000)
    page.get_by_role("button", name="开始").wait_for()
    page.locator("#language").get_by_label("en").check()
    page.get_by_role("tab", name="Train").wait_for(timeout=10_000)


@pytest.fixture(scope="module")
def trained_run(browser, server, workspace, screenshots) -> dict:
    """SmolLM2 + identity for a few steps from the Train tab: Start, Stop at the first step (a checkpoint),
    Resume to the end. Returns what was seen along the way."""
    context = browser.new_context(viewport={"width": 1300, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(30_000)
    seen: dict = {"output_dir": workspace / "identity_run"}
    try:
        page.goto(server)
        login(page, USER, PASSWORD)
        page.get_by_role("tab", name="Train").wait_for()
        fill(page, "train-output-dir", str(seen["output_dir"]))
        fill(page, "train-max_steps", str(STEPS))
        fill(page, "train-cutoff_len", "128")
        fill(page, "train-per_device_train_batch_size", "1")
        fill(page, "train-logging_steps", "1")
        fill(page, "train-extra", "name: Tunesmith\nauthor: the tunesmith team\nlearning_rate_note: x")
        page.locator("#train-preview_command").click()
        command = page.locator("#train-command")
        wait_until(page, lambda: "unknown config key" in command.inner_text(), 30, "the refusal")
        seen["refused_preview"] = command.inner_text()
        fill(page, "train-extra", "name: Tunesmith\nauthor: the tunesmith team")
        page.locator("#train-preview_command").click()
        wait_until(page, lambda: "tunesmith train" in command.inner_text(), 30, "the command preview")
        seen["preview"] = command.inner_text()

        started = time.time()
        page.locator("#train-start").click()
        page.locator("#train-progress", has_text=re.compile(r"Running [1-9]\d*/\d+")).wait_for(timeout=180_000)
        seen["first_progress_s"] = time.time() - started
        page.locator("#train-stop").click()
        wait_for_state(page, "stopped", 120)
        seen["checkpoints"] = sorted(p.name for p in seen["output_dir"].glob("checkpoint-*"))
        seen["stopped_text"] = page.locator("#train-progress").inner_text()

        page.locator("#train-resume").click()
        wait_for_state(page, "running", 60)
        seen["reopened_state"] = state_in_a_new_page(browser, server)
        wait_for_state(page, "finished", 240)
        seen["finished_text"] = page.locator("#train-progress").inner_text()
        page.wait_for_timeout(1500)  # one more refresh: the plot of the last steps
        seen["loss_points"] = page.locator("#loss-plot circle.loss-point").count()
    except Exception:
        page.screenshot(path=str(screenshots / "trained_run.png"), full_page=True)
        raise
    finally:
        context.close()
    return seen


def test_preview_shows_the_yaml_and_refuses_unknown_keys(trained_run):
    assert "unknown config key `learning_rate_note`" in trained_run["refused_preview"]
    preview = trained_run["preview"]
    config_path = trained_run["output_dir"] / "train_config.yaml"
    assert f"tunesmith train {config_path}" in preview
    assert "max_steps: 6" in preview and "name: Tunesmith" in preview


def test_start_shows_progress_then_finished_with_a_loss_plot(trained_run):
    print(f"start → first progress update: {trained_run['first_progress_s']:.1f} s")
    assert "finished" in trained_run["finished_text"] and f"{STEPS}/{STEPS}" in trained_run["finished_text"]
    assert trained_run["loss_points"] >= 2
    assert (trained_run["output_dir"] / "adapter_model.safetensors").is_file()


def test_stop_leaves_a_checkpoint_that_resume_continues(trained_run):
    assert "stopped" in trained_run["stopped_text"]
    assert trained_run["checkpoints"], "Stop wrote no checkpoint"
    stopped_at = int(trained_run["checkpoints"][-1].split("-")[1])
    assert 0 < stopped_at < STEPS
    log = (trained_run["output_dir"] / "webui_train.log").read_text()
    resumed = log.split("resume_from_checkpoint=true", 1)[1]
    first_step = int(TRAINING_BAR.search(resumed).group(1))  # the resumed run's bar starts at the checkpoint
    assert first_step == stopped_at


def test_a_reopened_browser_finds_the_running_job(trained_run):
    assert trained_run["reopened_state"] in ("running", "stopping", "finished")


def test_chat_streams_an_answer_from_the_trained_adapter(page, trained_run):
    page.get_by_role("tab", name="Chat").click()
    fill(page, "chat-adapter", str(trained_run["output_dir"]))
    fill(page, "chat-max-new", "40")
    page.locator("#chat-load").click()
    status = page.locator("#chat-status")
    wait_until(page, lambda: "Loaded:" in status.inner_text() or "error" in status.inner_text(), 120, "the model")
    assert str(trained_run["output_dir"]) in status.inner_text()
    fill(page, "chat-query", "Who are you?")
    page.locator("#chat-send").click()
    bot = page.locator("#chat-history .bot").last
    lengths = []
    deadline = time.time() + 120
    while time.time() < deadline:
        if bot.count():
            lengths.append(len(bot.inner_text().strip()))
        if len(lengths) > 3 and lengths[-1] > 0 and lengths[-1] == lengths[-4]:
            break
        page.wait_for_timeout(100)
    distinct = sorted({n for n in lengths if n > 0})
    assert distinct, "no answer appeared"
    assert len(distinct) >= 2, f"the answer appeared at once, not streamed: lengths {lengths}"


def test_export_writes_a_directory_that_loads(page, trained_run, workspace):
    export_dir = workspace / "exported"
    page.get_by_role("tab", name="Export").click()
    fill(page, "export-adapter", str(trained_run["output_dir"]))
    fill(page, "export-dir", str(export_dir))
    page.locator("#export-start").click()
    status = page.locator("#export-status textarea")
    wait_until(page, lambda: "finished" in status.input_value() or "failed" in status.input_value(), 180, "export")
    assert "finished" in status.input_value() and str(export_dir) in status.input_value()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert model.config.model_type == "llama" and tokenizer.chat_template
