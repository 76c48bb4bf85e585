"""Batched generation for the server: one worker thread, a bounded queue, and a decoding loop with a row per choice.

The worker takes up to `max_batch_size` rows (one per requested choice) from the queue, left-pads their prompts
into one batch and decodes them together with a KV cache, one token per step for every row. Each row has its own
sampling settings (temperature, top_p, a seeded generator), its own stop strings and token limit, so requests with
different settings share a batch. Before each step the worker drops rows whose client went away (the request's
cancel flag) or whose time ran out; the batch ends when every row has finished. New requests wait in the queue
meanwhile (static batching); a full queue is refused at once so the caller can answer 429.

Results go back through `deliver`, a callback the HTTP layer supplies, as `Delta`, `Finished` and `Failed` events.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("tunesmith.serve")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: off
    repetition_penalty: float  # 1: none
    seed: int | None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated


@dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    index: int
    text: str  # the last piece of text not yet sent as a Delta
    reason: str  # "stop" | "length"
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


Event = Delta | Finished | Failed


@dataclass
class Job:
    """One request: its prompt, how to sample, how many choices, and where its events go."""

    prompt_ids: list[int]
    sampling: Sampling
    n: int
    deliver: Callable[[Event], None]
    deadline: float  # time.monotonic() after which the request fails with a timeout
    cancelled: threading.Event = field(default_factory=threading.Event)
    label: str = ""  # the request id, for the log


class QueueFull(Exception):
    """The queue holds as many requests as it may; the caller answers 429."""


@dataclass
class Row:
    """One choice of one job being decoded."""

    job: Job
    index: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent_chars: int = 0
    done: bool = False


class Batcher:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stop_token_ids: list[int],
        max_batch_size: int,
        max_queue: int,
        skip_special_tokens: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_token_ids = set(stop_token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids[0]
        self.max_batch_size = max_batch_size
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.device = next(model.parameters()).device
        self.cache_key = cache_argument(model)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="tunesmith-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _work(self) -> None:
        pending: list[Job] = []  # taken from the queue but not fitting the current batch
        while not self._stopping.is_set():
            if not pending:
                try:
                    pending.append(self.jobs.get(timeout=0.1))
                except queue.Empty:
                    continue
            batch, rows = [], 0
            while pending and (not batch or rows + pending[0].n <= self.max_batch_size):
                job = pending.pop(0)
                batch.append(job)
                rows += job.n
                if not pending:
                    try:
                        pending.append(self.jobs.get_nowait())
                    except queue.Empty:
                        break
            live = [job for job in batch if not job.cancelled.is_set()]
            if live:
                self._generate(live)

    def _generate(self, jobs: list[Job]) -> None:
        rows = [
            Row(job, index, seeded_generator(job.sampling.seed, index, self.device))
            for job in jobs
            for index in range(job.n)
        ]
        try:
            with torch.inference_mode():
                self._decode(rows)
        except RuntimeError as error:  # torch's errors (out of memory among them): fail these requests, keep serving
            log.exception("generation failed")
            for job in jobs:
                job.deliver(Failed(500, f"generation failed: {type(error).__name__}"))

    def _decode(self, rows: list[Row]) -> None:
        prompts = [row.job.prompt_ids for row in rows]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        while True:
            self._drop_gone(rows)
            if all(row.done for row in rows):
                return
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_key: cache},
            )
            cache = getattr(output, self.cache_key)
            logits = output.logits[:, -1, :].float()
            next_ids = [self._next_token(row, logits[i]) if not row.done else self.pad_id for i, row in enumerate(rows)]
            for row, token in zip(rows, next_ids, strict=True):
                if not row.done:
                    self._advance(row, token)
            input_ids = torch.tensor(next_ids, device=self.device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(input_ids)], dim=1)
            positions = positions[:, -1:] + 1

    def _drop_gone(self, rows: list[Row]) -> None:
        now = time.monotonic()
        for row in rows:
            if row.done:
                continue
            if row.job.cancelled.is_set():
                row.done = True
                log.info("%s choice %d stopped after %d tokens: cancelled", row.job.label, row.index, len(row.tokens))
            elif now > row.job.deadline:
                for other in rows:
                    if other.job is row.job:
                        other.done = True
                row.job.deliver(Failed(504, "the request timed out before generation finished"))

    def _next_token(self, row: Row, logits: torch.Tensor) -> int:
        sampling = row.job.sampling
        if sampling.repetition_penalty != 1.0:
            seen = torch.tensor(row.job.prompt_ids + row.tokens, device=logits.device).unique()
            scores = logits[seen]
            logits[seen] = torch.where(
                scores > 0, scores / sampling.repetition_penalty, scores * sampling.repetition_penalty
            )
        if sampling.presence_penalty or sampling.frequency_penalty:
            apply_openai_penalties(logits, row.tokens, sampling.presence_penalty, sampling.frequency_penalty)
        if sampling.temperature == 0:
            return int(logits.argmax())
        logits = logits / sampling.temperature
        if sampling.top_k > 0:
            kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
            logits[logits < kth] = float("-inf")
        if sampling.top_p < 1.0:
            ordered, order = logits.sort(descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) > sampling.top_p  # keep the token that crosses top_p
            logits[order[drop]] = float("-inf")
        return int(torch.multinomial(logits.softmax(-1), 1, generator=row.generator))

    def _advance(self, row: Row, token: int) -> None:
        """Add a token to the row; send the text that is certain; finish on a stop token, stop string or limit."""
        sampling = row.job.sampling
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=self.skip_special_tokens)
        reason = None
        cut = first_stop(text, sampling.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif token in self.stop_token_ids:
            reason = "stop"
        elif len(row.tokens) >= sampling.max_new_tokens:
            reason = "length"
        if reason is not None:
            row.done = True
            row.job.deliver(Finished(row.index, text[row.sent_chars :], reason, len(row.tokens)))
            return
        certain = len(text) - held_back(text, sampling.stop)
        if certain > row.sent_chars:
            row.job.deliver(Delta(row.index, text[row.sent_chars : certain]))
            row.sent_chars = certain


def apply_openai_penalties(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> None:
    """OpenAI's penalties, in place: logit -= count * frequency + (count > 0) * presence, over the generated tokens
    only (not the prompt), unlike transformers' multiplicative repetition_penalty."""
    if not generated:
        return
    tokens, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
    logits[tokens] -= counts.to(logits.dtype) * frequency + presence


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [position for stop in stops if (position := text.find(stop)) >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: a half-decoded character, or the start of a stop string."""
    if text.endswith("\ufffd"):  # the token ends inside a multi-byte character; the next token completes it
        return len(text) - len(text.rstrip("\ufffd"))
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def cache_argument(model: Any) -> str:
    """The name of the KV-cache argument and output: `cache` in recent transformers 5, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model forwards **kwargs
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def seeded_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """A generator per choice: the same seed gives the same answers, and choice i differs from choice j."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + index) % 2**63)
    return generator
