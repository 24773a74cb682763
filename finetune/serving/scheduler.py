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
  its time limit (`time_limit_s` from its admission); its answer is delivered at once and the cache drops
  its row (and the columns that became padding in every row, kv_cache.RunningBatch).
- **Adapters, per row**: a request's adapter ("active", "base" or a version) is resolved when it reaches the
  head of the line, and `select_model` gives the row its model and its adapter (loading the adapter if
  needed). The row keeps them until it leaves: a promote or rollback applies to every request admitted after
  it, never to an answer under way. Rows of different LoRA adapters and of the base decode together in one
  batch on the one loaded base (each step passes every row's adapter: PEFT's mixed-adapter batches, see
  kv_cache.RunningBatch). Only versions that are models of their own (full fine-tunes) cannot mix: rows run
  together when `batch_key` gives their versions one key (by default each version has its own), and a request
  whose key differs from the running batch's waits, with everyone behind it (first come, first served), until
  the batch drains. A row holds its choice's `scope` while it runs (the served models keep its adapter loaded
  until it leaves).
- **Decoding**: greedy by default, sampling with `temperature` when `do_sample`; the model's own generation
  config contributes what generate() would apply too: its repetition penalty, and its top-k / top-p when
  sampling. A streaming consumer gets each row's text as it grows (finetune.serving.streaming.TextStream).
- **Failures**: a request whose model cannot be chosen, or whose prompt or prefill fails, gets the exception;
  a decode step that fails fails every row of the running batch, and the scheduler goes on with the next
  requests. No caller is left waiting.

Assumptions: one thread decodes, so `select_model`, `batch_key` and `on_text` run on it and must be quick (an
adapter load pauses every row for its duration). Prompts have at least two tokens.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
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
    """The model a row generates with, as `select_model(version)` returns it."""

    model: object  # the one loaded base (with its adapters), or a full fine-tune
    version: str | None  # the version that answers (None: the base, also when the one asked could not load)
    notices: tuple[str, ...] = ()  # e.g. why the asked version could not load
    # The row's adapter among those loaded on `model` (kv_cache.PEFT_BASE: none of them); None: the model as it is.
    adapter: str | None = None
    scope: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)  # held while the row runs


@dataclass
class _Row:
    request: GenerationRequest
    choice: ModelChoice
    prompt: list[int]
    notices: tuple[str, ...]
    deadline: float
    stream: TextStream | None
    next_token: int
    scope: contextlib.ExitStack  # the choice's scope, closed when the row leaves
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Batch:
    key: Hashable  # batch_key of its rows' versions
    cache: object  # kv_cache.RunningBatch
    sampler: Callable
    rows: list[_Row] = field(default_factory=list)


class BatchScheduler:
    """Continuous batching on one in-process model (see the module's docstring)."""

    def __init__(self, *, select_model: Callable[[str | None], ModelChoice], resolve: Callable[[str], str | None],
                 tokenizer, stop_ids: list[int], max_new_tokens: int, time_limit_s: float, max_batch_size: int,
                 do_sample: bool = False, temperature: float = 0.7, prefill_tokens_per_step: int = 2048,
                 batch_key: Callable[[str | None], Hashable] = lambda version: version):
        self.select_model = select_model
        self.resolve = resolve
        self.batch_key = batch_key  # rows whose versions have one key may share a batch (default: one version)
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
        self.tokens_generated = 0  # tokens decoded, every row's, stop tokens included
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
            try:
                batch = self._admit(batch)
                if batch is not None and batch.rows:
                    self._step(batch)
            except BaseException as exc:  # never leave a caller waiting
                log.exception("engine: a generation batch failed")
                for row in batch.rows if batch is not None else []:
                    self._leave(row, exc)
                batch = None
            if batch is not None and not batch.rows:
                batch = None

    @staticmethod
    def _leave(row: _Row, outcome: Generated | BaseException) -> None:
        """The row's answer (or its failure) to its caller; its scope closes (its adapter may unload)."""
        try:
            if not row.request.future.done():
                if isinstance(outcome, BaseException):
                    row.request.future.set_exception(outcome)
                else:
                    row.request.future.set_result(outcome)
        finally:
            row.scope.close()

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

    def _start_batch(self, key: Hashable, model) -> _Batch:
        from finetune.serving.kv_cache import RunningBatch  # imports torch: loaded with the model

        self.batches_run += 1
        return _Batch(key, RunningBatch(model, reserve=self.max_new_tokens, slots=self.max_batch_size),
                      _sampler(model, do_sample=self.do_sample, temperature=self.temperature))

    def _admit(self, batch: _Batch | None) -> _Batch | None:
        """Prefill requests from the head of the line whose versions may join the batch (starting one when there
        is none), within this step's budget; the batch, or None when there is none."""
        versions: dict[str, str | None] = {}  # adapters resolved this step: one store query each
        admitted: list[_Row] = []
        prefilled: list = []
        budget = self.prefill_tokens_per_step
        decoding = batch is not None and bool(batch.rows)
        while (self._waiting and not self._stop.is_set() and budget > 0
               and len(batch.rows if batch else ()) + len(admitted) < self.max_batch_size):
            request = self._waiting[0]
            try:
                version = self._version_of(request, versions)
                key = self.batch_key(version)
            except Exception as exc:  # e.g. the store could not be read: this request fails, not the batch
                self._waiting.popleft().future.set_exception(exc)
                continue
            if batch is not None and key != batch.key:
                break  # it waits for the batch to drain, and everyone behind it too
            self._waiting.popleft()
            if not request.future.set_running_or_notify_cancel():
                continue  # the caller gave up waiting
            scope = contextlib.ExitStack()
            try:
                choice = self.select_model(version)
                scope.enter_context(choice.scope)
                if batch is None:
                    batch = self._start_batch(key, choice.model)
                batch.cache.model = choice.model  # the base, wrapped by PEFT once its first adapter loaded
                ids, trimmed = request.prompt(choice.version)
                prefilled.append(batch.cache.prefill(ids, choice.adapter))
            except Exception as exc:
                log.exception("engine: a request could not be given a model or prefilled")
                scope.close()
                request.future.set_exception(exc)
                continue
            stream = TextStream(self._decode, request.on_text) if request.on_text is not None else None
            notices = choice.notices + ((trimmed,) if trimmed else ())
            admitted.append(_Row(request, choice, ids, notices, time.monotonic() + self.time_limit_s, stream,
                                 ids[-1], scope))
            budget -= len(ids)
        if admitted:
            try:
                batch.cache.add(prefilled, [len(row.prompt) - 1 for row in admitted])
            except BaseException as exc:
                for row in admitted:
                    self._leave(row, exc)
                raise
            batch.rows += admitted
            self.joined_running += len(admitted) if decoding else 0
            self.largest_batch = max(self.largest_batch, len(batch.rows))
        return batch

    def _step(self, batch: _Batch) -> None:
        """One decode step for every row; rows that stop leave the batch with their answers."""
        logits = batch.cache.step([row.next_token for row in batch.rows], [row.choice.adapter for row in batch.rows])
        tokens = batch.sampler(logits, batch.rows)
        self.tokens_generated += len(tokens)
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
                self._deliver(batch.rows[i])
            batch.rows = [batch.rows[i] for i in batch.cache.remove(finished)]

    def _deliver(self, row: _Row) -> None:
        text = clean_answer(self._decode(row.tokens))
        if row.stream is not None:
            row.stream.finish(text)
        self._leave(row, Generated(text, row.choice.version, row.notices, tuple(row.tokens)))

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
