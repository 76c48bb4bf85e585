"""`tunesmith serve [CONFIG.yaml] [key=value ...] [--host --port --api-key ...]`: an OpenAI-compatible API.

Takes the same config, overrides and model flags as `chat` (config/inference.py). Safe by default: it listens on
127.0.0.1; a non-loopback host without an API key is refused unless --allow-no-key is given. LLaMA-Factory's
environment names work: API_HOST, API_PORT, API_KEY, API_MODEL_NAME (a flag wins over its variable).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import os
import sys
from typing import Any

from tunesmith.chat.command import add_inference_arguments, inference_config
from tunesmith.config.inference import InferenceConfig
from tunesmith.errors import ConfigError

EXTRA_MODULES = ("fastapi", "uvicorn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_inference_arguments(parser)
    parser.add_argument("--host", help="address to listen on (env API_HOST); default 127.0.0.1, this machine only")
    parser.add_argument("--port", type=int, help="port (env API_PORT); default 8000")
    parser.add_argument("--api-key", help="clients must send `Authorization: Bearer KEY` (env API_KEY)")
    parser.add_argument(
        "--allow-no-key",
        action="store_true",
        help="listen on a non-loopback host without an API key",
    )
    parser.add_argument("--served-model-name", help="the model id clients send (env API_MODEL_NAME)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="most choices generated together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429 (default 64)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take (default 300)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    parser.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin")
    parser.add_argument("--log-prompts", action="store_true", help="write each prompt to the log (off: privacy)")


def run(args: argparse.Namespace) -> int:
    config = inference_config(args, backends=("huggingface", "vllm"))  # checked before anything loads
    host = args.host or os.environ.get("API_HOST") or "127.0.0.1"
    port = args.port if args.port is not None else int_from_env("API_PORT", 8000)
    api_key = args.api_key or os.environ.get("API_KEY") or None
    check_listen(host, api_key, args.allow_no_key)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is not a port number; give 0 to 65535 (--port or API_PORT)")
    for name, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ConfigError(f"{name} is {value}; give a positive number")
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"tunesmith serve needs {', '.join(missing)}: install the serve extra, pip install 'tunesmith[serve]'"
        )
    if config.engine.infer_backend == "vllm":
        from tunesmith.serve.vllm_backend import check_vllm

        check_vllm()

    import uvicorn

    from tunesmith.serve.app import CheckKeyAndLog, Engine, ServeSettings, create_app
    from tunesmith.serve.batcher import Sampling
    from tunesmith.serve.tools import tool_style

    generation = config.generation
    if config.engine.infer_backend == "vllm":
        backend, tokenizer, render_messages, name, context = load_vllm(config, args.max_queue)
    else:
        backend, tokenizer, render_messages, name, context = load_transformers(config, args)
    settings = ServeSettings(
        model_name=args.served_model_name or os.environ.get("API_MODEL_NAME") or name,
        context_length=context,
        default_sampling=Sampling(
            max_new_tokens=generation.max_new_tokens,
            temperature=0.0 if generation.greedy else generation.temperature,
            top_p=generation.top_p,
            top_k=generation.top_k,
            repetition_penalty=generation.repetition_penalty,
            seed=None,
        ),
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout,
        log_prompts=args.log_prompts,
    )
    system = config.prompt.default_system

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return render_messages(messages, tools)

    style = tool_style(tokenizer.chat_template)
    app = create_app(Engine(render, tokenizer, backend, style), settings)
    if args.cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=args.cors_origin, allow_methods=["GET", "POST"])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    serve_log = logging.getLogger("tunesmith.serve")
    serve_log.addHandler(handler)
    serve_log.setLevel(logging.INFO)
    print(
        f"tunesmith serve: model {settings.model_name} on http://{host}:{port}/v1 "
        f"({config.engine.infer_backend}, context {settings.context_length}, batch {args.max_batch_size}, "
        f"tools {style or 'none'}, key {'on' if api_key else 'off'})",
        file=sys.stderr,
    )
    backend.start()
    try:
        uvicorn.run(CheckKeyAndLog(app, api_key), host=host, port=port, access_log=False, log_level="warning")
    finally:
        backend.stop()
    return 0


def load_transformers(config: InferenceConfig, args: argparse.Namespace):
    """The transformers backend: the chat engine's model and tokenizer, generated by the batcher."""
    from tunesmith.chat.engine import load_chat_engine
    from tunesmith.serve.batcher import Batcher

    chat = load_chat_engine(
        config.model, config.prompt.template, config.engine.infer_dtype, config.prompt.enable_thinking
    )
    model = chat.model
    if hasattr(model, "merge_and_unload") and not getattr(model, "is_quantized", False):
        # The adapter merged into the weights: the same outputs (up to rounding) with one matmul per layer instead of
        # three, which on a CPU nearly halves the time per token of a small model with LoRA on every layer. A
        # quantized model keeps its adapter apart, as chat does (merging would round it to the quantization grid).
        model = model.merge_and_unload()
    batcher = Batcher(
        model,
        chat.tokenizer,
        chat.stop_token_ids(),
        args.max_batch_size,
        args.max_queue,
        skip_special_tokens=config.generation.skip_special_tokens,
    )
    return batcher, chat.tokenizer, chat.render, chat.model_name, context_length(chat.model)


def load_vllm(config: InferenceConfig, max_queue: int):
    """The vLLM backend: the tokenizer (and chat template) as chat loads it; the weights loaded by vLLM."""
    from tunesmith.chat.engine import DEFAULT_MODEL, base_model_of_adapter, has_tokenizer
    from tunesmith.data.templates import install_chat_format, resolve_chat_format
    from tunesmith.model.adapters import check_adapter_dir
    from tunesmith.model.load import load_tokenizer
    from tunesmith.model.resolve import resolve_model
    from tunesmith.serve.vllm_backend import load_vllm_backend

    model = config.model
    adapter_dirs = [check_adapter_dir(adapter) for adapter in model.adapter_name_or_path or []]
    name = model.model_name_or_path
    if not config.model_given:
        name = base_model_of_adapter(adapter_dirs[0]) if adapter_dirs else DEFAULT_MODEL
    model_dir = resolve_model(name, model.cache_dir)
    tokenizer_dir = str(adapter_dirs[-1]) if adapter_dirs and has_tokenizer(adapter_dirs[-1]) else model_dir
    tokenizer = load_tokenizer(tokenizer_dir, model.trust_remote_code)
    install_chat_format(tokenizer, resolve_chat_format(config.prompt.template, tokenizer))
    options = {} if config.prompt.enable_thinking is None else {"enable_thinking": config.prompt.enable_thinking}

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **options
        )

    backend, context = load_vllm_backend(
        model_dir,
        adapter_dirs,
        config.engine.infer_dtype,
        model.trust_remote_code,
        max_queue,
        config.generation.skip_special_tokens,
    )
    return backend, tokenizer, render, name, context


def check_listen(host: str, api_key: str | None, allow_no_key: bool) -> None:
    if api_key or is_loopback(host):
        return
    if not allow_no_key:
        raise ConfigError(
            f"--host {host} lets other machines call the API, and no API key is set: give --api-key (or API_KEY), "
            "or --allow-no-key to serve without one"
        )
    print(f"warning: listening on {host} without an API key; anyone who can reach it can use it", file=sys.stderr)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def int_from_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise ConfigError(f"{name}={value!r} is not a port number")
    return int(value)


def context_length(model) -> int:
    """The longest sequence the model takes (prompt + reply)."""
    length = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(length, int):
        raise ConfigError("the model's config has no max_position_embeddings; cannot bound max_tokens")
    return length
