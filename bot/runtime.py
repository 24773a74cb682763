"""What the bot's listeners share (`BotRuntime`): the config, the engine, the store, the answer pool that waits on the
engine, the rate limiter, and where handler failures are kept.
"""

from __future__ import annotations

import functools
import logging
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bot.config import BotConfig
from bot.priority import AckPriority
from bot.ratelimit import QuestionRateLimiter
from bot.streaming import StreamingSupport
from finetune.serving.protocol import AnswerEngine
from store import local_db
from store.slack_events import record_bot_error

log = logging.getLogger("kbloop.bot")


@dataclass(kw_only=True)
class BotRuntime:
    """What the listeners share: config, the engine, the store, the answer pool and the rate limiter."""

    config: BotConfig
    engine: AnswerEngine  # finetune.serving.engine.Engine in kbloop; tests/fakes/engine.py in tests
    db_path: Path
    answers: ThreadPoolExecutor = field(init=False)
    limiter: QuestionRateLimiter = field(init=False)
    priority: AckPriority = field(default_factory=AckPriority)
    # bot.server.EventDispatcher threads feeding the event inbox to bolt; stopped first on shutdown.
    dispatchers: list = field(default_factory=list)
    streaming: StreamingSupport = field(default_factory=StreamingSupport)

    def __post_init__(self) -> None:
        self.answers = ThreadPoolExecutor(max_workers=self.config.answer_workers, thread_name_prefix="kbloop-answer")
        self.limiter = QuestionRateLimiter(max_questions=self.config.rate_limit_questions,
                                           window_s=self.config.rate_limit_window_s)

    def db(self):
        return local_db(self.db_path)  # one connection per thread

    def record_error(self, kind: str, exc: BaseException, *, event_id: str | None = None,
                     user_id: str | None = None, channel_id: str | None = None) -> int | None:
        """Log and keep a handler failure; returns its id to show people as a reference (None if the
        store itself failed)."""
        log.error("slack %s handler failed: %s", kind, exc, exc_info=exc)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
        try:
            return record_bot_error(self.db(), kind=kind, error=f"{type(exc).__name__}: {exc}", event_id=event_id,
                                    user_id=user_id, channel_id=channel_id, detail={"traceback": tb})
        except Exception:  # noqa: BLE001 - the log line above already has it
            log.exception("could not record the error in the store")
            return None

    def record_listener_error(self, error: BaseException, body: dict | None) -> int | None:
        """Keep a listener's failure with what the request's body says of who and where."""
        body = body or {}
        event = body.get("event") or {}
        user = (body.get("user") or {}).get("id") if isinstance(body.get("user"), dict) else body.get("user_id")
        return self.record_error(body.get("type") or body.get("command") or "request", error,
                                 event_id=body.get("event_id"), user_id=user or event.get("user"),
                                 channel_id=event.get("channel") or body.get("channel_id"))

    def after_ack(self, listener):
        """Wrap a listener that acknowledges and then works: a failure after its ack() is kept here, not raised
        to bolt. bolt's thread runner (slack_bolt 1.30), given an exception after the ack, sets the ack's response
        to None before the request thread may have read it, and the request is then answered 404 ("unhandled")
        instead of 200. A failure before the ack still goes to bolt, which answers 500."""

        @functools.wraps(listener)  # bolt reads the wrapped listener's parameters (inspect.unwrap)
        def guarded(**kwargs):
            try:
                return listener(**kwargs)
            except Exception as exc:  # noqa: BLE001 - kept for operators; Slack already has its 200
                if getattr(kwargs.get("ack"), "response", None) is None:
                    raise
                self.record_listener_error(exc, kwargs.get("body"))

        return guarded

    def shutdown(self, wait: bool = True) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.stop()  # deliveries not yet dispatched stay in the inbox for the next start
        self.answers.shutdown(wait=wait)
