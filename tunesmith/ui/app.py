"""The page: a language switch above five tabs, each built by its own module, and one timer that refreshes them."""

from __future__ import annotations

import socket
from typing import Any

from tunesmith.ui import chat_tab, data_tab, evaluate_tab, export_tab, train_tab
from tunesmith.ui.context import UiContext
from tunesmith.ui.locales import LANGUAGES, Labels

REFRESH_S = 1.0  # how often an open page reads the jobs' logs and metrics

CSS = data_tab.CSS


def create_app(context: UiContext, lang: str = "en") -> Any:
    import gradio as gr

    labels = Labels(lang)
    with gr.Blocks(title=f"tunesmith ({socket.gethostname()})") as app:
        with gr.Row():
            labels.add(gr.Markdown(elem_id="title"), "title", "value")
            language = labels.add(gr.Radio(list(LANGUAGES), value=lang, elem_id="language"), "language")
        timer = gr.Timer(REFRESH_S)
        with gr.Tabs():
            with labels.add(gr.Tab(id="train"), "tab_train"):
                memory, train_inputs = train_tab.build(context, labels, language, timer)
            with labels.add(gr.Tab(id="chat"), "tab_chat"):
                chat_tab.build(context, labels, language)
            with labels.add(gr.Tab(id="evaluate"), "tab_evaluate"):
                evaluate_tab.build(context, labels, language, timer)
            with labels.add(gr.Tab(id="export"), "tab_export"):
                export_tab.build(context, labels, language, timer)
            with labels.add(gr.Tab(id="data"), "tab_data"):
                data_tab.build(context, labels, language)

        def relabel(chosen: str) -> list[Any]:
            return labels.updates(chosen)

        language.change(relabel, language, labels.components)
        app.load(
            lambda chosen, *values: train_tab.memory_estimate(train_tab.form_dict(values), context, chosen),
            [language, *train_inputs],
            memory,
        )
    return app
