"""Fixtures for the bot: the fake Slack Web API, a bot on a real HTTP server, a scripted engine.

The scripted engine is for handler tests only (it lets a test choose what "the model" says, e.g. a
<!channel>); it records interactions through the real store exactly like finetune.serving.engine.Engine does.
The integration test with the real Engine on the tiny base is tests/bot/test_real_engine.py.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from bot import BackgroundHttpServer, BotConfig, build_app, shutdown
from finetune.serving.engine import Answer, Source
from store import local_db
from store.interactions import record_interaction
from tests.fakes.slack_api import FakeSlackAPI

SECRET = "test-signing-secret"
ADMIN = "UADMIN"


class ScriptedEngine:
    """finetune.serving.engine.Engine's answer() signature; answers with `reply(question)` after `delay_s`."""

    def __init__(self, db_path: Path, *, reply=None, delay_s: float = 0.0, ready: bool = True,
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

    def answer(self, question, *, source="cli", user_id=None, channel_id=None, thread_ts=None, event_id=None,
               adapter="active", record=True, on_text=None, team=None):
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


@pytest.fixture
def fake_slack():
    with FakeSlackAPI() as slack:
        yield slack


def bot_config(fake_slack: FakeSlackAPI, **overrides) -> BotConfig:
    values = dict(bot_token="xoxb-test", signing_secret=SECRET, api_url=fake_slack.url, admins=(ADMIN,),
                  notify_channel="CNOTIFY")
    values.update(overrides)
    return BotConfig(**values)


class RunningBot:
    def __init__(self, app, server, engine, db_path):
        self.app, self.server, self.engine, self.db_path = app, server, engine, db_path

    @property
    def events_url(self) -> str:
        return self.server.url + "/slack/events"

    @property
    def db(self):
        return local_db(self.db_path)

    def stop(self):
        self.server.stop()
        shutdown(self.app)


@pytest.fixture
def start_bot(fake_slack, db_path):
    """start_bot(engine=None, **config overrides) -> RunningBot; every bot started is stopped at the end."""
    started: list[RunningBot] = []

    def start(engine=None, **overrides) -> RunningBot:
        from store import open_db

        open_db(db_path)  # migrate once before threads race to open it
        engine = engine or ScriptedEngine(db_path)
        app = build_app(config=bot_config(fake_slack, **overrides), engine=engine, db_path=db_path)
        server = BackgroundHttpServer(app).start()
        running = RunningBot(app, server, engine, db_path)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
