"""The Train tab: a form that becomes a `tunesmith train` YAML, run as a subprocess and watched.

The form's values become flat config keys (`run_values`), checked by the config loader itself before anything is
written; the YAML saved in output_dir is the one the run reads, so `tunesmith train <output_dir>/train_config.yaml`
repeats a run started here exactly. Resume runs that saved YAML again with `resume_from_checkpoint=true`.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config.load import build_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.ui import jobs
from tunesmith.ui.context import UiContext
from tunesmith.ui.forms import MODEL_TEMPLATE, parse_more_keys
from tunesmith.ui.locales import Labels, text

CONFIG_FILE = "train_config.yaml"
LOG_FILE = "webui_train.log"
NO_DEEPSPEED = "none"
AUTO = "auto"
METHODS = ("lora", "qlora", "full", "freeze")
STAGES = ("sft", "pt", "rm", "dpo", "kto")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")

# The form, in the order the handlers receive it: key → default. Most keys are config keys of the same name.
FORM_DEFAULTS: dict[str, Any] = {
    "model_name_or_path": "smollm2-135m-instruct",
    "template": MODEL_TEMPLATE,
    "stage": "sft",
    "method": "lora",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target": "all",
    "freeze_trainable_layers": 2,
    "dataset_dir": "data",
    "dataset": ["identity"],
    "cutoff_len": 512,
    "learning_rate": 1e-4,
    "num_train_epochs": 3.0,
    "max_steps": -1,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "logging_steps": 5,
    "save_steps": 100,
    "val_size": 0.0,
    "seed": 42,
    "nproc_per_node": AUTO,
    "deepspeed": NO_DEEPSPEED,
    "output_dir": "outputs/webui_run",
    "overwrite_output_dir": False,
    "extra": "",
}
FORM_KEYS = tuple(FORM_DEFAULTS)
INTEGER_KEYS = (
    "lora_rank",
    "lora_alpha",
    "freeze_trainable_layers",
    "cutoff_len",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_steps",
    "seed",
)
# Keys that the form sets itself; "More keys" may not set them again (one place for each value).
FORM_CONFIG_KEYS = {*FORM_KEYS, "finetuning_type", "quantization_bit"} - {"method", "extra"}


def form_dict(values: tuple | list) -> dict[str, Any]:
    return dict(zip(FORM_KEYS, values, strict=True))


# --- the form → config keys → YAML ------------------------------------------------------------------------------------


def run_values(form: dict[str, Any], context: UiContext) -> dict[str, Any]:
    """The flat config keys of the form, paths checked and made absolute (the YAML must mean the same anywhere)."""
    policy = context.policy
    method = form["method"]
    if method not in METHODS:
        raise ConfigError(f"method: {method!r}; expected one of {', '.join(METHODS)}")
    values: dict[str, Any] = {"model_name_or_path": policy.model(form["model_name_or_path"])}
    if form["template"] and form["template"] != MODEL_TEMPLATE:
        values["template"] = form["template"]
    values["stage"] = form["stage"]
    values["finetuning_type"] = "lora" if method == "qlora" else method
    if method == "qlora":
        values["quantization_bit"] = 4
    if method in ("lora", "qlora"):
        values["lora_rank"] = as_int(form, "lora_rank")
        if as_int(form, "lora_alpha"):
            values["lora_alpha"] = as_int(form, "lora_alpha")
        values["lora_dropout"] = float(form["lora_dropout"])
        values["lora_target"] = form["lora_target"]
    if method == "freeze":
        values["freeze_trainable_layers"] = as_int(form, "freeze_trainable_layers")
    values["dataset"] = list(form["dataset"] or [])
    if not values["dataset"]:
        raise ConfigError("dataset: none chosen; pick at least one from the list")
    values["dataset_dir"] = str(policy.existing_dir(form["dataset_dir"], "dataset_dir"))
    for key in ("cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        values[key] = as_int(form, key)
    values["learning_rate"] = float(form["learning_rate"])
    values["num_train_epochs"] = float(form["num_train_epochs"])
    if as_int(form, "max_steps") > 0:
        values["max_steps"] = as_int(form, "max_steps")
    values["lr_scheduler_type"] = form["lr_scheduler_type"]
    values["warmup_ratio"] = float(form["warmup_ratio"])
    values["save_steps"] = as_int(form, "save_steps")
    if float(form["val_size"] or 0) > 0:
        values["val_size"] = float(form["val_size"])
    values["seed"] = as_int(form, "seed")
    if form["nproc_per_node"] not in (AUTO, None, ""):
        values["nproc_per_node"] = int(form["nproc_per_node"])
    if form["deepspeed"] not in (NO_DEEPSPEED, None, ""):
        values["deepspeed"] = deepspeed_value(form["deepspeed"], context)
    values["output_dir"] = str(policy.output_dir(form["output_dir"], "output_dir"))
    if form["overwrite_output_dir"]:
        values["overwrite_output_dir"] = True
    values.update(parse_more_keys(form["extra"], FORM_CONFIG_KEYS))
    return values


def as_int(form: dict[str, Any], key: str) -> int:
    value = form[key]
    if value is None or float(value) != int(float(value)):
        raise ConfigError(f"{key}: {value!r}; expected a whole number")
    return int(float(value))


def deepspeed_value(choice: str, context: UiContext) -> str:
    from tunesmith.config.deepspeed_config import SHIPPED

    if choice in SHIPPED:
        return choice
    return str(context.policy.resolve(choice, "deepspeed"))


def config_yaml(values: dict[str, Any]) -> str:
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def checked_run(form: dict[str, Any], context: UiContext) -> tuple[dict[str, Any], Path]:
    """The run's keys, validated by the config loader (so a mistake shows before Start), and its YAML's path."""
    values = run_values(form, context)
    build_config(values)
    return values, Path(values["output_dir"]) / CONFIG_FILE


def command_preview(form: dict[str, Any], context: UiContext) -> str:
    """What Start will run: the YAML and the command line, exactly."""
    try:
        values, config_path = checked_run(form, context)
    except TunesmithError as error:
        return f"error: {error}"
    return f"# {config_path}\n{config_yaml(values)}\n# command\ntunesmith train {jobs.quote(str(config_path))}\n"


def write_run_yaml(form: dict[str, Any], context: UiContext) -> Path:
    """The form's run, checked, written as the YAML that Start runs; its path."""
    values, config_path = checked_run(form, context)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(config_yaml(values), encoding="utf-8")
    return config_path


def save_yaml(form: dict[str, Any], context: UiContext) -> str:
    try:
        config_path = write_run_yaml(form, context)
    except TunesmithError as error:
        return f"error: {error}"
    return f"saved {config_path}\nrun it with: tunesmith train {jobs.quote(str(config_path))}"


def start(form: dict[str, Any], context: UiContext) -> str:
    try:
        config_path = write_run_yaml(form, context)
    except TunesmithError as error:
        return f"error: {error}"
    output_dir = config_path.parent
    try:
        job = context.jobs.start(
            "train", ["train", str(config_path)], context.workdir, output_dir / LOG_FILE, output_dir, append=False
        )
    except TunesmithError as error:
        return f"error: {error}"
    return job.command_line


def resume(form: dict[str, Any], context: UiContext) -> str:
    """Continue the run in output_dir from its last checkpoint, with the YAML it was started with."""
    try:
        output_dir = context.policy.existing_dir(form["output_dir"], "output_dir")
        config_path = output_dir / CONFIG_FILE
        if not config_path.is_file():
            raise ConfigError(f"output_dir: {output_dir} holds no {CONFIG_FILE}; start a run there first")
        job = context.jobs.start(
            "train",
            ["train", str(config_path), "resume_from_checkpoint=true"],
            context.workdir,
            output_dir / LOG_FILE,
            output_dir,
            append=True,
        )
    except TunesmithError as error:
        return f"error: {error}"
    return job.command_line


def stop(context: UiContext) -> str:
    job = context.jobs.stop("train")
    return "" if job is None else job.command_line


# --- the memory estimate ---------------------------------------------------------------------------------------------


def memory_estimate(form: dict[str, Any], context: UiContext, lang: str) -> str:
    """The run's predicted peak (tunesmith estimate), and whether it fits in this machine's free memory."""
    from tunesmith.estimate.command import default_device, read_model_config, resolve_checkpointing
    from tunesmith.estimate.memory import GiB, ModelShape, Settings, available_memory, estimate

    try:
        config = build_config(run_values(form, context))
        model_config, _ = read_model_config(config.model.model_name_or_path, config.model.cache_dir)
        shape = ModelShape.from_config(model_config)
    except TunesmithError as error:
        return f"⚠️ {html.escape(str(error))}"
    device = default_device()
    settings = Settings.from_config(config, device)
    checkpointing, _ = resolve_checkpointing(config.train.gradient_checkpointing, shape, settings, device)
    result = estimate(shape, settings, device=device, gradient_checkpointing=checkpointing)
    free = available_memory(device)
    parts = ", ".join(f"{name} {size / GiB:.2f}" for name, size in result.parts().items() if size)
    fits = result.total_bytes <= free
    verdict = text("fits", lang) if fits else f"⚠️ **{text('does_not_fit', lang)}**"
    return (
        f"**{result.total_bytes / GiB:.2f} GiB** peak per process on {device} "
        f"({shape.total_params / 1e6:,.1f}M parameters; {parts} GiB); "
        f"{free / GiB:.1f} GiB free: {verdict}"
    )


# --- datasets --------------------------------------------------------------------------------------------------------


def dataset_names(dataset_dir: str, context: UiContext) -> list[str]:
    from tunesmith.data.registry import load_registry

    try:
        directory = context.policy.existing_dir(dataset_dir, "dataset_dir")
        return sorted(load_registry(directory))
    except TunesmithError:
        return []


def preview_rows(dataset_dir: str, names: list[str], context: UiContext, count: int = 5) -> list[dict[str, Any]]:
    """The first raw rows of each chosen dataset, as stored (before the template)."""
    from itertools import islice

    from tunesmith.data.files import read_rows
    from tunesmith.data.registry import resolve_datasets

    directory = context.policy.existing_dir(dataset_dir, "dataset_dir")
    rows = []
    for spec in resolve_datasets(list(names or []), str(directory)):
        for path in spec.files[:1]:
            rows += [{"dataset": spec.name, **row.data} for row in islice(read_rows(path), count)]
    return rows


# --- watching the run ------------------------------------------------------------------------------------------------


def progress_html(job: jobs.Job | None, lang: str) -> str:
    """The bar and its line: steps, elapsed < remaining, tokens/s; then the end state with the exit code."""
    if job is None:
        return f'<div id="train-progress"><span class="state">{text("idle", lang)}</span></div>'
    progress = jobs.training_progress(job.log_path)
    records = jobs.read_metrics(job.output_dir)
    speed = next((r["tokens_per_second"] for r in reversed(records) if "tokens_per_second" in r), None)
    if job.active and progress is None:
        line = text("stopping" if job.state == "stopping" else "preparing", lang)
    elif job.active:
        line = f"{text('running', lang)} {progress.step}/{progress.total}: {progress.elapsed} < {progress.remaining}"
        if speed is not None:
            line += f", {speed:,.0f} {text('tokens_per_second', lang)}"
        if job.state == "stopping":
            line += f" · {text('stopping', lang)}"
    else:
        state = job.state if job.state in ("finished", "stopped", "failed") else "failed"
        if state == "stopped" and not checkpoint_written_since(Path(job.output_dir), job.started):
            state = "stopped_early"  # Ctrl-C while the model or data was still loading
        line = text(state, lang)
        if progress is not None:
            line += f": {progress.step}/{progress.total}"
        if job.returncode not in (None, 0):
            line += f" ({text('exit_code', lang)} {job.returncode})"
        if job.state == "finished":
            line += f" · {text('saved_to', lang)} {job.output_dir}"
    value = progress.step if progress else 0
    maximum = progress.total if progress else 1
    return (
        f'<div id="train-progress" data-state="{job.state}"><progress value="{value}" max="{maximum}" '
        f'style="width:100%"></progress><span class="state">{html.escape(line)}</span></div>'
    )


def checkpoint_written_since(output_dir: Path, started: float) -> bool:
    return any(path.stat().st_mtime >= started for path in output_dir.glob("checkpoint-*"))


def loss_svg(records: list[dict[str, Any]], width: int = 520, height: int = 220) -> str:
    """Training loss (and eval loss) against the step, one circle per logged point."""
    series = {
        "loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "eval_loss": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
    }
    points = [point for values in series.values() for point in values]
    if not points:
        return '<div id="loss-plot"><svg width="0" height="0"></svg></div>'
    pad = 40
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    low_step, high_step = min(steps), max(max(steps), min(steps) + 1)
    low_loss, high_loss = min(losses), max(max(losses), min(losses) + 1e-6)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = pad + (step - low_step) / (high_step - low_step) * (width - 2 * pad)
        y = height - pad - (loss - low_loss) / (high_loss - low_loss) * (height - 2 * pad)
        return round(x, 1), round(y, 1)

    shapes = []
    for name, colour in (("loss", "#1f77b4"), ("eval_loss", "#ff7f0e")):
        coordinates = [xy(*point) for point in series[name]]
        if not coordinates:
            continue
        line = " ".join(f"{x},{y}" for x, y in coordinates)
        shapes.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        shapes += [f'<circle class="{name}-point" cx="{x}" cy="{y}" r="3" fill="{colour}"/>' for x, y in coordinates]
    axes = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
        f'<text x="{pad}" y="{height - 10}" font-size="11">step {low_step}</text>'
        f'<text x="{width - pad}" y="{height - 10}" font-size="11" text-anchor="end">{high_step}</text>'
        f'<text x="4" y="{pad}" font-size="11">{high_loss:.3f}</text>'
        f'<text x="4" y="{height - pad}" font-size="11">{low_loss:.3f}</text>'
    )
    return f'<div id="loss-plot"><svg width="{width}" height="{height}">{axes}{"".join(shapes)}</svg></div>'


def watch(context: UiContext, lang: str) -> tuple[str, str, str]:
    """One tick of the page's timer: (progress, loss plot, log tail) of this server's train job."""
    job = context.jobs.get("train")
    if job is None:
        return progress_html(None, lang), loss_svg([]), ""
    return progress_html(job, lang), loss_svg(jobs.read_metrics(job.output_dir)), jobs.log_tail(job.log_path)


# --- the layout ------------------------------------------------------------------------------------------------------


def build(context: UiContext, labels: Labels, lang, timer) -> tuple[Any, list[Any]]:
    """The tab's components and events (inside the app's Blocks and this tab); returns the memory estimate's box
    and the form's inputs, which the page fills when it loads."""
    import gradio as gr

    from tunesmith.config.deepspeed_config import SHIPPED
    from tunesmith.data.templates import TEMPLATES
    from tunesmith.model.resolve import ALIASES

    form: dict[str, Any] = {}
    d = FORM_DEFAULTS
    with gr.Row():
        form["model_name_or_path"] = labels.add(
            gr.Dropdown(list(ALIASES), value=d["model_name_or_path"], allow_custom_value=True, elem_id="train-model"),
            "model",
        )
        form["template"] = labels.add(gr.Dropdown([MODEL_TEMPLATE, *TEMPLATES], value=d["template"]), "template")
        form["stage"] = labels.add(gr.Dropdown(list(STAGES), value=d["stage"]), "stage")
        form["method"] = labels.add(gr.Dropdown(list(METHODS), value=d["method"]), "method")
    with gr.Row():
        form["lora_rank"] = labels.add(gr.Number(d["lora_rank"], precision=0, minimum=1), "lora_rank")
        form["lora_alpha"] = labels.add(gr.Number(d["lora_alpha"], precision=0, minimum=0), "lora_alpha")
        form["lora_dropout"] = labels.add(gr.Number(d["lora_dropout"], minimum=0, maximum=0.99), "lora_dropout")
        form["lora_target"] = labels.add(gr.Textbox(d["lora_target"]), "lora_target")
        form["freeze_trainable_layers"] = labels.add(
            gr.Number(d["freeze_trainable_layers"], precision=0), "freeze_trainable_layers"
        )
    with gr.Row():
        form["dataset_dir"] = labels.add(gr.Textbox(d["dataset_dir"], elem_id="train-dataset-dir"), "dataset_dir")
        form["dataset"] = labels.add(
            gr.Dropdown(
                dataset_names(d["dataset_dir"], context),
                value=d["dataset"],
                multiselect=True,
                allow_custom_value=True,  # a data file's path works too
                elem_id="train-dataset",
            ),
            "dataset",
        )
        preview_button = labels.add(gr.Button(text("preview_rows", "en"), size="sm"), "preview_rows", "value")
    rows_view = labels.add(gr.JSON(label=text("rows", "en"), visible=False), "rows")
    with gr.Row():
        for key in ("cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps"):
            form[key] = labels.add(gr.Number(d[key], precision=0, elem_id=f"train-{key}"), key)
        form["learning_rate"] = labels.add(gr.Number(d["learning_rate"]), "learning_rate")
        form["num_train_epochs"] = labels.add(gr.Number(d["num_train_epochs"]), "num_train_epochs")
    with gr.Row():
        form["lr_scheduler_type"] = labels.add(
            gr.Dropdown(list(SCHEDULERS), value=d["lr_scheduler_type"]), "lr_scheduler_type"
        )
        form["warmup_ratio"] = labels.add(gr.Number(d["warmup_ratio"], minimum=0, maximum=1), "warmup_ratio")
        for key in ("logging_steps", "save_steps", "seed"):
            form[key] = labels.add(gr.Number(d[key], precision=0, elem_id=f"train-{key}"), key)
        form["val_size"] = labels.add(gr.Number(d["val_size"], minimum=0), "val_size")
    with gr.Row():
        form["nproc_per_node"] = labels.add(
            gr.Dropdown([AUTO, "1", "2", "4", "8"], value=d["nproc_per_node"], allow_custom_value=True),
            "nproc_per_node",
        )
        form["deepspeed"] = labels.add(
            gr.Dropdown([NO_DEEPSPEED, *SHIPPED], value=d["deepspeed"], allow_custom_value=True), "deepspeed"
        )
        form["output_dir"] = labels.add(gr.Textbox(d["output_dir"], elem_id="train-output-dir"), "output_dir")
        form["overwrite_output_dir"] = labels.add(gr.Checkbox(d["overwrite_output_dir"]), "overwrite_output_dir")
    form["extra"] = labels.add(gr.Textbox(d["extra"], lines=2, elem_id="train-extra"), "extra")
    memory = gr.Markdown(elem_id="train-memory")
    with gr.Row():
        buttons = {
            key: labels.add(gr.Button(text(key, "en"), variant=variant, elem_id=f"train-{key}"), key, "value")
            for key, variant in (
                ("preview_command", "secondary"),
                ("save_yaml", "secondary"),
                ("start", "primary"),
                ("stop", "stop"),
                ("resume", "secondary"),
            )
        }
    command = labels.add(gr.Code(language="yaml", elem_id="train-command", interactive=False), "command")
    progress = gr.HTML(progress_html(None, "en"), elem_id="train-progress-box")
    with gr.Row():
        loss_plot = gr.HTML(loss_svg([]), elem_id="train-loss-box")
        log = labels.add(gr.Textbox(lines=14, max_lines=14, autoscroll=True, elem_id="train-log"), "log")

    inputs = [form[key] for key in FORM_KEYS]
    form["dataset_dir"].change(
        lambda directory: gr.Dropdown(choices=dataset_names(directory, context)), form["dataset_dir"], form["dataset"]
    )

    def show_rows(directory, names):
        try:
            return gr.JSON(value=preview_rows(directory, names, context), visible=True)
        except TunesmithError as error:
            return gr.JSON(value={"error": str(error)}, visible=True)

    preview_button.click(show_rows, [form["dataset_dir"], form["dataset"]], rows_view)
    gr.on(
        [component.change for component in inputs],
        lambda language, *values: memory_estimate(form_dict(values), context, language),
        [lang, *inputs],
        memory,
        show_progress="hidden",
        trigger_mode="always_last",
    )
    buttons["preview_command"].click(lambda *values: command_preview(form_dict(values), context), inputs, command)
    buttons["save_yaml"].click(lambda *values: save_yaml(form_dict(values), context), inputs, command)
    buttons["start"].click(lambda *values: start(form_dict(values), context), inputs, command)
    buttons["stop"].click(lambda: stop(context), None, command)
    buttons["resume"].click(lambda *values: resume(form_dict(values), context), inputs, command)
    timer.tick(
        lambda language: watch(context, language),
        lang,
        [progress, loss_plot, log],
        show_progress="hidden",
        concurrency_limit=None,
    )
    return memory, inputs
