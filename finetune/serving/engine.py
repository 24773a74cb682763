"""The answer engine: one loaded model per process, answering questions grounded on the knowledge base.

    engine = Engine(db_path=settings.db_path, home=settings.kbloop_home, base_model=settings.base_model)
    engine.start()                      # loads in the background, returns at once
    engine.wait_ready(120)
    answer = engine.answer("How do I set up the VPN?", source="cli")
    engine.close()

How a question is answered: a question that matches an approved example (finetune.serving.verified: the same
question, a paraphrase or a translation) is answered at once with the curator's answer, marked as such;
no model is involved, so this works while the model loads. Otherwise the caller's thread retrieves
passages (finetune.serving.retrieval) and approved answers to related questions, and submits a request to
the generation backend (finetune.serving.scheduler): in-process, a continuous batch on one thread, where a
question joins the running batch at the next decode step and leaves it at its own stop token, greedy by
default, bounded by max new tokens and a time limit per answer. With neither passages nor approved
answers, the question is refused ("nothing in the knowledge base") unless the caller asked for the model
alone (`model_only`), which answers anyway with an "unbacked" notice; an answer backed only by passages that
barely cover the question (retrieval.weakly_covered) carries the "weak_match" notice. Verified answers apply
to the active adapter only: asking a named version or the base shows that model. The caller's thread then
records the interaction.

The answer and its texts are in finetune.serving.answers, the prompt and its trimming in finetune.serving.prompts.

Streaming: a caller that passes `on_text` gets the answer's text as it is generated, in pieces, from the
generation thread (finetune.serving.streaming: the pieces put together are exactly `Answer.text`). Only
generated text streams; a verified, refused or starting-up answer arrives whole in the returned Answer.
`on_text` must return quickly (it runs between decode steps of the whole batch).

Teams (store.teams): a question of a team (`team=`, routed by the caller from its Slack channel) is answered from
the shared and that team's passages and approved answers only, and by the team's active adapter, else the shared
active one; a question with no team sees shared rows only and the shared adapter (finetune.serving.routing). The
interaction records the team. Questions of different teams generate together: one loaded base, and each row of the
running batch on its own LoRA adapter or the base (finetune.serving.models; only a full fine-tune runs in batches
of its own).

Hot-swap: which adapter is active is looked up in the store when a request is admitted to the running batch, and
the row keeps that adapter until it leaves: a promote or rollback lands without a restart and without failing
requests; an answer under way finishes on the adapter it started with, beside newer rows on the new one.

On vLLM (`EngineConfig.vllm`, finetune.serving.vllm): the engine loads only the base's tokenizer, and the
backend sends each prompt's token ids to the vLLM server, loading adapters into it by version name. Everything
else above is the same. A vLLM that cannot be reached answers with the "not available" notice.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from finetune.model.loading import load_model_for_inference, load_tokenizer, resolve_base, serving_stop_ids
from finetune.model.prompting import ApprovedAnswer, standalone_question
from finetune.serving.answers import (
    APPROVED_SOURCE_TITLE,
    CLOSED_TEXT,
    EMPTY_TEXT,
    NO_MATCH_TEXT,
    NO_MATCH_TEXT_ZH,
    STARTING_TEXT,
    TIMEOUT_TEXT,
    UNAVAILABLE_TEXT,
    Answer,
    Source,
    no_match_text,
    sources_of,
)
from finetune.serving.models import ServedModels
from finetune.serving.prompts import PromptRequest, fit_prompt, thread_history
from finetune.serving.retrieval import (
    embed_missing_passages,
    embedding_model,
    retrieve_passages,
    retrieve_scored,
    weakly_covered,
)
from finetune.serving.routing import ACTIVE, BASE, adapter_key, check_adapter_for, resolve_version
from finetune.serving.scheduler import (
    BackendClosed,
    BatchScheduler,
    Generated,
    GenerationBackend,
    GenerationRequest,
)
from finetune.serving.verified import find_verified, related_examples
from finetune.serving.vllm import VllmBackend, VllmClient, VllmError, VllmTarget
from store import StoreError, local_db
from store.adapters import get_adapter
from store.interactions import record_interaction

log = logging.getLogger(__name__)

# The engine's face: callers import these from here (the texts and results live in answers, the routing in routing).
__all__ = ["ACTIVE", "APPROVED_SOURCE_TITLE", "BASE", "CLOSED_TEXT", "EMPTY_TEXT", "NO_MATCH_TEXT", "NO_MATCH_TEXT_ZH",
           "STARTING_TEXT", "TIMEOUT_TEXT", "UNAVAILABLE_TEXT", "Answer", "Engine", "EngineConfig", "Source",
           "adapter_key", "check_adapter_for", "thread_history"]

# Approved answers to related questions looked up per question (at most approved_in_prompt() enter a prompt).
RELATED_LOOKUP = 2
# Notices of an answer that no model finished: not recorded, and no other notice is added to them.
FAILED = frozenset({"closed", "timeout", "unavailable"})


@dataclass(frozen=True)
class EngineConfig:
    """How the engine retrieves and generates. One object, built once, passed down."""
    k: int = 3  # passages in the prompt
    max_new_tokens: int = 256
    time_limit_s: float = 60.0  # wall-time bound on one answer's generation, from its admission to a batch
    do_sample: bool = False  # greedy: the same question gets the same answer
    temperature: float = 0.7  # only with do_sample
    max_batch_size: int = 16  # rows decoded together
    # Prompt tokens prefilled between two decode steps (at least one prompt): newcomers join in turns, so the
    # rows already decoding are not held up by a whole burst of prefills (docs/benchmarks.md, "Batching").
    prefill_tokens_per_step: int = 2048
    # LoRA adapters kept loaded when no answer uses them: each team's active one, the previous, one compared (a LoRA
    # of r=8 on all projections of Qwen2.5-0.5B is 4.4M parameters, ~18 MB in fp32). Those that running answers use stay loaded
    # beyond it until the answers finish.
    adapter_cache_size: int = 8
    max_context_tokens: int = 4096  # cap on the prompt + answer, below the model's own limit
    request_timeout_s: float = 600.0  # how long answer() waits for the worker before giving up
    device: str | None = None  # None: cuda when available, else cpu
    vllm: VllmTarget | None = None  # generate on this vLLM server instead of in this process


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
        self._loader: threading.Thread | None = None
        self.tokenizer = None
        self._models: ServedModels | None = None  # once loaded; changed by the generation thread only
        self._backend: GenerationBackend | None = None
        self._context_tokens = self.config.max_context_tokens

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
        if self._backend is not None:
            for req in self._backend.close(timeout=self.config.time_limit_s + 5):
                req.future.set_result(Generated(CLOSED_TEXT, None, ("closed",)))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _load(self) -> None:
        try:
            if self.config.vllm is not None:
                self._load_for_vllm()
                return
            db = local_db(self.db_path)
            model, tokenizer = load_model_for_inference(resolve_base(self.base_model, home=self.home, db=db))
            if self.config.device:
                model = model.to(self.config.device)
            self.tokenizer = tokenizer
            self._models = ServedModels(model, base_model=self.base_model, k=self.config.k,
                                        adapter_cache_size=self.config.adapter_cache_size)
            model_limit = getattr(model.config, "max_position_embeddings", None) or self.config.max_context_tokens
            self._context_tokens = min(int(model_limit), self.config.max_context_tokens)
            self._warm_retrieval(db)
            c = self.config
            self._backend = BatchScheduler(
                select_model=lambda version: self._models.choose(local_db(self.db_path), version),
                batch_key=lambda version: self._models.batch_key(local_db(self.db_path), version),
                resolve=lambda adapter: resolve_version(local_db(self.db_path), adapter),
                tokenizer=tokenizer, stop_ids=serving_stop_ids(model, tokenizer),  # what the gate's stop rate uses
                max_new_tokens=c.max_new_tokens, time_limit_s=c.time_limit_s, max_batch_size=c.max_batch_size,
                do_sample=c.do_sample, temperature=c.temperature, prefill_tokens_per_step=c.prefill_tokens_per_step)
            self._backend.start()
            self._ready.set()
        except Exception as exc:  # reported through answer() and .error; the process keeps running

            if isinstance(exc, StoreError):  # an expected failure whose message says it all: no traceback
                self.error = str(exc)
                log.error("engine: %s", self.error)
            else:
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("engine: loading %s failed", self.base_model)
        finally:
            self._loaded.set()

    def _load_for_vllm(self) -> None:
        """The tokenizer, the stop set and the context window of the base vLLM serves; no weights."""
        from transformers import AutoConfig, GenerationConfig

        base = resolve_base(self.base_model, home=self.home, db=local_db(self.db_path))
        tokenizer = load_tokenizer(base)
        try:
            generation = GenerationConfig.from_pretrained(base)
        except OSError:  # a base without generation_config.json: the tokenizer's stops alone
            generation = None
        model_limit = getattr(AutoConfig.from_pretrained(base), "max_position_embeddings", None)
        self._context_tokens = min(int(model_limit or self.config.max_context_tokens), self.config.max_context_tokens)
        self.tokenizer = tokenizer
        self._models = ServedModels(None, base_model=self.base_model, k=self.config.k,
                                    adapter_cache_size=self.config.adapter_cache_size)  # passages per version
        self._warm_retrieval(local_db(self.db_path))
        c = self.config
        self._backend = VllmBackend(
            VllmClient(c.vllm, adapters_dir=self.home / "adapters"),
            resolve=lambda adapter: resolve_version(local_db(self.db_path), adapter),
            adapter_folder=lambda version: Path(get_adapter(local_db(self.db_path), version).path),
            stop_ids=serving_stop_ids(generation, tokenizer), max_new_tokens=c.max_new_tokens,
            time_limit_s=c.time_limit_s, do_sample=c.do_sample, temperature=c.temperature,
            adapter_cache_size=c.adapter_cache_size)
        self._backend.start()
        self._ready.set()

    @staticmethod
    def _warm_retrieval(db) -> None:
        """Load the retrieval model and embed what the KB lacks (an import with --no-embed, a changed
        KBLOOP_EMBEDDING_MODEL) while the engine loads, so that the first question does not pay for either."""
        embedding_model()
        embedded = embed_missing_passages(db)
        if embedded:
            log.info("engine: embedded %d passages the knowledge base lacked", embedded)

    @property
    def remote(self) -> bool:
        """True when generation runs on a vLLM server."""
        return self.config.vllm is not None

    def generation_problem(self) -> str | None:
        """Why generation cannot work now, in one line (vLLM unreachable or not serving the base); None when
        it can. In-process generation has no such problem once loaded."""
        if isinstance(self._backend, VllmBackend):
            return self._backend.client.health()
        return None

    # --- answering (any thread) ---------------------------------------------------------------------

    def answer(self, question: str, *, source: str = "cli", user_id: str | None = None,
               channel_id: str | None = None, thread_ts: str | None = None, event_id: str | None = None,
               adapter: str = ACTIVE, record: bool = True, model_only: bool = False,
               on_text: Callable[[str], None] | None = None, team: str | None = None) -> Answer:
        """Answer one question: a verified answer when one matches (unless `model_only`, or a named adapter is
        asked), else generated. Returns at once with a "starting up" answer while the model loads.
        `team`: the question's team (see the module's docstring, "Teams"); None: shared rows only.
        `on_text`: called from the generation thread with each new piece of a generated answer (see the
        module's docstring, "Streaming")."""
        started = time.monotonic()

        def elapsed_ms() -> int:
            return int((time.monotonic() - started) * 1000)

        question = (question or "").strip()
        if not question:
            return Answer(EMPTY_TEXT, [], None, elapsed_ms(), None, "empty")

        db = local_db(self.db_path)
        use_approved = adapter == ACTIVE and not model_only
        if use_approved:
            verified = self.verified_answer(question, source=source, user_id=user_id, channel_id=channel_id,
                                            thread_ts=thread_ts, event_id=event_id, record=record, started=started,
                                            team=team)
            if verified is not None:
                return verified
        if not self.ready:
            if self.error:
                return Answer(UNAVAILABLE_TEXT.format(error=self.error), [], None, elapsed_ms(), None, "unavailable")
            return Answer(STARTING_TEXT, [], None, elapsed_ms(), None, "starting")
        if self._stop.is_set():
            return Answer(CLOSED_TEXT, [], None, elapsed_ms(), None, "closed")


        if adapter not in (ACTIVE, BASE):
            check_adapter_for(db, adapter, team)  # an unknown version, or another team's: StoreError says so
        adapter = adapter_key(adapter, team)
        version = resolve_version(db, adapter)
        # Enough passages for the prompt of the adapter that will most likely answer, and for the sources.
        # A follow-up in a thread is searched together with the question it follows (standalone_question).
        history = thread_history(db, channel_id=channel_id, thread_ts=thread_ts)
        query = standalone_question(question, history)
        scored = retrieve_scored(db, query, k=max(self.config.k, self._models.passages_for(db, version)), team=team)
        passages = [s.passage for s in scored]
        related = self._related(db, query, team) if use_approved else []
        if not passages and not related and not model_only:
            generated = Generated(no_match_text(question), version, ("no_match",))
        else:
            req = PromptRequest(question=question, passages=passages,
                           approved=[ApprovedAnswer(m.example.question, m.example.answer) for m in related],
                           history=history)
            request = GenerationRequest(adapter, functools.partial(self._prompt_for, req), on_text=on_text)
            try:
                generated = self._backend.submit(request).result(timeout=self.config.request_timeout_s)
            except BackendClosed:  # closed while this question was being retrieved
                generated = Generated(CLOSED_TEXT, None, ("closed",))
            except FutureTimeout:
                request.future.cancel()  # not started yet: it never will be
                generated = Generated(TIMEOUT_TEXT, None, ("timeout",))
            except VllmError as exc:  # the vLLM server is down or refused: one line, like a failed load
                log.error("engine: %s", exc)
                generated = Generated(UNAVAILABLE_TEXT.format(error=exc), None, ("unavailable",))
            if not passages and not related:  # model_only: nothing backs what the model said
                generated = replace(generated, notices=("unbacked",) + generated.notices)
            elif not related and weakly_covered(scored) and not FAILED & set(generated.notices):
                # generated from passages that barely cleared the bar: say so
                generated = replace(generated, notices=("weak_match",) + generated.notices)
        backed = (passages or related) and not ({"closed", "no_match", "unavailable"} & set(generated.notices))
        sources = sources_of(passages, related) if backed else []
        notice = "; ".join(generated.notices) or None
        latency = elapsed_ms()
        interaction_id = None
        if record and not FAILED & set(generated.notices):
            interaction_id = record_interaction(
                db, question=question, answer=generated.text, source=source,
                sources=[asdict(s) for s in sources], adapter_version=generated.adapter_version,
                latency_ms=latency, user_id=user_id, channel_id=channel_id, thread_ts=thread_ts, event_id=event_id,
                team=team,
            )
        return Answer(generated.text, sources, generated.adapter_version, latency, interaction_id, notice, team=team)

    def prompt_ids(self, question: str, *, channel_id: str | None = None, thread_ts: str | None = None,
                   use_approved: bool = True, team: str | None = None) -> list[int]:
        """The prompt the base model gets for `question` asked now (in that thread, if given): the same
        retrieval, history and trimming as answer(), as token ids. Needs the tokenizer, not the model: it is
        how tests check that training builds the very same prompt."""

        db = local_db(self.db_path)
        question = question.strip()
        history = thread_history(db, channel_id=channel_id, thread_ts=thread_ts)
        query = standalone_question(question, history)
        related = self._related(db, query, team) if use_approved else []
        req = PromptRequest(question=question, passages=retrieve_passages(db, query, k=self.config.k, team=team),
                       approved=[ApprovedAnswer(m.example.question, m.example.answer) for m in related],
                       history=history)
        return self._prompt(req, self.config.k)[0]

    def verified_answer(self, question: str, *, source: str = "cli", record: bool = True,
                        started: float | None = None, team: str | None = None, **slack) -> Answer | None:
        """The approved answer when the question matches an approved example closely (a shared one or `team`'s),
        recorded as an interaction like any answer (so it can be voted on); None when none matches. Needs no model."""

        started = time.monotonic() if started is None else started
        db = local_db(self.db_path)
        question = (question or "").strip()
        try:
            match = find_verified(db, question, team=team)
        except Exception:  # a broken embedder must not stop the generated answers
            log.exception("engine: looking up verified answers failed")
            return None
        if match is None:
            return None
        ex = match.example
        latency = int((time.monotonic() - started) * 1000)
        interaction_id = None
        if record:
            interaction_id = record_interaction(
                db, question=question, answer=ex.answer, source=source, sources=[], adapter_version=None,
                latency_ms=latency, verified_example_id=ex.id, team=team, **slack)
        return Answer(ex.answer, [], None, latency, interaction_id, None, verified=True, example_id=ex.id,
                      approved_by=ex.reviewer, approved_at=ex.reviewed_at, team=team)

    @staticmethod
    def _related(db, question: str, team: str | None = None) -> list:
        try:
            return related_examples(db, question, k=RELATED_LOOKUP, team=team)
        except Exception:
            log.exception("engine: looking up related approved answers failed")
            return []

    @property
    def loaded_adapters(self) -> list[str]:
        if isinstance(self._backend, VllmBackend):  # loaded into vLLM
            return self._backend.loaded_adapters
        return self._models.loaded_adapters if self._models is not None else []

    @property
    def batches_run(self) -> int:
        """Running batches started so far (for tests and benchmarks): questions that shared one count once."""
        return getattr(self._backend, "batches_run", 0)

    @property
    def tokens_generated(self) -> int:
        """Tokens generated in this process so far, every answer's (for benchmarks); 0 on vLLM."""
        return getattr(self._backend, "tokens_generated", 0)

    # --- prompts ---------------------------------------------------------------------

    def _prompt_for(self, req: PromptRequest, version: str | None) -> tuple[list[int], str | None]:
        """The prompt for the version that answers, with the passages it was trained with (generation thread)."""
        return self._prompt(req, self._models.passages_for(local_db(self.db_path), version))

    def _prompt(self, req: PromptRequest, k: int) -> tuple[list[int], str | None]:
        """The prompt's token ids with the best `k` passages, trimmed to the context window; and a notice when
        something was cut (finetune.serving.prompts)."""
        return fit_prompt(self.tokenizer, req, k, self._context_tokens - self.config.max_new_tokens)
