"""The answer engine: one loaded model per process, answering questions grounded on the knowledge base.

    engine = Engine(db_path=settings.db_path, home=settings.kbloop_home, base_model=settings.base_model)
    engine.start()                      # loads in the background, returns at once
    engine.wait_ready(120)
    answer = engine.answer("How do I set up the VPN?", source="cli")
    engine.close()

How a question is answered: a question that matches an approved example (finetune.serving.verified: the same
question, a paraphrase or a translation) is answered at once with the curator's answer, marked as such;
no model is involved, so this works while the model loads. Otherwise the caller's thread retrieves
passages (finetune.serving.retrieval) and approved answers to related questions, and hands a request to the one
generation worker thread. With neither, the question is refused ("nothing in the knowledge base") unless
the caller asked for the model alone (`model_only`), which answers anyway with an "unbacked" notice.
Verified answers apply to the active adapter only: asking a named version or the base shows that model. The worker takes whatever requests are waiting, checks
which adapter is active in the store (one cheap query per batch), groups the batch by adapter, and
generates each group as one batch: every prompt is prefilled alone, then all decode together from one
left-padded KV cache (finetune.serving.kv_cache), greedy by default, bounded by max new tokens and a wall time
limit, stopping at the end-of-turn token. Each answer goes back to its caller as soon as its own row
stops, not when the whole batch does. The caller's thread then records the interaction.

Streaming: a caller that passes `on_text` gets the answer's text as it is generated, in pieces, from the
worker thread (each row of a batch to its own caller). The pieces only ever extend what was sent: text that
may still change (a character whose bytes are not all generated yet, trailing spaces, the start of a chat
marker) is held back until the next token settles it, so the pieces put together are exactly
`Answer.text`. Only generated text streams; a verified, refused or starting-up answer arrives whole in the
returned Answer. `on_text` must return quickly (it runs between decode steps of the whole batch).

Hot-swap: adapters are PEFT LoRA folders loaded once each under their version name and switched with
set_adapter between batches; "base" runs with adapters disabled. A promote or rollback therefore takes
effect on the next batch; a batch already generating finishes on the adapter it started with.

Assumptions: adapters in the registry were trained on this engine's base model; an adapter that fails to
load is reported in the answer's notice and the base answers. A full fine-tune (method "full") is
loaded as a second model beside the base (one at a time: it is as large as the base).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from finetune.model.prompting import (
    ApprovedAnswer,
    PromptPassage,
    Turn,
    approved_in_prompt,
    build_messages,
    history_within,
    render_prompt,
    standalone_question,
)
from store.text import CJK_CHAR as _CJK

log = logging.getLogger(__name__)

BASE = "base"
ACTIVE = "active"

# User-facing texts, together so the bot and the playground show the same words.
STARTING_TEXT = "I'm starting up: the model is still loading. Please ask again in a minute."
EMPTY_TEXT = "Please ask a question: the message was empty."
NO_MATCH_TEXT = "I could not find anything about this in the knowledge base, so I can't answer it reliably."
NO_MATCH_TEXT_ZH = "我在知识库中没有找到相关内容，无法可靠地回答这个问题。"
UNAVAILABLE_TEXT = "The answer engine is not available: {error}"
CLOSED_TEXT = "The answer engine is shutting down; please ask again in a moment."
TIMEOUT_TEXT = "Sorry, answering took too long. Please try again."
VERIFIED_BY_TEXT = "Approved answer: reviewed by {reviewer} on {date}"
VERIFIED_IMPORTED_TEXT = "Approved answer: from the curated training data (imported {date})"
# An approved example that backs an answer as context appears among its sources under this name.
APPROVED_SOURCE_TITLE = "Approved answer: {question}"
# Approved answers to related questions looked up per question (at most approved_in_prompt() enter a prompt).
RELATED_LOOKUP = 2

# Chat markers that end an answer if they survive decoding as plain text.
END_MARKERS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine retrieves and generates. One object, built once, passed down."""

    k: int = 3  # passages in the prompt
    max_new_tokens: int = 256
    time_limit_s: float = 60.0  # wall-time bound on one generation batch
    do_sample: bool = False  # greedy: the same question gets the same answer
    temperature: float = 0.7  # only with do_sample
    max_batch_size: int = 16
    # Prompts whose lengths differ more than this generate in separate batches. Padding costs only attention
    # over the padded cache at each decode step (prompts are prefilled alone), while every extra batch pays
    # a full decode of its own: split only for very different lengths (docs/benchmarks.md, "Batching").
    max_length_ratio: float = 3.0
    # After a request arrives, wait this long for another to join its batch; at most batch_max_wait_s.
    batch_window_s: float = 0.05
    batch_max_wait_s: float = 0.25
    adapter_cache_size: int = 3  # LoRA adapters kept loaded (the active one, the previous, one compared)
    max_context_tokens: int = 4096  # cap on the prompt + answer, below the model's own limit
    request_timeout_s: float = 600.0  # how long answer() waits for the worker before giving up
    device: str | None = None  # None: cuda when available, else cpu


@dataclass(frozen=True)
class Source:
    title: str
    doc_path: str


@dataclass(frozen=True)
class Answer:
    text: str
    sources: list[Source]
    adapter_version: str | None  # the adapter that generated it; None = the base model
    latency_ms: int
    interaction_id: int | None  # the row in `interactions`; None when not recorded
    notice: str | None = None  # starting | empty | no_match | unbacked | trimmed: … | adapter errors | timeout
    verified: bool = False  # a curator's approved answer, repeated as it is (no model generated it)
    example_id: int | None = None  # the approved example it repeats
    approved_by: str | None = None  # the curator who approved it ("import" for imported data)
    approved_at: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def verified_line(self) -> str | None:
        """How a verified answer is marked, for every surface alike; None for a generated answer."""
        if not self.verified:
            return None
        date = (self.approved_at or "")[:10] or "an unknown date"
        if self.approved_by in (None, "import"):
            return VERIFIED_IMPORTED_TEXT.format(date=date)
        return VERIFIED_BY_TEXT.format(reviewer=self.approved_by, date=date)


@dataclass
class _Request:
    question: str
    passages: list  # store.kb.Passage
    adapter: str  # "active" | "base" | a version
    approved: list[ApprovedAnswer] = field(default_factory=list)  # answers to related questions
    on_text: Callable[[str], None] | None = None  # streaming consumer: pieces of the answer as generated
    history: list[Turn] = field(default_factory=list)  # the thread's earlier turns (follow-ups), oldest first
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Generated:
    text: str
    adapter_version: str | None
    notices: tuple[str, ...] = ()


def _is_chinese(text: str) -> bool:
    return bool(_CJK.search(text))


def length_buckets(lengths: list[int], ratio: float) -> list[list[int]]:
    """Indices of `lengths`, shortest first, grouped so that in each group the longest is at most `ratio`
    times the shortest."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if buckets and lengths[i] <= ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


class FinishedRows:
    """A generate() streamer (transformers' put/end protocol) that hands each row's new token ids over as
    soon as the row ends with a stop token, and the rest when generation ends: in a batch, a short answer
    does not wait for the longest one."""

    def __init__(self, stop_ids: list[int], on_finished: Callable[[int, list[int]], None],
                 on_tokens: Callable[[int, list[int]], None] | None = None):
        self.stop_ids = set(stop_ids)
        self.on_finished = on_finished
        self.on_tokens = on_tokens  # (row, tokens so far) after each new token of a row that goes on
        self.tokens: list[list[int]] | None = None  # per row, the new tokens so far
        self.finished: set[int] = set()

    def put(self, value) -> None:
        if self.tokens is None:  # generate() puts the prompt ids first
            self.tokens = [[] for _ in range(value.shape[0])]
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if row in self.finished:
                continue  # generate() goes on feeding it padding
            self.tokens[row].append(token)
            if token in self.stop_ids:
                self._finish(row)
            elif self.on_tokens is not None:
                self.on_tokens(row, self.tokens[row])

    def end(self) -> None:
        for row in range(len(self.tokens or [])):
            if row not in self.finished:
                self._finish(row)

    def _finish(self, row: int) -> None:
        self.finished.add(row)
        self.on_finished(row, self.tokens[row])


def clean_answer(text: str) -> str:
    """A decoded answer as callers get it: special tokens are already skipped; a chat marker that survives as
    plain text ends the answer; no surrounding whitespace."""
    for marker in END_MARKERS:
        text = text.split(marker)[0]
    return text.strip()


def settled_text(text: str) -> str:
    """The part of a partly generated answer (decoded so far) that no later token can change in
    `clean_answer`'s result: without a trailing incomplete character (decoded as U+FFFD), a tail that may
    still become a chat marker, and trailing whitespace (stripped at the end unless more text follows)."""
    for marker in END_MARKERS:
        text = text.split(marker)[0]
    text = text.lstrip().rstrip("\ufffd")
    held = max((k for marker in END_MARKERS for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)
    return text[:len(text) - held].rstrip()


class TextStream:
    """One row's streaming consumer: fed the row's token ids after each step, it sends the consumer only text
    that extends what it sent before, so that the pieces put together are the final answer."""

    def __init__(self, decode: Callable[[list[int]], str], consumer: Callable[[str], None]):
        self.decode = decode
        self.consumer = consumer
        self.sent = ""
        self.failed = False  # the consumer raised: it gets nothing more

    def update(self, ids: list[int]) -> None:
        if self.failed:
            return
        settled = settled_text(self.decode(ids))
        # A decode that changed text already sent (not seen with byte-level BPE) waits for the final text.
        if len(settled) > len(self.sent) and settled.startswith(self.sent):
            self._send(settled[len(self.sent):])
            self.sent = settled

    def finish(self, final: str) -> None:
        """Send what remains of the final answer (the caller gets `final` as Answer.text)."""
        if self.failed:
            return
        if final.startswith(self.sent):
            if len(final) > len(self.sent):
                self._send(final[len(self.sent):])
                self.sent = final
        else:
            log.warning("engine: streamed text is not a prefix of the final answer; the caller repairs it")

    def _send(self, piece: str) -> None:
        try:
            self.consumer(piece)
        except Exception:  # a consumer's failure must not stop the batch
            log.exception("engine: a streaming consumer failed; it gets no more text")
            self.failed = True


def thread_history(db, *, channel_id: str | None, thread_ts: str | None) -> list[Turn]:
    """kbloop's earlier answers in a Slack thread (store.interactions), oldest first: what a follow-up is
    asked after. None outside a thread."""
    if not channel_id or not thread_ts:
        return []
    from store.interactions import thread_interactions

    return [Turn(i.question, i.answer) for i in thread_interactions(db, channel_id=channel_id, thread_ts=thread_ts)]


def sources_of(passages, related=()) -> list[Source]:
    """Each document once, in retrieval order, then the approved examples that backed the answer."""
    seen: dict[str, Source] = {}
    for p in passages:
        seen.setdefault(p.doc_path, Source(title=p.title, doc_path=p.doc_path))
    for m in related:
        path = f"examples/{m.example.id}"
        seen.setdefault(path, Source(title=APPROVED_SOURCE_TITLE.format(question=m.example.question), doc_path=path))
    return list(seen.values())


class Engine:
    """One model, one generation worker thread; thread-safe `answer()` for any number of callers."""

    def __init__(self, *, db_path: Path, home: Path, base_model: str, config: EngineConfig | None = None):
        self.db_path = Path(db_path)
        self.home = Path(home)
        self.base_model = base_model
        self.config = config or EngineConfig()
        self.error: str | None = None  # why loading failed, if it did
        self._ready = threading.Event()
        self._loaded = threading.Event()  # loading finished, successfully or not
        self._stop = threading.Event()
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._loader: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        # Owned by the worker thread once loaded:
        self.model = None  # the base model, wrapped in a PeftModel once an adapter is loaded
        self.tokenizer = None
        self._base_path: str | None = None
        self._loaded_adapters: OrderedDict[str, str] = OrderedDict()  # version -> path, LRU order
        self._failed_adapters: dict[str, str] = {}  # version -> error
        self._full_models: OrderedDict[str, object] = OrderedDict()  # version -> model (method "full")
        self._passages: dict[str, int] = {}  # version -> passages per prompt it was trained with
        self._eos_ids: list[int] = []
        self._context_tokens = self.config.max_context_tokens
        self.batches_run = 0  # for benchmarks and tests: how many generate() calls

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Load the model in a background thread and return at once."""
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="kbloop-engine-load", daemon=True)
            self._loader.start()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        self._loaded.wait(timeout)
        return self.ready

    def close(self) -> None:
        """Stop the worker; requests still waiting are answered with a shutting-down notice."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=self.config.time_limit_s + 5)
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            req.future.set_result(_Generated(CLOSED_TEXT, None, ("closed",)))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _load(self) -> None:
        try:
            from finetune.model.loading import load_model_for_inference, resolve_base, serving_stop_ids
            from finetune.serving.retrieval import embedding_model
            from store import local_db

            db = local_db(self.db_path)
            self._base_path = resolve_base(self.base_model, home=self.home, db=db)
            model, tokenizer = load_model_for_inference(self._base_path)
            if self.config.device:
                model = model.to(self.config.device)
            tokenizer.padding_side = "left"  # generation continues from the right edge of every row
            self.tokenizer, self.model = tokenizer, model
            self._eos_ids = serving_stop_ids(model, tokenizer)  # the set the gate's stop rate measures too
            model_limit = getattr(model.config, "max_position_embeddings", None) or self.config.max_context_tokens
            self._context_tokens = min(int(model_limit), self.config.max_context_tokens)
            embedding_model()  # warm the retrieval model too, so the first question does not pay for it
            self._worker = threading.Thread(target=self._work, name="kbloop-engine-generate", daemon=True)
            self._worker.start()
            self._ready.set()
        except Exception as exc:  # reported through answer() and .error; the process keeps running
            from store import StoreError

            if isinstance(exc, StoreError):  # an expected failure whose message says it all: no traceback
                self.error = str(exc)
                log.error("engine: %s", self.error)
            else:
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("engine: loading %s failed", self.base_model)
        finally:
            self._loaded.set()

    # --- answering (any thread) ---------------------------------------------------------------------

    def answer(self, question: str, *, source: str = "cli", user_id: str | None = None,
               channel_id: str | None = None, thread_ts: str | None = None, event_id: str | None = None,
               adapter: str = ACTIVE, record: bool = True, model_only: bool = False,
               on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer one question: a verified answer when one matches (unless `model_only`, or a named adapter is
        asked), else generated. Returns at once with a "starting up" answer while the model loads.
        `on_text`: called from the generation thread with each new piece of a generated answer (see the
        module's docstring, "Streaming")."""
        started = time.monotonic()

        def elapsed_ms() -> int:
            return int((time.monotonic() - started) * 1000)

        question = (question or "").strip()
        if not question:
            return Answer(EMPTY_TEXT, [], None, elapsed_ms(), None, "empty")
        from store import local_db

        db = local_db(self.db_path)
        use_approved = adapter == ACTIVE and not model_only
        if use_approved:
            verified = self.verified_answer(question, source=source, user_id=user_id, channel_id=channel_id,
                                            thread_ts=thread_ts, event_id=event_id, record=record, started=started)
            if verified is not None:
                return verified
        if not self.ready:
            if self.error:
                return Answer(UNAVAILABLE_TEXT.format(error=self.error), [], None, elapsed_ms(), None, "unavailable")
            return Answer(STARTING_TEXT, [], None, elapsed_ms(), None, "starting")
        if self._stop.is_set():
            return Answer(CLOSED_TEXT, [], None, elapsed_ms(), None, "closed")

        from finetune.serving.retrieval import retrieve_passages
        from store.adapters import get_adapter

        if adapter not in (ACTIVE, BASE):
            get_adapter(db, adapter)  # an unknown version is the caller's error: StoreError names it
        version = self._resolve_version(db, adapter)
        # Enough passages for the prompt of the adapter that will most likely answer, and for the sources.
        # A follow-up in a thread is searched together with the question it follows (standalone_question).
        history = thread_history(db, channel_id=channel_id, thread_ts=thread_ts)
        query = standalone_question(question, history)
        passages = retrieve_passages(db, query, k=max(self.config.k, self._passages_for(db, version)))
        related = self._related(db, query) if use_approved else []
        if not passages and not related and not model_only:
            text = NO_MATCH_TEXT_ZH if _is_chinese(question) else NO_MATCH_TEXT
            generated = _Generated(text, version, ("no_match",))
        else:
            req = _Request(question=question, passages=passages, adapter=adapter,
                           approved=[ApprovedAnswer(m.example.question, m.example.answer) for m in related],
                           on_text=on_text, history=history)
            self._queue.put(req)
            try:
                generated = req.future.result(timeout=self.config.request_timeout_s)
            except TimeoutError:
                generated = _Generated(TIMEOUT_TEXT, None, ("timeout",))
            if not passages and not related:  # model_only: nothing backs what the model said
                generated = replace(generated, notices=("unbacked",) + generated.notices)
        backed = (passages or related) and not ({"closed", "no_match"} & set(generated.notices))
        sources = sources_of(passages, related) if backed else []
        notice = "; ".join(generated.notices) or None
        latency = elapsed_ms()
        interaction_id = None
        if record and not ({"closed", "timeout"} & set(generated.notices)):
            from store.interactions import record_interaction

            interaction_id = record_interaction(
                db, question=question, answer=generated.text, source=source,
                sources=[asdict(s) for s in sources], adapter_version=generated.adapter_version,
                latency_ms=latency, user_id=user_id, channel_id=channel_id, thread_ts=thread_ts, event_id=event_id,
            )
        return Answer(generated.text, sources, generated.adapter_version, latency, interaction_id, notice)

    def prompt_ids(self, question: str, *, channel_id: str | None = None, thread_ts: str | None = None,
                   use_approved: bool = True) -> list[int]:
        """The prompt the base model gets for `question` asked now (in that thread, if given): the same
        retrieval, history and trimming as answer(), as token ids. Needs the tokenizer, not the model: it is
        how tests check that training builds the very same prompt."""
        from finetune.serving.retrieval import retrieve_passages
        from store import local_db

        db = local_db(self.db_path)
        question = question.strip()
        history = thread_history(db, channel_id=channel_id, thread_ts=thread_ts)
        query = standalone_question(question, history)
        related = self._related(db, query) if use_approved else []
        req = _Request(question=question, passages=retrieve_passages(db, query, k=self.config.k), adapter=BASE,
                       approved=[ApprovedAnswer(m.example.question, m.example.answer) for m in related],
                       history=history)
        return self._prompt(req, self.config.k)[0]

    def verified_answer(self, question: str, *, source: str = "cli", record: bool = True,
                        started: float | None = None, **slack) -> Answer | None:
        """The approved answer when the question matches an approved example closely, recorded as an
        interaction like any answer (so it can be voted on); None when none matches. Needs no model."""
        from finetune.serving.verified import find_verified
        from store import local_db

        started = time.monotonic() if started is None else started
        db = local_db(self.db_path)
        question = (question or "").strip()
        try:
            match = find_verified(db, question)
        except Exception:  # a broken embedder must not stop the generated answers
            log.exception("engine: looking up verified answers failed")
            return None
        if match is None:
            return None
        ex = match.example
        latency = int((time.monotonic() - started) * 1000)
        interaction_id = None
        if record:
            from store.interactions import record_interaction

            interaction_id = record_interaction(
                db, question=question, answer=ex.answer, source=source, sources=[], adapter_version=None,
                latency_ms=latency, verified_example_id=ex.id, **slack)
        return Answer(ex.answer, [], None, latency, interaction_id, None, verified=True, example_id=ex.id,
                      approved_by=ex.reviewer, approved_at=ex.reviewed_at)

    @staticmethod
    def _related(db, question: str) -> list:
        from finetune.serving.verified import related_examples

        try:
            return related_examples(db, question, k=RELATED_LOOKUP)
        except Exception:
            log.exception("engine: looking up related approved answers failed")
            return []

    def _resolve_version(self, db, adapter: str) -> str | None:
        """The adapter version a request asks for: "active" -> the store's active one (None = base)."""
        if adapter == BASE:
            return None
        if adapter == ACTIVE:
            from store.adapters import active_adapter

            active = active_adapter(db)
            return active.version if active else None
        return adapter

    # --- the generation worker ----------------------------------------------------------------------

    def _work(self) -> None:
        from store import local_db

        db = local_db(self.db_path)
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            # Collect the burst: keep waiting while requests keep arriving (each within batch_window_s
            # of the last), but never longer than batch_max_wait_s in all.
            cap = time.monotonic() + self.config.batch_max_wait_s
            while len(batch) < self.config.max_batch_size:
                wait = min(self.config.batch_window_s, cap - time.monotonic())
                if wait <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=wait))
                except queue.Empty:
                    break
            try:
                self._run_batch(db, batch)
            except BaseException as exc:  # never leave a caller waiting
                log.exception("engine: a generation batch failed")
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)

    def _run_batch(self, db, batch: list[_Request]) -> None:
        # The active adapter is looked up once per batch: a promote lands between batches.
        active = self._resolve_version(db, ACTIVE) if any(r.adapter == ACTIVE for r in batch) else None
        groups: dict[str | None, list[_Request]] = {}
        for req in batch:
            version = active if req.adapter == ACTIVE else self._resolve_version(db, req.adapter)
            groups.setdefault(version, []).append(req)
        for version, requests in groups.items():
            model, used, notices, scope = self._select_model(db, version)
            k = self._passages_for(db, used)
            prompts, trims = zip(*(self._prompt(r, k) for r in requests))
            with scope:
                # A left-padded batch attends over its longest prompt's length in every row at every step.
                for bucket in length_buckets([len(ids) for ids in prompts], self.config.max_length_ratio):
                    def deliver(row: int, text: str, bucket=bucket, requests=requests, used=used, notices=notices,
                                trims=trims) -> None:
                        i = bucket[row]
                        requests[i].future.set_result(
                            _Generated(text, used, tuple(notices) + ((trims[i],) if trims[i] else ())))

                    self.batches_run += 1
                    self._generate(model, [prompts[i] for i in bucket], deliver,
                                   consumers=[requests[i].on_text for i in bucket])

    # --- adapters -----------------------------------------------------------------------------------

    def _passages_for(self, db, version: str | None) -> int:
        """Passages in the prompt: as many as the adapter was trained with; the engine's k for the base."""
        if version is None:
            return self.config.k
        if version not in self._passages:
            from finetune.registry.candidates import passages_of
            from store import StoreError
            from store.adapters import get_adapter

            try:
                self._passages[version] = passages_of(get_adapter(db, version))
            except StoreError:  # unknown version: the caller hears about it elsewhere
                return self.config.k
        return self._passages[version]

    def _select_model(self, db, version: str | None):
        """(model, version in use, notices, context to generate in) for the next generate() call."""
        if version is None:
            return self.model, None, [], self._adapters_off()
        if version in self._full_models:
            self._full_models.move_to_end(version)
            return self._full_models[version], version, [], contextlib.nullcontext()
        if version not in self._loaded_adapters:
            error = self._load_adapter(db, version)
            if error:
                notice = f"adapter {version} could not be loaded ({error}); answered with the base model"
                return self.model, None, [notice], self._adapters_off()
            if version in self._full_models:
                return self._full_models[version], version, [], contextlib.nullcontext()
        self._loaded_adapters.move_to_end(version)
        self.model.set_adapter(version)
        self._evict_adapters(keep=version)
        return self.model, version, [], contextlib.nullcontext()

    def _load_adapter(self, db, version: str) -> str | None:
        """Load a registered version once: a PEFT adapter onto the shared base, or a full fine-tune
        (method "full") as its own model. Returns an error text instead of raising."""
        if version in self._failed_adapters:
            return self._failed_adapters[version]
        from store.adapters import get_adapter

        record = None
        try:
            record = get_adapter(db, version)
            path = Path(record.path)
            if not (path / "adapter_config.json").exists():
                if not (path / "config.json").exists():
                    raise ValueError(f"{path} is neither a PEFT adapter nor a model folder")
                from finetune.model.loading import load_base_model

                self._full_models[version] = load_base_model(str(path)).to(self._base_device()).eval()
                while len(self._full_models) > 1:  # a full model is as big as the base: keep one
                    self._full_models.popitem(last=False)
                log.info("engine: loaded full model %s from %s", version, path)
                return None
            from peft import PeftModel

            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=version, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version,
                                                       is_trainable=False)
            self.model.eval()
            self._loaded_adapters[version] = str(path)
            log.info("engine: loaded adapter %s from %s", version, path)
            return None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if record is not None and record.base_model != self.base_model:  # the likely cause, named first
                error = f"it was trained on {record.base_model!r}, this engine runs {self.base_model!r}: {error}"
            log.error("engine: adapter %s could not be loaded: %s", version, error)
            self._failed_adapters[version] = error
            return error

    def _base_device(self):
        return next(self.model.parameters()).device

    def _adapters_off(self):
        """The base model's behaviour: PEFT's disable_adapter context once adapters are loaded."""
        if self._loaded_adapters:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _evict_adapters(self, *, keep: str) -> None:
        while len(self._loaded_adapters) > max(1, self.config.adapter_cache_size):
            oldest = next(v for v in self._loaded_adapters if v != keep)
            self.model.delete_adapter(oldest)
            del self._loaded_adapters[oldest]
            log.info("engine: unloaded adapter %s", oldest)

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded_adapters)

    # --- prompts and generation ---------------------------------------------------------------------

    def _prompt(self, req: _Request, k: int) -> tuple[list[int], str | None]:
        """The token ids of the prompt with the best `k` passages, trimmed to the context window; and a
        notice when something was cut."""
        tok = self.tokenizer
        budget = self._context_tokens - self.config.max_new_tokens
        passages = [PromptPassage(p.title, p.content) for p in req.passages[:k]]
        approved = req.approved[:approved_in_prompt(k)]
        question = req.question
        history = history_within(req.history, tok)

        def ids_of(q: str, ps) -> list[int]:
            messages = build_messages(q, passages=ps, approved=approved, history=history)
            return tok(render_prompt(tok, messages), add_special_tokens=False).input_ids

        ids = ids_of(question, passages)
        while len(ids) > budget and history:  # the oldest earlier turn goes first
            history = history[1:]
            ids = ids_of(question, passages)
        if len(ids) <= budget:
            return ids, None
        q_ids = tok(question, add_special_tokens=False).input_ids
        # Keep the passages if the question can still be told in a useful length; else drop them from the end.
        while True:
            room = budget - len(ids_of("", passages))
            if room >= min(64, len(q_ids)) or not passages:
                break
            passages = passages[:-1]
        room = max(1, room)
        trimmed = tok.decode(q_ids[:room], skip_special_tokens=True) if len(q_ids) > room else question
        notice = (f"trimmed: the question was cut to {min(room, len(q_ids))} of {len(q_ids)} tokens "
                  "to fit the model's context")
        if len(passages) < len(req.passages[:k]):
            notice += f"; {len(req.passages[:k]) - len(passages)} passage(s) left out"
        return ids_of(trimmed, passages), notice

    def _generate(self, model, prompts: list[list[int]], deliver: Callable[[int, str], None],
                  consumers: list[Callable[[str], None] | None] | None = None) -> None:
        """Greedy (by default) generation for a batch of prompt ids. Each prompt is prefilled alone and the
        batch decodes from one left-padded cache (finetune.serving.kv_cache); each row's cleaned answer goes to
        `deliver(row, text)` as soon as that row stops, or when the batch ends. A row with a consumer in
        `consumers` streams its text to it as it grows (TextStream), all of it before `deliver`."""
        from transformers import GenerationConfig, MaxTimeCriteria, StoppingCriteriaList

        from finetune.serving.kv_cache import generate_batch

        tok = self.tokenizer
        gen = GenerationConfig(
            do_sample=self.config.do_sample,
            temperature=self.config.temperature if self.config.do_sample else None,
            top_p=None, top_k=None,
            eos_token_id=self._eos_ids or None,
        )
        stop = StoppingCriteriaList([MaxTimeCriteria(self.config.time_limit_s, initial_timestamp=time.time())])
        def decode(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True)

        streams = [TextStream(decode, c) if c is not None else None for c in (consumers or [None] * len(prompts))]

        def finished(row: int, ids: list[int]) -> None:
            text = self._clean(decode(ids))
            if streams[row] is not None:
                streams[row].finish(text)
            deliver(row, text)

        def grown(row: int, ids: list[int]) -> None:
            if streams[row] is not None:
                streams[row].update(ids)

        rows = FinishedRows(self._eos_ids, finished, on_tokens=grown if any(streams) else None)
        generate_batch(model, prompts, max_new_tokens=self.config.max_new_tokens, pad_token_id=tok.pad_token_id,
                       generation_config=gen, stopping_criteria=stop, streamer=rows)

    @staticmethod
    def _clean(text: str) -> str:
        return clean_answer(text)
