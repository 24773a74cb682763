"""Command: `kbloop bot` (the Slack bot: Socket Mode when SLACK_APP_TOKEN is set, else HTTP)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from kbloop.cli.app import app, ctx, fail


def bot_config(settings, *, http: bool):
    """The bot's config from settings; a missing variable ends the command with one line naming it."""
    from bot import BotConfig, BotConfigError

    try:
        return BotConfig.from_settings(settings, http=http)
    except BotConfigError as exc:
        fail(str(exc))


def check_slack_token(config) -> str:
    """auth.test: a wrong token or an unreachable Slack is one clear line now, not a failure per request."""
    from slack_sdk.errors import SlackApiError

    from bot import make_web_client

    try:
        who = make_web_client(config).auth_test()
    except SlackApiError as exc:
        fail(f"SLACK_BOT_TOKEN was refused by Slack ({exc.response.get('error')}); check the bot token")
    except OSError as exc:
        fail(f"cannot reach Slack's Web API at {config.api_url} ({exc}); check the network or KBLOOP_SLACK_API_URL")
    return f"{who.get('user')} ({who.get('user_id')}) in {who.get('team')}"


@app.command("bot")
def bot_command(
    http: Annotated[bool, typer.Option("--http", help="HTTP mode (POST /slack/events) even if SLACK_APP_TOKEN is set.")] = False,
    host: Annotated[str, typer.Option(help="HTTP mode: interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP mode: port to listen on.")] = 3000,
) -> None:
    """Run the Slack bot.

    Socket Mode (no public URL) when SLACK_APP_TOKEN is set, else HTTP: Slack sends events, slash
    commands and interactivity to POST /slack/events; GET /healthz answers 200 once the store and the
    model are ready. Needs SLACK_BOT_TOKEN, and SLACK_SIGNING_SECRET in HTTP mode.
    """
    from bot import build_app, run_http, run_socket_mode, shutdown
    from kbloop.answering import engine_for

    c = ctx()
    s = c.settings
    socket_mode = bool(s.slack_app_token) and not http
    config = bot_config(s, http=not socket_mode)
    c.db  # noqa: B018 - opens the store (and fails with one line) before anything starts
    identity = check_slack_token(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = engine_for(s).start()
    slack_app = build_app(config=config, engine=engine, db_path=s.db_path)
    typer.echo(f"kbloop bot: {identity}; model {s.base_model} loading in the background.")
    try:
        if socket_mode:
            typer.echo("Socket Mode: connecting to Slack (Ctrl+C to stop).")
            run_socket_mode(slack_app, config.app_token)
        else:
            typer.echo(f"HTTP mode: request URL http://{host}:{port}/slack/events, health http://{host}:{port}/healthz")
            run_http(slack_app, host, port)
    finally:
        shutdown(slack_app, wait=False)
        engine.close()
