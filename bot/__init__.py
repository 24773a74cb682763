"""The Slack app (slack-bolt): questions from mentions, DMs and /kb; 👍/👎 feedback with a correction
modal; /kb-retrain, /kb-rollback, /kb-status; Block Kit rendering with mrkdwn escaping.

    from bot import BotConfig, build_app, run_http
    app = build_app(config=BotConfig.from_settings(settings), engine=engine, db_path=settings.db_path)
    run_http(app, "127.0.0.1", 3000)
"""

from bot.app import build_app, health, make_web_client, shutdown
from bot.config import BotConfig, BotConfigError
from bot.notify import SlackJobNotifier
from bot.server import (
    BackgroundHttpServer,
    build_asgi,
    healthz_endpoint,
    run_http,
    run_socket_mode,
    slack_events_endpoint,
)

__all__ = [
    "BotConfig", "BotConfigError", "build_app", "make_web_client", "health", "shutdown", "SlackJobNotifier",
    "run_http", "run_socket_mode", "build_asgi", "slack_events_endpoint", "healthz_endpoint", "BackgroundHttpServer",
]
