"""Fixtures for the bot: the fake Slack Web API and a bot on a real HTTP server, answering with the scripted
engine (tests/fakes/engine.py) unless a test passes another.
"""

from __future__ import annotations

import pytest

from bot import BackgroundHttpServer, BotConfig, build_app, shutdown
from store import local_db
from tests.fakes.engine import ScriptedEngine
from tests.fakes.slack_api import FakeSlackAPI

SECRET = "test-signing-secret"
ADMIN = "UADMIN"
# How long a test waits for an effect that must not happen (a second answer, an answer to a refused request) before
# asserting it did not. The first thing such an answer does is its chat.postMessage placeholder, which the fake Slack
# records 10-15 ms after the event's 200 (43 ms at worst in 40 tries with three busy processes beside the two
# workers on two cores): 0.15 s is three times that worst case.
SETTLE_S = 0.15


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
def start_bot(fake_slack, db_path, db):
    """start_bot(engine=None, **config overrides) -> RunningBot; every bot started is stopped at the end.
    The store at db_path is migrated (the `db` fixture) before any of the bot's threads races to open it."""
    started: list[RunningBot] = []

    def start(engine=None, **overrides) -> RunningBot:
        engine = engine or ScriptedEngine(db_path)
        app = build_app(config=bot_config(fake_slack, **overrides), engine=engine, db_path=db_path)
        server = BackgroundHttpServer(app).start()
        running = RunningBot(app, server, engine, db_path)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
