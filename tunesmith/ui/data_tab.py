"""The Data tab: `tunesmith data check` and `tunesmith data preview` with the same keys as training, in the browser.

Both run as the command does (a subprocess), so what the page shows is what a run would train on. The preview's
token ids are decoded here with the model's tokenizer, trained tokens highlighted in green, the rest dimmed: a
template or mask mistake shows before any training.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.ui.context import UiContext
from tunesmith.ui.forms import MODEL_TEMPLATE, as_arguments, parse_more_keys
from tunesmith.ui.locales import Labels, text

IGNORE_INDEX = -100  # data/encode.py's label of an untrained token
TIMEOUT_S = 600
FORM_DEFAULTS: dict[str, Any] = {
    "model_name_or_path": "smollm2-135m-instruct",
    "template": MODEL_TEMPLATE,
    "stage": "sft",
    "dataset_dir": "data",
    "dataset": "identity",
    "cutoff_len": 512,
    "extra": "",
}
FORM_KEYS = tuple(FORM_DEFAULTS)


def data_args(form: dict[str, Any], context: UiContext) -> list[str]:
    policy = context.policy
    keys = {
        "model_name_or_path": policy.model(form["model_name_or_path"]),
        "stage": form["stage"],
        "dataset_dir": str(policy.existing_dir(form["dataset_dir"], "dataset_dir")),
        "dataset": form["dataset"],
        "cutoff_len": int(form["cutoff_len"]),
    }
    if form["template"] not in (None, "", MODEL_TEMPLATE):
        keys["template"] = form["template"]
    keys.update(parse_more_keys(form["extra"], keys))
    return as_arguments(keys)


def run_data_command(args: list[str], context: UiContext) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", "data", *args],
        cwd=context.workdir,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def check(form: dict[str, Any], context: UiContext) -> str:
    try:
        args = data_args(form, context)
    except TunesmithError as error:
        return f"error: {error}"
    completed = run_data_command(["check", *args], context)
    return (completed.stdout + completed.stderr).strip()


def preview(form: dict[str, Any], count: int, context: UiContext) -> str:
    """HTML of `count` examples as training encodes them, trained tokens highlighted."""
    try:
        args = data_args(form, context)
    except TunesmithError as error:
        return f"<pre>error: {html.escape(str(error))}</pre>"
    completed = run_data_command(["preview", *args, "--json", "-n", str(int(count))], context)
    if completed.returncode != 0:
        return f"<pre>{html.escape((completed.stdout + completed.stderr).strip())}</pre>"
    examples = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    tokenizer = preview_tokenizer(args)
    return "".join(example_html(example, tokenizer) for example in examples)


def preview_tokenizer(args: list[str]):
    """The tokenizer the preview encoded with (the model's; the template only decides the ids, not their text)."""
    from tunesmith.config.load import parse_overrides
    from tunesmith.model.load import load_tokenizer
    from tunesmith.model.resolve import resolve_model

    return load_tokenizer(resolve_model(str(parse_overrides(args)["model_name_or_path"])), False)


def example_html(example: dict[str, Any], tokenizer) -> str:
    ids, labels = example["input_ids"], example["labels"]
    trained = sum(label != IGNORE_INDEX for label in labels)
    pieces = []
    for is_trained, group in label_runs(ids, labels):
        css = "trained" if is_trained else "prompt"
        pieces.append(f'<span class="{css}">{html.escape(tokenizer.decode(group))}</span>')
    return (
        f'<div class="example"><b>{html.escape(str(example["row"]))}</b> ({len(ids)} tokens, {trained} trained)'
        f'<pre style="white-space:pre-wrap">{"".join(pieces)}</pre></div>'
    )


def label_runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive tokens grouped by whether they are trained."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs


CSS = """
#data-preview .trained { background: #c8f7c5; color: #064e03; }
#data-preview .prompt { color: #888; }
"""


def build(context: UiContext, labels: Labels, lang) -> None:
    import gradio as gr

    from tunesmith.data.templates import TEMPLATES
    from tunesmith.model.resolve import ALIASES

    d = FORM_DEFAULTS
    form: dict[str, Any] = {}
    with gr.Row():
        form["model_name_or_path"] = labels.add(
            gr.Dropdown(list(ALIASES), value=d["model_name_or_path"], allow_custom_value=True), "model"
        )
        form["template"] = labels.add(gr.Dropdown([MODEL_TEMPLATE, *TEMPLATES], value=d["template"]), "template")
        form["stage"] = labels.add(gr.Dropdown(["sft", "pt", "rm", "dpo", "kto"], value=d["stage"]), "stage")
    with gr.Row():
        form["dataset_dir"] = labels.add(gr.Textbox(d["dataset_dir"]), "dataset_dir")
        form["dataset"] = labels.add(gr.Textbox(d["dataset"], elem_id="data-dataset"), "dataset")
        form["cutoff_len"] = labels.add(gr.Number(d["cutoff_len"], precision=0), "cutoff_len")
    form["extra"] = labels.add(gr.Textbox(d["extra"], lines=2, elem_id="data-extra"), "extra")
    with gr.Row():
        check_button = labels.add(gr.Button(text("check", "en"), elem_id="data-check"), "check", "value")
        count = labels.add(gr.Number(3, precision=0, minimum=1, maximum=50), "num_examples")
        preview_button = labels.add(
            gr.Button(text("preview_examples", "en"), elem_id="data-preview-button"), "preview_examples", "value"
        )
    report = labels.add(gr.Textbox(lines=12, interactive=False, elem_id="data-report"), "status")
    examples = gr.HTML(elem_id="data-preview")

    inputs = [form[key] for key in FORM_KEYS]
    check_button.click(lambda *values: check(dict(zip(FORM_KEYS, values, strict=True)), context), inputs, report)
    preview_button.click(
        lambda n, *values: preview(dict(zip(FORM_KEYS, values, strict=True)), n, context), [count, *inputs], examples
    )
