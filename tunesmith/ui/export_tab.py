"""The Export tab: `tunesmith export key=value ...` as a subprocess (merge, shard size, dtype, GGUF, Modelfile)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.ui import jobs
from tunesmith.ui.context import UiContext
from tunesmith.ui.forms import as_arguments
from tunesmith.ui.locales import Labels, text

KIND = "export"
DTYPES = ("auto", "bfloat16", "float16", "float32")
FORM_DEFAULTS: dict[str, Any] = {
    "model_name_or_path": "",
    "adapter_name_or_path": "",
    "export_dir": "outputs/webui_export",
    "export_size": "2GB",
    "infer_dtype": "auto",
    "export_gguf": [],
    "export_num_ctx": 0,
}
FORM_KEYS = tuple(FORM_DEFAULTS)


def command_args(form: dict[str, Any], context: UiContext) -> tuple[list[str], Path]:
    policy = context.policy
    keys: dict[str, Any] = {}
    if (form["model_name_or_path"] or "").strip():
        keys["model_name_or_path"] = policy.model(form["model_name_or_path"])
    adapters = policy.adapters(form["adapter_name_or_path"])
    if adapters:
        keys["adapter_name_or_path"] = ",".join(adapters)
    if not keys:
        raise ConfigError("model / adapter: give a model, an adapter directory (a LoRA run's output_dir), or both")
    export_dir = policy.output_dir(form["export_dir"], "export_dir")
    keys["export_dir"] = str(export_dir)
    keys["export_size"] = str(form["export_size"]).strip()
    keys["infer_dtype"] = form["infer_dtype"]
    if form["export_gguf"]:
        keys["export_gguf"] = ",".join(form["export_gguf"])
    if int(form["export_num_ctx"] or 0) > 0:
        keys["export_num_ctx"] = int(form["export_num_ctx"])
    return ["export", *as_arguments(keys)], export_dir


def start(form: dict[str, Any], context: UiContext) -> str:
    try:
        args, export_dir = command_args(form, context)
        # the log sits beside export_dir: export writes the directory whole and renames it into place
        log_path = export_dir.parent / f"{export_dir.name}.webui_export.log"
        job = context.jobs.start(KIND, args, context.workdir, log_path, export_dir, append=False)
    except TunesmithError as error:
        return f"error: {error}"
    return job.command_line


def status(job: jobs.Job | None, lang: str) -> str:
    if job is None:
        return text("idle", lang)
    if job.active:
        return f"{text('running', lang)}: {job.command_line}"
    if job.state == "finished":
        files = sorted(path.name for path in Path(job.output_dir).iterdir()) if Path(job.output_dir).is_dir() else []
        return f"{text('finished', lang)} · {text('saved_to', lang)} {job.output_dir}: {', '.join(files)}"
    code = f" ({text('exit_code', lang)} {job.returncode})" if job.returncode is not None else ""
    return f"{text(job.state if job.state in ('failed', 'stopped') else 'failed', lang)}{code}"


def watch(context: UiContext, lang: str) -> tuple[str, str]:
    job = context.jobs.get(KIND)
    return status(job, lang), jobs.log_tail(job.log_path) if job else ""


def build(context: UiContext, labels: Labels, lang, timer) -> None:
    import gradio as gr

    from tunesmith.config.export import GGUF_TYPES

    d = FORM_DEFAULTS
    form: dict[str, Any] = {}
    with gr.Row():
        form["model_name_or_path"] = labels.add(gr.Textbox(d["model_name_or_path"], elem_id="export-model"), "model")
        form["adapter_name_or_path"] = labels.add(
            gr.Textbox(d["adapter_name_or_path"], elem_id="export-adapter"), "adapter"
        )
    with gr.Row():
        form["export_dir"] = labels.add(gr.Textbox(d["export_dir"], elem_id="export-dir"), "export_dir")
        form["export_size"] = labels.add(gr.Textbox(d["export_size"]), "export_size")
        form["infer_dtype"] = labels.add(gr.Dropdown(list(DTYPES), value=d["infer_dtype"]), "infer_dtype")
        form["export_num_ctx"] = labels.add(gr.Number(d["export_num_ctx"], precision=0, minimum=0), "export_num_ctx")
    form["export_gguf"] = labels.add(gr.CheckboxGroup(list(GGUF_TYPES), value=d["export_gguf"]), "export_gguf")
    with gr.Row():
        export_button = labels.add(
            gr.Button(text("export", "en"), variant="primary", elem_id="export-start"), "export", "value"
        )
        stop_button = labels.add(gr.Button(text("stop", "en"), variant="stop"), "stop", "value")
    command = labels.add(gr.Textbox(interactive=False, elem_id="export-command"), "command")
    state = labels.add(gr.Textbox(interactive=False, elem_id="export-status"), "status")
    log = labels.add(gr.Textbox(lines=8, max_lines=8, autoscroll=True), "log")

    inputs = [form[key] for key in FORM_KEYS]
    export_button.click(lambda *values: start(dict(zip(FORM_KEYS, values, strict=True)), context), inputs, command)
    stop_button.click(lambda: (context.jobs.stop(KIND), "")[1], None, command)
    timer.tick(
        lambda language: watch(context, language), lang, [state, log], show_progress="hidden", concurrency_limit=None
    )
