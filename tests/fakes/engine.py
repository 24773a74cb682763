"""A scripted answer engine: a finetune.serving.protocol.AnswerEngine whose "model" says what a test chooses.

    engine = ScriptedEngine(db_path, reply=lambda q: "Ask IT for a <!channel> token.")
    bot = start_bot(engine=engine)                       # tests/bot/conftest.py

For handler tests only (it lets a test choose what "the model" says, e.g. a <!channel>, an exception or a long
answer); it records interactions through the real store exactly like finetune.serving.engine.Engine does.
tests/finetune/test_engine_protocol.py holds it to the protocol signature by signature. The integration test with
the real Engine on the tiny base is tests/bot/test_real_engine.py.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from finetune.serving.answers import Answer, Source
from store import local_db
from store.interactions import record_interaction


class ScriptedEngine:
    """Answers with `reply(question)` after `delay_s` (an exception returned by `reply` is raised); `ready=False`
    plays an engine still loading its model."""

    remote = False  # generation "runs" here, never on a vLLM server

    def __init__(self, db_path: Path | None, *, reply=None, delay_s: float = 0.0, ready: bool = True,
                 after_first_piece=None):
        self.db_path = db_path
        # Streaming: called after the first piece is handed over, before the rest (a test waits there until
        # the stream has started, as a real generation would still be running).
        self.after_first_piece = after_first_piece
        self.reply = reply or (lambda q: f"Answer to: {q}")
        self.delay_s = delay_s
        self.ready = ready
        self.base_model = "scripted"
        self.error = None
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def generation_problem(self) -> str | None:
        return None

    def answer(self, question: str, *, source: str = "cli", user_id: str | None = None,
               channel_id: str | None = None, thread_ts: str | None = None, event_id: str | None = None,
               adapter: str = "active", record: bool = True, model_only: bool = False,
               on_text: Callable[[str], None] | None = None, team: str | None = None) -> Answer:
        with self._lock:
            self.calls.append({"question": question, "user_id": user_id, "event_id": event_id,
                               "thread_ts": thread_ts, "team": team})
        if self.delay_s:
            time.sleep(self.delay_s)
        text = self.reply(question)
        if isinstance(text, BaseException):
            raise text
        if on_text is not None:  # streamed word by word, as the engine's generation thread would
            for n, piece in enumerate(re.findall(r"\S+\s*", text)):
                on_text(piece)
                if n == 0 and self.after_first_piece is not None:
                    self.after_first_piece()
        sources = [Source(title="VPN guide", doc_path="kb/vpn.md")]
        iid = record_interaction(local_db(self.db_path), question=question, answer=text, source=source,
                                 sources=[asdict(s) for s in sources], adapter_version=None, latency_ms=5,
                                 user_id=user_id, channel_id=channel_id, thread_ts=thread_ts, event_id=event_id,
                                 team=team)
        return Answer(text, sources, None, 5, iid, None, team=team)
