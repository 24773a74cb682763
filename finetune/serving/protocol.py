"""What the bot and the playground call on an answer engine: `AnswerEngine`.

finetune.serving.engine.Engine implements it (kbloop.answering builds one from the settings); so does the scripted
engine the bot's tests use (tests/fakes/engine.py). tests/finetune/test_engine_protocol.py checks both against this
class, member by member and signature by signature, so neither can drift from what the bot and the playground call.

This module imports nothing that loads a model: the bot and the playground annotate with it at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from finetune.serving.answers import Answer


@runtime_checkable
class AnswerEngine(Protocol):
    """An engine that answers questions from the knowledge base and records each answer in the store."""

    base_model: str  # the base model it serves (shown by `/kb-status`)
    error: str | None  # why loading failed, once it has; None otherwise

    @property
    def ready(self) -> bool:
        """True once the model is loaded; until then answer() returns at once with a "starting up" answer."""
        ...

    @property
    def remote(self) -> bool:
        """True when generation runs on a vLLM server: /healthz then asks generation_problem() at every probe."""
        ...

    def generation_problem(self) -> str | None:
        """Why generation cannot work now, in one line; None when it can."""
        ...

    def answer(self, question: str, *, source: str = "cli", user_id: str | None = None,
               channel_id: str | None = None, thread_ts: str | None = None, event_id: str | None = None,
               adapter: str = "active", record: bool = True, model_only: bool = False,
               on_text: Callable[[str], None] | None = None, team: str | None = None) -> Answer:
        """Answer one question and record it (unless `record` is False). `adapter`: "active" (the team's active
        adapter, else the shared one), "base" or a version; `team`: the question's team (store.teams), None for
        shared rows only; `on_text`: called from the generation thread with each new piece of a generated answer.
        Returns an Answer (finetune.serving.answers), whose `interaction_id` names the recorded interaction."""
        ...
