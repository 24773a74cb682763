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
