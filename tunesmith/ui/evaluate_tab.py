"""The Evaluate & Predict tab: `tunesmith predict` (BLEU/ROUGE and the predictions) or `tunesmith eval` (MMLU, C-Eval,
CMMLU) as a subprocess, with its progress, log, scores and the predictions table.

The command is `key=value` arguments only, shown on the page, so the same run is one line in a terminal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.ui import jobs
from tunesmith.ui.context import UiContext
from tunesmith.ui.forms import as_arguments, parse_more_keys
from tunesmith.ui.locales import Labels, text

KIND = "evaluate"
LOG_FILE = "webui_evaluate.log"
# Written by evaluate/predict.py (PREDICTIONS_FILE, RESULTS_FILE) and evaluate/benchmark.py (RESULTS_FILE); the names
# are repeated here so that the page does not import torch to read them (a unit test keeps them equal).
PREDICTIONS_FILE = "generated_predictions.jsonl"
PREDICT_RESULTS_FILE = "predict_results.json"
BENCHMARK_RESULTS_FILE = "results.json"
MODES = ("predict", "eval")
TASKS = ("mmlu", "ceval", "cmmlu")
TABLE_ROWS = 50

FORM_DEFAULTS: dict[str, Any] = {
    "mode": "predict",
    "model_name_or_path": "smollm2-135m-instruct",
    "adapter_name_or_path": "",
    "dataset_dir": "data",
    "eval_dataset": "identity",
    "max_samples": 20,
    "batch_size": 4,
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_p": 0.9,
    "task": "mmlu",
    "n_shot": 5,
    "limit": 0,
    "output_dir": "outputs/webui_predict",
    "extra": "",
}
FORM_KEYS = tuple(FORM_DEFAULTS)


def command_args(form: dict[str, Any], context: UiContext) -> tuple[list[str], Path]:
    """The `tunesmith predict|eval key=value ...` arguments of the form, and the directory its results go to."""
    policy = context.policy
    mode = form["mode"]
    if mode not in MODES:
        raise ConfigError(f"mode: {mode!r}; expected predict or eval")
    keys: dict[str, Any] = {}
    if (form["model_name_or_path"] or "").strip():
        keys["model_name_or_path"] = policy.model(form["model_name_or_path"])
    adapters = policy.adapters(form["adapter_name_or_path"])
    if adapters:
        keys["adapter_name_or_path"] = ",".join(adapters)
    output_dir = policy.output_dir(form["output_dir"], "output_dir")
    if mode == "predict":
        keys["dataset_dir"] = str(policy.existing_dir(form["dataset_dir"], "dataset_dir"))
        keys["eval_dataset"] = form["eval_dataset"]
        if int(form["max_samples"] or 0) > 0:
            keys["max_samples"] = int(form["max_samples"])
        keys["per_device_eval_batch_size"] = int(form["batch_size"])
        keys["max_new_tokens"] = int(form["max_new_tokens"])
        keys["temperature"] = float(form["temperature"])
        keys["top_p"] = float(form["top_p"])
        keys["output_dir"] = str(output_dir)
    else:
        keys["task"] = form["task"]
        keys["n_shot"] = int(form["n_shot"])
        keys["batch_size"] = int(form["batch_size"])
        if int(form["limit"] or 0) > 0:
            keys["limit"] = int(form["limit"])
        keys["save_dir"] = str(output_dir)
    keys.update(parse_more_keys(form["extra"], keys))
    return [mode, *as_arguments(keys)], output_dir


def start(form: dict[str, Any], context: UiContext) -> str:
    try:
        args, output_dir = command_args(form, context)
        output_dir.mkdir(parents=True, exist_ok=True)
        job = context.jobs.start(KIND, args, context.workdir, output_dir / LOG_FILE, output_dir, append=True)
    except TunesmithError as error:
        return f"error: {error}"
    return job.command_line


def status_line(job: jobs.Job | None, lang: str) -> str:
    if job is None:
        return text("idle", lang)
    if job.active:
        progress = jobs.predict_progress(job.log_path)
        done = f" {progress.step}/{progress.total}" if progress else ""
        return f"{text('running', lang)}{done}: {job.command_line}"
    code = f" ({text('exit_code', lang)} {job.returncode})" if job.returncode not in (None, 0) else ""
    return f"{text(job.state if job.state in ('finished', 'failed', 'stopped') else 'failed', lang)}{code}"


def results(job: jobs.Job | None) -> tuple[dict[str, Any] | None, list[list[str]]]:
    """The scores and up to TABLE_ROWS predictions (prompt, predict, label) of a finished job."""
    if job is None or job.state != "finished":
        return None, []
    output_dir = Path(job.output_dir)
    name = PREDICT_RESULTS_FILE if job.args[0] == "predict" else BENCHMARK_RESULTS_FILE
    scores = json.loads((output_dir / name).read_text(encoding="utf-8")) if (output_dir / name).is_file() else None
    table = []
    predictions = output_dir / PREDICTIONS_FILE
    if job.args[0] == "predict" and predictions.is_file():
        for line in predictions.read_text(encoding="utf-8").splitlines()[:TABLE_ROWS]:
            row = json.loads(line)
            table.append([row.get("prompt", ""), row.get("predict", ""), row.get("label", "")])
    return scores, table


def watch(context: UiContext, lang: str):
    job = context.jobs.get(KIND)
    scores, table = results(job)
    return status_line(job, lang), jobs.log_tail(job.log_path) if job else "", scores, table


def build(context: UiContext, labels: Labels, lang, timer) -> None:
    import gradio as gr

    from tunesmith.model.resolve import ALIASES

    d = FORM_DEFAULTS
    form: dict[str, Any] = {}
    with gr.Row():
        form["mode"] = labels.add(gr.Radio(list(MODES), value=d["mode"], elem_id="eval-mode"), "eval_mode")
        form["model_name_or_path"] = labels.add(
            gr.Dropdown(list(ALIASES), value=d["model_name_or_path"], allow_custom_value=True), "model"
        )
        form["adapter_name_or_path"] = labels.add(gr.Textbox(d["adapter_name_or_path"]), "adapter")
    with gr.Row():
        form["dataset_dir"] = labels.add(gr.Textbox(d["dataset_dir"]), "dataset_dir")
        form["eval_dataset"] = labels.add(gr.Textbox(d["eval_dataset"]), "dataset")
        form["max_samples"] = labels.add(gr.Number(d["max_samples"], precision=0), "max_samples")
        form["batch_size"] = labels.add(gr.Number(d["batch_size"], precision=0), "batch_size")
    with gr.Row():
        form["max_new_tokens"] = labels.add(gr.Number(d["max_new_tokens"], precision=0), "max_new_tokens")
        form["temperature"] = labels.add(gr.Number(d["temperature"], minimum=0), "temperature")
        form["top_p"] = labels.add(gr.Number(d["top_p"], minimum=0.01, maximum=1), "top_p")
    with gr.Row():
        form["task"] = labels.add(gr.Dropdown(list(TASKS), value=d["task"]), "task")
        form["n_shot"] = labels.add(gr.Number(d["n_shot"], precision=0, minimum=0), "n_shot")
        form["limit"] = labels.add(gr.Number(d["limit"], precision=0, minimum=0), "limit")
    with gr.Row():
        form["output_dir"] = labels.add(gr.Textbox(d["output_dir"]), "output_dir")
        form["extra"] = labels.add(gr.Textbox(d["extra"], lines=2), "extra")
    with gr.Row():
        start_button = labels.add(
            gr.Button(text("start", "en"), variant="primary", elem_id="eval-start"), "start", "value"
        )
        stop_button = labels.add(gr.Button(text("stop", "en"), variant="stop"), "stop", "value")
    command = labels.add(gr.Textbox(interactive=False, elem_id="eval-command"), "command")
    status = labels.add(gr.Textbox(interactive=False, elem_id="eval-status"), "status")
    log = labels.add(gr.Textbox(lines=8, max_lines=8, autoscroll=True), "log")
    scores = labels.add(gr.JSON(), "results")
    table = labels.add(gr.Dataframe(headers=["prompt", "predict", "label"], wrap=True), "predictions")

    inputs = [form[key] for key in FORM_KEYS]
    start_button.click(lambda *values: start(dict(zip(FORM_KEYS, values, strict=True)), context), inputs, command)
    stop_button.click(lambda: (context.jobs.stop(KIND), "")[1], None, command)
    timer.tick(
        lambda language: watch(context, language),
        lang,
        [status, log, scores, table],
        show_progress="hidden",
        concurrency_limit=None,
    )
