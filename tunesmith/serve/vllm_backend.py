"""`infer_backend: vllm`: the same server with vLLM generating, for a GPU with vLLM installed.

The HTTP layer is unchanged: it renders the prompt with the same tokenizer and chat template, and hands `Job`s to
`VllmBackend.submit`, which answers with the same `Delta` / `Finished` / `Failed` events as the transformers batcher.
vLLM schedules and batches on its own (paged attention, continuous batching); a worker thread feeds it new jobs,
calls `step()`, turns its cumulative outputs into deltas, and aborts the requests whose client went away or whose
time ran out. A LoRA adapter is served through vLLM's LoRA support (`LoRARequest`), not merged.

`check_vllm()` refuses the backend, in one line naming the key, where vLLM is not installed or no CUDA GPU is
present; it runs before anything loads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ConfigError
from tunesmith.serve.batcher import Delta, Failed, Finished, Job, JobWorker

log = logging.getLogger("tunesmith.serve")


def check_vllm() -> None:
    """Refuse `infer_backend: vllm` where it cannot run."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "`infer_backend: vllm` needs vLLM, which is not installed (pip install vllm, on a machine with a CUDA "
            "GPU); or use `infer_backend: huggingface`"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "`infer_backend: vllm` needs a CUDA GPU and none is visible here; use `infer_backend: huggingface`"
        )


@dataclass
class Running:
    """A job inside vLLM: how much of each choice's text has been sent."""

    job: Job
    sent: dict[int, int] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)


class VllmBackend(JobWorker):
    """The batcher's interface (`submit`, `alive`, `start`, `stop`) over a vLLM `LLMEngine`."""

    def __init__(self, engine: Any, lora_request: Any, max_queue: int, skip_special_tokens: bool = True):
        self.engine, self.lora_request = engine, lora_request
        self.skip_special_tokens = skip_special_tokens
        self.running: dict[str, Running] = {}
        self._count = 0
        super().__init__(max_queue, "tunesmith-vllm")

    def _work(self) -> None:
        while not self._stopping.is_set():
            self._add_queued(block=not self.running)
            self._drop_gone()
            if not self.running:
                continue
            for output in self.engine.step():
                self._deliver(output)

    def _add_queued(self, block: bool) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            self._count += 1
            request_id = f"{job.label or 'job'}-{self._count}"
            self.engine.add_request(
                request_id,
                {"prompt_token_ids": job.prompt_ids},
                sampling_params(job, self.skip_special_tokens),
                lora_request=self.lora_request,
            )
            self.running[request_id] = Running(job)

    def _drop_gone(self) -> None:
        now = time.monotonic()
        for request_id, running in list(self.running.items()):
            if running.job.cancelled.is_set() or now > running.job.deadline:
                self.engine.abort_request([request_id])
                del self.running[request_id]
                if not running.job.cancelled.is_set():
                    running.job.deliver(Failed(504, "the request timed out before generation finished"))

    def _deliver(self, output: Any) -> None:
        running = self.running.get(output.request_id)
        if running is None:  # aborted a moment ago
            return
        for choice in output.outputs:
            if choice.index in running.finished:
                continue
            sent = running.sent.get(choice.index, 0)
            text = choice.text
            if choice.finish_reason is not None:
                reason = "length" if choice.finish_reason == "length" else "stop"
                running.finished.add(choice.index)
                running.job.deliver(Finished(choice.index, text[sent:], reason, len(choice.token_ids)))
            elif len(text) > sent and not text.endswith("\ufffd"):
                running.job.deliver(Delta(choice.index, text[sent:]))
                running.sent[choice.index] = len(text)
        if output.finished:
            del self.running[output.request_id]


def sampling_params(job: Job, skip_special_tokens: bool) -> Any:
    """vLLM's SamplingParams for a job: the same fields the transformers batcher reads."""
    from vllm import SamplingParams

    sampling = job.sampling
    extra: dict[str, Any] = {}
    if sampling.json_object:
        extra.update(json_object_params())
    return SamplingParams(
        n=job.n,
        max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        seed=None if sampling.seed is None else sampling.seed % 2**63,
        stop=list(sampling.stop),
        skip_special_tokens=skip_special_tokens,
        **extra,
    )


def json_object_params() -> dict[str, Any]:
    """vLLM's own JSON constraint: `structured_outputs` in recent versions, `guided_decoding` before."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json_object=True)}
    return {"structured_outputs": StructuredOutputsParams(json_object=True)}


def load_vllm_backend(
    model_dir: str,
    adapter_dirs: list[Path],
    dtype: str,
    trust_remote_code: bool,
    max_queue: int,
    skip_special_tokens: bool,
) -> tuple[VllmBackend, int]:
    """A vLLM engine on `model_dir` (and the adapter, through LoRA), wrapped as a backend; and its context length."""
    if len(adapter_dirs) > 1:
        raise ConfigError(
            f"`infer_backend: vllm` serves one LoRA adapter; {len(adapter_dirs)} were given: merge the others first "
            "(tunesmith export) or use `infer_backend: huggingface`"
        )
    from vllm import EngineArgs, LLMEngine

    lora_request, lora_options = None, {}
    if adapter_dirs:
        from vllm.lora.request import LoRARequest

        rank = json.loads((adapter_dirs[0] / "adapter_config.json").read_text())["r"]
        # vLLM takes ranks 8, 16, 32, ...: the adapter's rank rounded up to one of them
        lora_options = {"enable_lora": True, "max_lora_rank": 1 << max(3, (rank - 1).bit_length()), "max_loras": 1}
        lora_request = LoRARequest("adapter", 1, str(adapter_dirs[0]))
    arguments = EngineArgs(
        model=model_dir,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        **lora_options,
    )
    engine = LLMEngine.from_engine_args(arguments)
    context = engine.model_config.max_model_len
    return VllmBackend(engine, lora_request, max_queue, skip_special_tokens), context
