"""The web UI's handlers, called directly (no browser): the form's YAML is the config the run reads, paths are
checked, exposure needs a password, progress is read from what the run writes. The browser tests are
tests/e2e/test_webui_browser.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from tqdm import tqdm

from tests.conftest import at_once
from tunesmith.config.load import build_config, load_config
from tunesmith.errors import ConfigError
from tunesmith.ui import data_tab, evaluate_tab, export_tab, jobs, train_tab
from tunesmith.ui.context import UiContext
from tunesmith.ui.locales import TEXTS
from tunesmith.ui.webui_command import check_exposure, parse_auth


@pytest.fixture
def context(tmp_path: Path, tmp_path_factory) -> UiContext:
    """Started in tmp_path; the session's other temporary folders (the tiny model) allowed too."""
    return UiContext.create(tmp_path, [str(tmp_path_factory.getbasetemp())], tmp_path / "state")


def train_form(tiny_model_dir: Path, identity_data: Path, tmp_path: Path, **changes) -> dict:
    return {
        **train_tab.FORM_DEFAULTS,
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(identity_data),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 7,
        "logging_steps": 1,
        "extra": "name: Tunesmith\nauthor: the tunesmith team",
        **changes,
    }


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, {"finetuning_type": "lora", "quantization_bit": None, "lora_rank": 8, "max_steps": 7}),
        ({"method": "qlora", "lora_rank": 16}, {"finetuning_type": "lora", "quantization_bit": 4, "lora_rank": 16}),
        (
            {"method": "freeze", "freeze_trainable_layers": 1},
            {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
        ),
        (
            {"method": "full", "nproc_per_node": "2", "deepspeed": "ds_z2", "template": "chatml", "val_size": 0.1},
            {"finetuning_type": "full", "nproc_per_node": 2, "template": "chatml", "val_size": 0.1},
        ),
    ],
)
def test_the_form_yaml_round_trips_to_the_same_run_config(
    changes, expected, context, tiny_model_dir, identity_data, tmp_path
):
    form = train_form(tiny_model_dir, identity_data, tmp_path, **changes)
    values, config_path = train_tab.checked_run(form, context)
    assert train_tab.save_yaml(form, context).startswith(f"saved {config_path}")
    from_file = load_config(config_path)
    assert from_file == build_config(values)
    flat = {key: value for section in from_file.model_dump().values() for key, value in section.items()}
    for key, value in expected.items():
        assert flat[key] == value, key
    assert flat["dataset"] == ["identity"] and flat["name"] == "Tunesmith"
    assert flat["output_dir"] == str(tmp_path / "run")
    if "deepspeed" in changes:
        assert Path(flat["deepspeed"]).name == "ds_z2.json"


def test_preview_shows_the_yaml_and_the_command_or_the_config_error(context, tiny_model_dir, identity_data, tmp_path):
    form = train_form(tiny_model_dir, identity_data, tmp_path)
    preview = train_tab.command_preview(form, context)
    assert f"tunesmith train {tmp_path / 'run' / 'train_config.yaml'}" in preview
    assert "max_steps: 7" in preview and not (tmp_path / "run").exists()  # a preview writes nothing

    assert "unknown config key `lora_rnak`" in train_tab.command_preview({**form, "extra": "lora_rnak: 4"}, context)
    assert "set in the form above" in train_tab.command_preview({**form, "extra": "learning_rate: 1"}, context)
    assert "never does" in train_tab.command_preview({**form, "extra": "trust_remote_code: true"}, context)
    assert "`learning_rate`" in train_tab.command_preview({**form, "learning_rate": -1}, context)


def test_typed_paths_stay_inside_the_servers_directories(context, tmp_path):
    policy = context.policy
    with pytest.raises(ConfigError, match="outside the directories this server may use"):
        policy.resolve("/etc", "dataset_dir")
    assert policy.roots[0] == tmp_path
    with pytest.raises(ConfigError, match="outside"):
        policy.resolve("../../elsewhere", "output_dir")
    with pytest.raises(ConfigError, match="not a directory"):
        policy.existing_dir("missing", "dataset_dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        policy.output_dir("file/run", "output_dir")
    assert policy.output_dir("new/run", "output_dir") == tmp_path / "new" / "run"
    assert policy.model("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert policy.model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ConfigError, match="not a packaged alias"):
        policy.model("./no-such-model")


def test_exposing_the_page_needs_a_password():
    check_exposure("127.0.0.1", share=False, auth=None)
    check_exposure("localhost", share=False, auth=None)
    with pytest.raises(ConfigError, match=r"--host 0\.0\.0\.0 lets other machines"):
        check_exposure("0.0.0.0", share=False, auth=None)
    with pytest.raises(ConfigError, match="--share puts the page on a public"):
        check_exposure("127.0.0.1", share=True, auth=None)
    check_exposure("0.0.0.0", share=True, auth=("user", "password"))
    assert parse_auth("user:pass:word") == ("user", "pass:word")
    with pytest.raises(ConfigError, match="user:password"):
        parse_auth("user")


def test_webui_command_refuses_an_open_host_without_auth(monkeypatch):
    from tunesmith.cli import main

    monkeypatch.delenv("GRADIO_AUTH", raising=False)
    assert main(["webui", "--host", "0.0.0.0"]) == 2


def test_progress_is_read_from_the_runs_own_progress_bar(tmp_path):
    log = tmp_path / "train.log"
    with log.open("w") as file:
        file.write("loading ...\n")
        bar = tqdm(total=10, desc="Training", unit="step", file=file, mininterval=0)
        for _ in range(3):
            bar.update(1)
            bar.set_postfix({"loss": "1.0"}, refresh=True)
        # no close: the run is still going
    progress = jobs.training_progress(log)
    assert (progress.step, progress.total) == (3, 10) and progress.percent == 30.0
    assert progress.elapsed and progress.remaining
    assert "\r" not in jobs.log_tail(log) and jobs.log_tail(log).count("Training") == 1
    assert jobs.training_progress(tmp_path / "missing.log") is None
    (tmp_path / "predict.log").write_text("predict: 8/20 rows\npredict: 16/20 rows\n")  # evaluate/predict.py's lines
    assert jobs.predict_progress(tmp_path / "predict.log").step == 16


def test_loss_plot_has_a_point_per_logged_loss():
    records = [{"step": step, "loss": 3.0 / step} for step in range(1, 6)] + [{"step": 5, "eval_loss": 1.0}]
    svg = train_tab.loss_svg(records)
    assert svg.count('class="loss-point"') == 5 and svg.count('class="eval_loss-point"') == 1
    assert "circle" not in train_tab.loss_svg([{"step": 1, "train_runtime": 3.0}])


def test_jobs_run_as_subprocesses_and_are_found_again_from_the_state_file(context, tmp_path):
    job = context.jobs.start("export", ["version"], tmp_path, tmp_path / "job.log", tmp_path, append=False)
    assert job.command_line == "tunesmith version"
    deadline = time.time() + 120
    while context.jobs.get("export").active and time.time() < deadline:
        time.sleep(0.2)
    assert context.jobs.get("export").state == "finished"
    assert "tunesmith " in (tmp_path / "job.log").read_text()
    reopened = jobs.JobRegistry(context.jobs.state_file)  # a restarted server
    assert reopened.get("export").record() == context.jobs.get("export").record()


def test_stop_sends_ctrl_c_to_the_jobs_process_group(context, tmp_path):
    script = tmp_path / "waits.py"
    script.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    registry = context.jobs
    # a stand-in for `tunesmith train` that exits 130 on Ctrl-C, as train does after saving its checkpoint (the
    # real one is stopped in tests/e2e/test_webui_browser.py)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, start_new_session=True, text=True)
    assert process.stdout.readline().strip() == "ready"
    registry.jobs["train"] = jobs.Job("train", ["train"], str(tmp_path), "", str(tmp_path), process.pid, time.time())
    registry.jobs["train"].process = process
    assert registry.stop("train").state == "stopping"
    process.wait(timeout=30)
    assert registry.get("train").state == "stopped" and registry.get("train").returncode == 130
    # no checkpoint was written: the page does not claim one
    assert "stopped before the first checkpoint" in train_tab.progress_html(registry.get("train"), "en")
    (tmp_path / "checkpoint-3").mkdir()
    assert "checkpoint saved" in train_tab.progress_html(registry.get("train"), "en")


def test_memory_estimate_says_whether_the_run_fits(context, tiny_model_dir, identity_data, tmp_path):
    form = train_form(tiny_model_dir, identity_data, tmp_path)
    estimate = train_tab.memory_estimate(form, context, "en")
    assert "GiB** peak per process" in estimate and "fits" in estimate
    huge = train_tab.memory_estimate({**form, "per_device_train_batch_size": 10**7}, context, "en")
    assert "does NOT fit" in huge
    assert "outside" in train_tab.memory_estimate({**form, "dataset_dir": "/etc"}, context, "en")


def test_datasets_and_rows_come_from_dataset_info(context, identity_data):
    registered = json.loads((identity_data / "dataset_info.json").read_text())
    assert train_tab.dataset_names(str(identity_data), context) == sorted(registered)
    assert "identity" in registered
    rows = train_tab.preview_rows(str(identity_data), ["identity"], context, count=2)
    assert len(rows) == 2 and rows[0]["dataset"] == "identity" and "{{name}}" in json.dumps(rows)


def test_predict_eval_and_export_arguments_are_what_the_commands_accept(context, identity_data, tmp_path):
    from tunesmith.config.benchmark import load_benchmark_config
    from tunesmith.config.export import load_export_config
    from tunesmith.config.predict import load_predict_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    form = {
        **evaluate_tab.FORM_DEFAULTS,
        "dataset_dir": str(identity_data),
        "output_dir": "predictions",
        "extra": "name: Tunesmith",
    }
    args, output_dir = evaluate_tab.command_args(form, context)
    config = load_predict_config(None, args[1:])
    assert args[0] == "predict" and output_dir == tmp_path / "predictions"
    assert config.predict.max_samples == 20 and config.inference.generation.temperature == 0.0 and config.predict.name
    args, _ = evaluate_tab.command_args({**form, "mode": "eval", "limit": 3, "extra": ""}, context)
    assert args[0] == "eval" and load_benchmark_config(None, args[1:]).benchmark.limit == 3

    export_form = {**export_tab.FORM_DEFAULTS, "adapter_name_or_path": str(adapter), "export_gguf": ["q8_0"]}
    args, export_dir = export_tab.command_args(export_form, context)
    export = load_export_config(None, args[1:])
    assert export.inference.model.adapter_name_or_path == [str(adapter)] and export.export.export_gguf == ["q8_0"]
    assert export.export.export_size == 2 * 10**9 and Path(export.export.export_dir) == export_dir
    with pytest.raises(ConfigError, match="give a model, an adapter"):
        export_tab.command_args(export_tab.FORM_DEFAULTS, context)


def test_the_evaluate_tab_reads_the_files_the_commands_write():
    from tunesmith.evaluate import benchmark, predict

    assert evaluate_tab.PREDICTIONS_FILE == predict.PREDICTIONS_FILE
    assert evaluate_tab.PREDICT_RESULTS_FILE == predict.RESULTS_FILE
    assert evaluate_tab.BENCHMARK_RESULTS_FILE == benchmark.RESULTS_FILE


def test_data_preview_highlights_the_trained_tokens(context, tiny_model_dir):
    from tunesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir), False)
    prompt, answer = tokenizer.encode("Who are you?"), tokenizer.encode(" I am Tunesmith.")
    example = {"row": "identity row 1", "input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    shown = data_tab.example_html(example, tokenizer)
    assert '<span class="prompt">Who are you?</span>' in shown
    assert '<span class="trained"> I am Tunesmith.</span>' in shown
    assert f"{len(answer)} trained" in shown


def test_every_text_has_english_and_chinese():
    for key, (english, chinese) in TEXTS.items():
        assert english.strip() and chinese.strip(), key


def test_data_tab_runs_data_preview_and_highlights_what_it_returns(context, tiny_model_dir, identity_data):
    form = {
        **data_tab.FORM_DEFAULTS,
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(identity_data),
        "extra": "name: Tunesmith\nauthor: the tunesmith team",
    }
    shown, refused = at_once(  # two independent `tunesmith data preview` processes, as two open pages would run them
        partial(data_tab.preview, form, 2, context),
        partial(data_tab.preview, {**form, "dataset": "no_such_set"}, 2, context),
    )
    assert shown.count('class="example"') == 2, shown
    assert '<span class="trained">Hello! I am Tunesmith' in shown
    assert "error" in refused


def test_predict_runs_as_a_job_and_its_predictions_fill_the_table(context, tiny_model_dir, identity_data, tmp_path):
    form = {
        **evaluate_tab.FORM_DEFAULTS,
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(identity_data),
        "max_samples": 2,
        "max_new_tokens": 4,
        "output_dir": "predictions",
        "extra": "name: Tunesmith\nauthor: the tunesmith team",
    }
    assert evaluate_tab.start(form, context).startswith("tunesmith predict ")
    deadline = time.time() + 180
    while context.jobs.get("evaluate").active and time.time() < deadline:
        time.sleep(0.3)
    status, log, scores, table = evaluate_tab.watch(context, "en")
    assert status == "finished", log
    assert scores["predict_samples"] == 2 and "predict_bleu-4" in scores
    assert len(table) == 2 and "Tunesmith" in table[0][2]  # label column: the identity answer


def test_the_page_is_built_in_the_language_asked_for(context):
    pytest.importorskip("gradio")
    from tunesmith.ui.app import create_app

    page = create_app(context, "zh").get_config_file()
    labels = [c["props"].get("label") for c in page["components"] if c.get("props", {}).get("label")]
    assert {"训练", "对话", "评估与预测", "导出", "数据", "学习率", "数据集"} <= set(labels)
    assert not {"Textbox", "Number", "Dropdown", "Train"} & set(labels)  # every field has its text, in Chinese
