"""Batched generation for the server: one worker thread, a bounded queue, and a decoding loop with a row per choice.

The worker decodes up to `max_batch_size` rows (one per requested choice) together with a KV cache, one token per
step for every row. Between steps, queued requests that fit are prefilled (their prompts left-padded) and joined to
the running batch, their cache left-padded to its width (continuous batching), and finished rows leave it; so a long
answer does not hold back a short one. Each row has its own sampling settings (temperature, top_p, penalties, a
seeded generator), stop strings and token limit, so requests with different settings share a batch. Before each
step the worker drops rows whose client went away (the request's cancel flag) or whose time ran out. A full queue
is refused at once so the caller can answer 429.

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

from tunesmith.serve.json_mode import JsonPrefix, TokenTexts, choose_json_token

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
    json_object: bool = False  # constrain the answer to one JSON object (json_mode.py)


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
    json_state: JsonPrefix | None = None  # a JSON row's parser state


@dataclass
class ActiveBatch:
    """The rows being decoded together: their KV cache, attention mask (left-padded), next input and positions."""

    rows: list[Row]
    cache: Any  # a transformers DynamicCache: [rows, heads, mask width, head_dim] per layer
    mask: torch.Tensor  # [rows, width]: 1 where the cache holds a real token
    next_ids: torch.Tensor  # [rows, 1]: the token each row feeds next
    positions: torch.Tensor  # [rows, 1]: its position

    @property
    def mergeable(self) -> bool:
        """New rows can join only a cache whose layers are plain growing tensors (not sliding windows)."""
        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(hasattr(layer, "keys") and not layer.is_sliding for layer in layers)

    def merge(self, other: ActiveBatch) -> ActiveBatch:
        """Both batches in one: the shorter side's cache and mask left-padded to the longer, rows stacked."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)])
            mine.values = torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)])
        mask = torch.cat([left_pad(self.mask, width), left_pad(other.mask, width)])
        return ActiveBatch(
            self.rows + other.rows,
            self.cache,
            mask,
            torch.cat([self.next_ids, other.next_ids]),
            torch.cat([self.positions, other.positions]),
        )

    def prune(self) -> ActiveBatch | None:
        """Drop finished rows (and the padding columns no remaining row needs); None when no row is left."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        mask = self.mask[index]
        first = int(mask.any(dim=0).nonzero()[0]) if self.mergeable else 0
        if first > 0:
            mask = mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        rows = [self.rows[i] for i in keep]
        return ActiveBatch(rows, self.cache, mask, self.next_ids[index], self.positions[index])


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence dimension (the last one of a mask, the third of a cache's keys/values)."""
    missing = width - (tensor.shape[-1] if tensor.dim() == 2 else tensor.shape[-2])
    if missing == 0:
        return tensor
    padding = (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0)
    return torch.nn.functional.pad(tensor, padding)


class JobWorker:
    """A worker thread that takes jobs from a bounded queue: `submit` (QueueFull when full), `start`, `stop`,
    `alive`. The transformers Batcher and the vLLM backend are both one."""

    def __init__(self, max_queue: int, thread_name: str):
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name=thread_name, daemon=True)

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
        raise NotImplementedError


class Batcher(JobWorker):
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
        self.first_stop_id = stop_token_ids[0]
        self._token_texts: TokenTexts | None = None  # built when the first JSON row needs it
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids[0]
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self.cache_key = cache_argument(model)
        super().__init__(max_queue, "tunesmith-batcher")

    def _work(self) -> None:
        batch: ActiveBatch | None = None
        waiting: list[Job] = []  # taken from the queue, waiting for room in the batch
        while not self._stopping.is_set():
            self._take_jobs(waiting, block=batch is None)
            admitted: list[Job] = []
            try:
                with torch.inference_mode():
                    batch = self._admit(batch, waiting, admitted)
                    if batch is not None:
                        batch = self._step(batch)
            except RuntimeError as error:  # torch's errors (out of memory among them): fail these, keep serving
                log.exception("generation failed")
                jobs = {id(job): job for job in admitted + ([row.job for row in batch.rows] if batch else [])}
                for job in jobs.values():
                    job.deliver(Failed(500, f"generation failed: {type(error).__name__}"))
                batch = None

    def _take_jobs(self, waiting: list[Job], block: bool) -> None:
        """Move queued jobs to `waiting`, as many as a batch could take; the rest stay queued (and count for 429)."""
        if block and not waiting:
            try:
                waiting.append(self.jobs.get(timeout=0.1))
            except queue.Empty:
                return
        while sum(job.n for job in waiting) < self.max_batch_size:
            try:
                waiting.append(self.jobs.get_nowait())
            except queue.Empty:
                return

    def _admit(self, batch: ActiveBatch | None, waiting: list[Job], admitted: list[Job]) -> ActiveBatch | None:
        """Prefill the waiting jobs that fit and join them to the running batch (continuous batching); the jobs
        taken are added to `admitted`, so that a failure can reach them too."""
        if batch is not None and not batch.mergeable:
            return batch
        room = self.max_batch_size - (len(batch.rows) if batch is not None else 0)
        while waiting and (waiting[0].n <= room or (batch is None and not admitted)):
            job = waiting.pop(0)
            if job.cancelled.is_set():
                continue
            admitted.append(job)
            room -= job.n
        if not admitted:
            return batch
        rows = [
            Row(
                job,
                index,
                seeded_generator(job.sampling.seed, index, self.device),
                json_state=JsonPrefix() if job.sampling.json_object else None,
            )
            for job in admitted
            for index in range(job.n)
        ]
        new = self._prefill(rows)
        if batch is not None:
            new = batch.merge(new)
        return new.prune()

    def _prefill(self, rows: list[Row]) -> ActiveBatch:
        prompts = [row.job.prompt_ids for row in rows]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, logits = self._forward(input_ids, mask, positions, None)
        return ActiveBatch(rows, cache, mask, self._sample_and_advance(rows, logits), positions[:, -1:] + 1)

    def _step(self, batch: ActiveBatch) -> ActiveBatch | None:
        self._drop_gone(batch.rows)
        batch = batch.prune()
        if batch is None:
            return None
        mask = torch.cat([batch.mask, torch.ones_like(batch.next_ids)], dim=1)
        cache, logits = self._forward(batch.next_ids, mask, batch.positions, batch.cache)
        next_ids = self._sample_and_advance(batch.rows, logits)
        return ActiveBatch(batch.rows, cache, mask, next_ids, batch.positions + 1).prune()

    def _forward(self, input_ids, mask, positions, cache) -> tuple[Any, torch.Tensor]:
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_key: cache},
        )
        return getattr(output, self.cache_key), output.logits[:, -1, :].float()

    def _sample_and_advance(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row (a pad for finished rows), each added to its row."""
        next_ids = [self._next_token(row, logits[i]) if not row.done else self.pad_id for i, row in enumerate(rows)]
        for row, token in zip(rows, next_ids, strict=True):
            if not row.done:
                self._advance(row, token)
        return torch.tensor(next_ids, device=self.device).unsqueeze(1)

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
        sample = sampling.temperature != 0
        if sample:
            logits = logits / sampling.temperature
            if sampling.top_k > 0:
                kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
                logits[logits < kth] = float("-inf")
            if sampling.top_p < 1.0:
                ordered, order = logits.sort(descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                drop = cumulative - ordered.softmax(-1) > sampling.top_p  # keep the token that crosses top_p
                logits[order[drop]] = float("-inf")
        if row.json_state is not None:
            tokens_left = sampling.max_new_tokens - len(row.tokens)
            token = choose_json_token(row.json_state, logits, self.token_texts(), tokens_left, row.generator, sample)
            return self.first_stop_id if token is None else token
        if not sample:
            return int(logits.argmax())
        return int(torch.multinomial(logits.softmax(-1), 1, generator=row.generator))

    def token_texts(self) -> TokenTexts:
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer, self.skip_special_tokens)
        return self._token_texts

    def _advance(self, row: Row, token: int) -> None:
        """Add a token to the row; send the text that is certain; finish on a stop token, stop string or limit."""
        sampling = row.job.sampling
        row.tokens.append(token)
        if row.json_state is not None and token not in self.stop_token_ids:
            row.json_state = row.json_state.feed(self.token_texts().texts[token] or "") or row.json_state
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=self.skip_special_tokens)
        reason = None
        cut = first_stop(text, sampling.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif token in self.stop_token_ids or (row.json_state is not None and row.json_state.done):
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
