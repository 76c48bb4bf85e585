"""The Chat tab: load a model (with adapters, or an exported one) through chat/engine.py and stream replies.

One model per server, held here: every browser session chats with the model loaded last, and Unload frees it.
The reply streams as `ChatEngine.stream` yields it, rendered with the tokenizer's own chat template (sandboxed Jinja).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.ui.context import UiContext
from tunesmith.ui.forms import MODEL_TEMPLATE
from tunesmith.ui.locales import Labels, text

DTYPES = ("auto", "float32", "bfloat16", "float16")


class LoadedModel:
    """The server's one chat model; loading and unloading are serialised."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.lock = threading.Lock()

    def load(self, model: str, adapters: str, template: str, infer_dtype: str, context: UiContext) -> str:
        from tunesmith.chat.engine import load_chat_engine
        from tunesmith.config.sections import ModelSection

        keys: dict[str, Any] = {}
        if (model or "").strip():
            keys["model_name_or_path"] = context.policy.model(model)
        adapter_dirs = context.policy.adapters(adapters)
        if adapter_dirs:
            keys["adapter_name_or_path"] = adapter_dirs
        chosen_template = None if template in (None, "", MODEL_TEMPLATE) else template
        with self.lock:
            self.engine = None  # the old model goes before the new one loads: never two in memory
            self.engine = load_chat_engine(ModelSection(**keys), template=chosen_template, infer_dtype=infer_dtype)
            adapters_note = f" + {', '.join(self.engine.adapters)}" if self.engine.adapters else ""
            return f"{self.engine.model_name}{adapters_note}"

    def unload(self) -> None:
        import gc

        with self.lock:
            self.engine = None
        gc.collect()


def load(holder: LoadedModel, model, adapters, template, infer_dtype, context: UiContext, lang: str) -> str:
    try:
        return f"{text('loaded', lang)}: {holder.load(model, adapters, template, infer_dtype, context)}"
    except TunesmithError as error:
        return f"error: {error}"


def respond(
    holder: LoadedModel,
    history: list[dict[str, Any]],
    query: str,
    system: str,
    settings: dict[str, Any],
    lang: str,
) -> Iterator[list[dict[str, Any]]]:
    """Append the user's message and stream the assistant's reply into the history, piece by piece."""
    from tunesmith.config.inference import GenerationSection

    engine = holder.engine
    history = [*history, {"role": "user", "content": query}]
    if engine is None:
        yield [*history, {"role": "assistant", "content": text("no_model", lang)}]
        return
    messages = [{"role": "system", "content": system}] if (system or "").strip() else []
    messages += [{"role": m["role"], "content": message_text(m["content"])} for m in history]
    options = GenerationSection(**settings)
    reply = ""
    for piece in engine.stream(messages, options):
        reply += piece
        yield [*history, {"role": "assistant", "content": reply}]
    yield [*history, {"role": "assistant", "content": reply}]


def message_text(content: Any) -> str:
    """Gradio 6 gives history contents as text, or as a list of blocks [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if isinstance(block, dict))


def build(context: UiContext, labels: Labels, lang) -> None:
    import gradio as gr

    from tunesmith.data.templates import TEMPLATES
    from tunesmith.model.resolve import ALIASES

    holder = LoadedModel()
    with gr.Row():
        model = labels.add(
            gr.Dropdown(list(ALIASES), value=next(iter(ALIASES)), allow_custom_value=True, elem_id="chat-model"),
            "model",
        )
        adapters = labels.add(gr.Textbox(elem_id="chat-adapter"), "adapter")
        template = labels.add(gr.Dropdown([MODEL_TEMPLATE, *TEMPLATES], value=MODEL_TEMPLATE), "template")
        infer_dtype = labels.add(gr.Dropdown(list(DTYPES), value="auto"), "infer_dtype")
    with gr.Row():
        load_button = labels.add(gr.Button(text("load", "en"), variant="primary", elem_id="chat-load"), "load", "value")
        unload_button = labels.add(gr.Button(text("unload", "en"), elem_id="chat-unload"), "unload", "value")
        status = gr.Markdown(text("unloaded", "en"), elem_id="chat-status")
    system = labels.add(gr.Textbox(lines=2, elem_id="chat-system"), "system")
    chatbot = labels.add(gr.Chatbot(elem_id="chat-history", height=320), "chatbot")
    with gr.Row():
        query = labels.add(gr.Textbox(scale=4, elem_id="chat-query"), "query")
        send = labels.add(gr.Button(text("send", "en"), variant="primary", elem_id="chat-send"), "send", "value")
        clear = labels.add(gr.Button(text("clear", "en"), elem_id="chat-clear"), "clear", "value")
    with gr.Row():
        max_new_tokens = labels.add(gr.Slider(1, 2048, value=256, step=1, elem_id="chat-max-new"), "max_new_tokens")
        temperature = labels.add(gr.Slider(0, 1.5, value=0.7, step=0.05, elem_id="chat-temperature"), "temperature")
        top_p = labels.add(gr.Slider(0.01, 1.0, value=0.9, step=0.01), "top_p")
        top_k = labels.add(gr.Slider(0, 200, value=50, step=1), "top_k")
        repetition_penalty = labels.add(gr.Slider(1.0, 2.0, value=1.0, step=0.01), "repetition_penalty")

    load_button.click(
        lambda m, a, t, dt, language: load(holder, m, a, t, dt, context, language),
        [model, adapters, template, infer_dtype, lang],
        status,
    )
    unload_button.click(lambda language: (holder.unload(), text("unloaded", language))[1], lang, status)

    def chat(history, message, system_prompt, new, temp, p, k, penalty, language):
        settings = {
            "max_new_tokens": int(new),
            "temperature": float(temp),
            "top_p": float(p),
            "top_k": int(k),
            "repetition_penalty": float(penalty),
        }
        yield from respond(holder, history or [], message, system_prompt, settings, language)

    gen_inputs = [chatbot, query, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, lang]
    send.click(chat, gen_inputs, chatbot).then(lambda: "", None, query)
    query.submit(chat, gen_inputs, chatbot).then(lambda: "", None, query)
    clear.click(lambda: [], None, chatbot)
