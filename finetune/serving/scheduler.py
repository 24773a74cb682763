"""Generation for the answer engine: the backend interface, and the in-process continuous-batching scheduler.

The engine hands generation a `GenerationRequest` (the adapter asked for, a function that builds the prompt
for the version that will answer, a streaming consumer) through `submit`, and gets a Future of `Generated`.
Any backend with `start`, `submit` and `close` serves the engine: `BatchScheduler` below generates in this
process; another (a vLLM client) resolves the adapter and builds the prompt through the same request.

`BatchScheduler` runs one thread that keeps a running batch (finetune.serving.kv_cache.RunningBatch):

- **Joining**: between two decode steps, requests waiting in line join the running batch, oldest first,
  each prefilled alone (at most `prefill_tokens_per_step` prompt tokens a step, at least one request, so
  that rows already decoding are not stalled for a whole burst of prefills).
- **Leaving**: a row leaves at the step it generates a stop token, reaches `max_new_tokens`, or passes
  its time limit (`time_limit_s` from its admission); its answer is delivered at once and the cache is
  rebuilt without it (columns that became padding in every row go with it).
- **Adapters**: every row of a running batch uses one model/adapter version. A request's adapter ("active",
  "base" or a version) is resolved when it reaches the head of the line, so a promote or rollback applies
  to every request admitted after it, and never to an answer under way. A request whose version differs
  from the running batch's waits, and so does everyone behind it (first come, first served), until the
  batch drains; then the scheduler switches the model (`select_model`, which may load an adapter) and
  starts a batch for it. Draining rather than mixing adapters in one batch: PEFT applies one active adapter
  to a whole forward pass; per-row adapters are a later change. The cost is that a switch waits for the
  longest answer in flight (bounded by the time limit). Head-of-line order keeps a steady stream of
  requests for one version from starving another.
- **Decoding**: greedy by default, sampling with `temperature` when `do_sample`; the model's own generation
  config contributes what generate() would apply too: its repetition penalty, and its top-k / top-p when
  sampling. A streaming consumer gets each row's text as it grows (finetune.serving.streaming.TextStream).
- **Failures**: a request whose prompt or prefill fails gets the exception; a decode step that fails fails
  every row of the running batch, and the scheduler goes on with the next requests. No caller is left
  waiting.

Assumptions: one thread decodes, so `select_model` and `on_text` run on it and must be quick (an adapter
load pauses every answer, as it did between batches before). Prompts have at least two tokens.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from finetune.serving.streaming import TextStream, clean_answer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    text: str
    adapter_version: str | None  # the version that generated it; None = the base model
    notices: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()  # the generated ids, stop token included (tests and benchmarks compare them)


@dataclass
class GenerationRequest:
    adapter: str  # as asked: "active", "base" or a version; resolved by the backend when it admits the request
    # The prompt's token ids for the version that will answer (None: the base), and a notice when it was trimmed.
    prompt: Callable[[str | None], tuple[list[int], str | None]]
    on_text: Callable[[str], None] | None = None  # streaming consumer: pieces of the answer as generated
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)


class BackendClosed(RuntimeError):
    """submit() after close(): the engine answers with its shutting-down notice."""


class GenerationBackend(Protocol):
    """What the engine needs from generation."""

    def start(self) -> None: ...

    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; raises BackendClosed once close() has begun."""
        ...

    def close(self, timeout: float) -> list[GenerationRequest]:
        """Stop; finish or fail what is under way; return the requests never started (the engine answers them)."""
        ...


@dataclass(frozen=True)
class ModelChoice:
    """The model a batch generates with, as `select_model(version)` returns it."""

    model: object
    version: str | None  # the version that answers (None: the base, also when the one asked could not load)
    notices: tuple[str, ...] = ()  # e.g. why the asked version could not load
    scope: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)  # held while it runs


@dataclass
class _Row:
    request: GenerationRequest
    prompt: list[int]
    notices: tuple[str, ...]
    deadline: float
    stream: TextStream | None
    next_token: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Batch:
    asked: str | None  # the resolved version its requests asked for
    choice: ModelChoice
    cache: object  # kv_cache.RunningBatch
    sampler: Callable
    exit: contextlib.ExitStack
    rows: list[_Row] = field(default_factory=list)


class BatchScheduler:
    """Continuous batching on one in-process model (see the module's docstring)."""

    def __init__(self, *, select_model: Callable[[str | None], ModelChoice], resolve: Callable[[str], str | None],
                 tokenizer, stop_ids: list[int], max_new_tokens: int, time_limit_s: float, max_batch_size: int,
                 do_sample: bool = False, temperature: float = 0.7, prefill_tokens_per_step: int = 2048):
        self.select_model = select_model
        self.resolve = resolve
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.max_new_tokens = max_new_tokens
        self.time_limit_s = time_limit_s
        self.max_batch_size = max(1, max_batch_size)
        self.do_sample = do_sample
        self.temperature = temperature
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.batches_run = 0  # running batches started (from empty to drained)
        self.largest_batch = 0  # the most rows decoded together
        self.joined_running = 0  # requests that joined a batch that was already decoding
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._waiting: deque[GenerationRequest] = deque()
        self._stop = threading.Event()
        self._closing = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- the interface --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="kbloop-engine-generate", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest) -> Future:
        with self._closing:  # never after close() collected the line: that request would wait forever
            if self._stop.is_set():
                raise BackendClosed("the generation backend is closed")
            self._queue.put(request)
        return request.future

    def close(self, timeout: float) -> list[GenerationRequest]:
        """Stop admitting, let the running batch finish (bounded by the time limit), and return the requests
        that never started."""
        with self._closing:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        left = list(self._waiting)
        self._waiting.clear()
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                return [r for r in left if not r.future.done()]

    # --- the loop -------------------------------------------------------------------------------------

    def _work(self) -> None:
        batch: _Batch | None = None
        while True:
            self._take(block=batch is None)
            if self._stop.is_set() and batch is None:
                return
            versions: dict[str, str | None] = {}  # adapters resolved this step: one store query each
            if batch is None and self._waiting and not self._stop.is_set():
                try:
                    batch = self._start_batch(self._version_of(self._waiting[0], versions))
                except BaseException as exc:  # no model for the head of the line: that request fails
                    log.exception("engine: no model could be chosen for a request")
                    self._fail([self._waiting.popleft()], exc)
                    continue
            if batch is None:
                continue
            try:
                self._admit(batch, versions)
                if batch.rows:
                    self._step(batch)
            except BaseException as exc:  # never leave a caller waiting
                log.exception("engine: a generation batch failed")
                self._fail([row.request for row in batch.rows], exc)
                batch.rows.clear()
            if not batch.rows:
                batch.exit.close()
                batch = None

    @staticmethod
    def _fail(requests: list[GenerationRequest], exc: BaseException) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(exc)

    def _take(self, *, block: bool) -> None:
        """Move submitted requests into the line; wait a little for one when nothing else is to be done."""
        if block and not self._waiting:
            try:
                self._waiting.append(self._queue.get(timeout=0.2))
            except queue.Empty:
                return
        while True:
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _version_of(self, request: GenerationRequest, versions: dict[str, str | None]) -> str | None:
        if request.adapter not in versions:
            versions[request.adapter] = self.resolve(request.adapter)
        return versions[request.adapter]

    def _start_batch(self, asked: str | None) -> _Batch:
        from finetune.serving.kv_cache import RunningBatch  # imports torch: loaded with the model

        choice = self.select_model(asked)
        with contextlib.ExitStack() as exit:
            exit.enter_context(choice.scope)
            batch = _Batch(asked, choice, RunningBatch(choice.model, reserve=self.max_new_tokens,
                                                       slots=self.max_batch_size),
                           _sampler(choice.model, do_sample=self.do_sample, temperature=self.temperature),
                           exit.pop_all())  # held until the batch drains
        self.batches_run += 1
        return batch

    def _admit(self, batch: _Batch, versions: dict[str, str | None]) -> None:
        """Prefill requests from the head of the line that ask for the batch's version, within this step's budget."""
        admitted: list[_Row] = []
        prefilled: list = []
        budget = self.prefill_tokens_per_step
        decoding = bool(batch.rows)
        while (self._waiting and not self._stop.is_set() and budget > 0
               and len(batch.rows) + len(admitted) < self.max_batch_size):
            request = self._waiting[0]
            try:
                if self._version_of(request, versions) != batch.asked:
                    break  # it waits for the batch to drain, and everyone behind it too
            except Exception as exc:  # e.g. the store could not be read: this request fails, not the batch
                self._waiting.popleft().future.set_exception(exc)
                continue
            self._waiting.popleft()
            if not request.future.set_running_or_notify_cancel():
                continue  # the caller gave up waiting
            try:
                ids, trimmed = request.prompt(batch.choice.version)
                prefilled.append(batch.cache.prefill(ids))
            except Exception as exc:
                log.exception("engine: a prompt could not be prefilled")
                request.future.set_exception(exc)
                continue
            stream = TextStream(self._decode, request.on_text) if request.on_text is not None else None
            notices = batch.choice.notices + ((trimmed,) if trimmed else ())
            admitted.append(_Row(request, ids, notices, time.monotonic() + self.time_limit_s, stream, ids[-1]))
            budget -= len(ids)
        if admitted:
            batch.cache.add(prefilled, [len(row.prompt) - 1 for row in admitted])
            batch.rows += admitted
            self.joined_running += len(admitted) if decoding else 0
            self.largest_batch = max(self.largest_batch, len(batch.rows))

    def _step(self, batch: _Batch) -> None:
        """One decode step for every row; rows that stop leave the batch with their answers."""
        logits = batch.cache.step([row.next_token for row in batch.rows])
        tokens = batch.sampler(logits, batch.rows)
        now = time.monotonic()
        finished = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens)):
            row.tokens.append(token)
            row.next_token = token
            if token in self.stop_ids or len(row.tokens) >= self.max_new_tokens or now >= row.deadline:
                finished.append(i)
            elif row.stream is not None:
                row.stream.update(row.tokens)
        if finished:
            for i in finished:
                self._deliver(batch, batch.rows[i])
            batch.rows = [batch.rows[i] for i in batch.cache.remove(finished)]

    def _deliver(self, batch: _Batch, row: _Row) -> None:
        text = clean_answer(self._decode(row.tokens))
        if row.stream is not None:
            row.stream.finish(text)
        row.request.future.set_result(Generated(text, batch.choice.version, row.notices, tuple(row.tokens)))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _sampler(model, *, do_sample: bool, temperature: float) -> Callable:
    """`sample(logits, rows) -> next token per row`: greedy, or sampling with `temperature`; with what the
    model's generation config adds in generate() (its repetition penalty; its top-k and top-p when sampling)."""
    import torch
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    defaults = getattr(model, "generation_config", None)
    penalty = getattr(defaults, "repetition_penalty", None)
    per_row = [RepetitionPenaltyLogitsProcessor(penalty)] if penalty not in (None, 1.0) else []
    warpers = []
    if do_sample:
        warpers.append(TemperatureLogitsWarper(temperature))
        top_k, top_p = getattr(defaults, "top_k", None), getattr(defaults, "top_p", None)
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))

    def sample(logits, rows: list[_Row]) -> list[int]:
        scores = logits.float()
        if per_row:  # the penalty looks at each row's own ids: prompt and answer so far
            scores = torch.cat([_apply(per_row, row, scores[i:i + 1]) for i, row in enumerate(rows)])
        if not do_sample:
            return scores.argmax(dim=-1).tolist()
        for warper in warpers:
            scores = warper(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0].tolist()

    def _apply(processors, row: _Row, scores):
        ids = torch.tensor([row.prompt + row.tokens], device=scores.device)
        for processor in processors:
            scores = processor(ids, scores)
        return scores

    return sample
