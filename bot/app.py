"""Building the bolt App: the Web API client, the listeners, and what runs beside them.

    config = BotConfig.from_settings(settings)
    app = build_app(config=config, engine=engine, db_path=settings.db_path)
    run_http(app, "127.0.0.1", 3000)          # or run_socket_mode(app, config.app_token)
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slack_bolt import App
from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler

from bot.assistant import register_assistant_handlers
from bot.commands import register_command_handlers
from bot.config import BotConfig
from bot.feedback import register_feedback_handlers
from bot.questions import register_question_handlers
from bot.runtime import BotRuntime
from finetune.serving.protocol import AnswerEngine
from store.db import ping

log = logging.getLogger("kbloop.bot")


def make_web_client(config: BotConfig) -> WebClient:
    """A WebClient on KBLOOP_SLACK_API_URL that retries after a 429 (honouring Retry-After) and after
    connection errors. slack_sdk only retries connection errors by default."""
    return WebClient(
        token=config.bot_token, base_url=config.api_url,
        retry_handlers=[ConnectionErrorRetryHandler(max_retry_count=2),
                        RateLimitErrorRetryHandler(max_retry_count=config.rate_limit_retries)],
    )


def build_app(*, config: BotConfig, engine: AnswerEngine, db_path: Path) -> App:
    """The Slack app with every listener registered. `app.kbloop` is its BotRuntime (engine, store,
    answer pool); `shutdown(app)` stops the answer pool."""
    app = App(
        client=make_web_client(config),
        signing_secret=config.signing_secret or "",
        # Socket Mode requests are not signed. HTTP ones are verified once, on the raw bytes, at the door
        # (bot.server.slack_events_endpoint: 401 on a bad, stale or replayed signature, 413 when oversized)
        # before bolt sees them; a second check here would refuse acknowledged events that wait in the
        # inbox past Slack's 5-minute window (issue 16).
        request_verification_enabled=False,
        # Verify the token lazily (first request), so the app can be built while Slack is unreachable.
        token_verification_enabled=False,
        # Ack first, work after: listeners run in this pool and the HTTP response leaves at ack().
        process_before_response=False,
        listener_executor=ThreadPoolExecutor(max_workers=config.listener_workers,
                                             thread_name_prefix="kbloop-listener"),
        ignoring_self_events_enabled=True,
        raise_error_for_unhandled_request=False,
    )
    runtime = BotRuntime(config=config, engine=engine, db_path=Path(db_path))
    app.kbloop = runtime  # type: ignore[attr-defined]

    register_assistant_handlers(app, runtime)  # before the message listener: it takes assistant threads' messages
    register_question_handlers(app, runtime)
    register_feedback_handlers(app, runtime)
    register_command_handlers(app, runtime)
    _register_catch_all(app)

    @app.error
    def on_error(error, body, logger):
        # Reached when a listener raised (before its ack, for those wrapped in BotRuntime.after_ack): the HTTP
        # response is bolt's; here the failure is kept so it is not lost.
        runtime.record_listener_error(error, body)

    return app


def _register_catch_all(app: App) -> None:
    """Events we receive but do not act on still get a 200: bolt answers 404 to an unhandled request,
    which Slack counts as a failed delivery (retries, then disables the app's events)."""
    import re

    @app.event(re.compile(".*"))
    def ignore_other_events():
        pass


def runtime_of(app: App) -> BotRuntime:
    return app.kbloop  # type: ignore[attr-defined]


def shutdown(app: App, *, wait: bool = True) -> None:
    """Stop the answer pool (answers in progress finish when `wait`)."""
    runtime_of(app).shutdown(wait=wait)


def health(app: App) -> tuple[bool, dict]:
    """Ready when the store answers a query and the engine has loaded its model."""
    rt = runtime_of(app)
    return readiness(rt.db, rt.engine)


_last_health_problem: list[str] = [""]  # logged once per change, not at every probe


def readiness(open_store, engine: AnswerEngine) -> tuple[bool, dict]:
    """(ready, what /healthz shows). /healthz has no authentication, so it says only `ok`, `error`,
    `ready`, `loading` or `failed`; what failed, with the exception text, goes to the log (issue 16).
    `generation` appears when generation runs on a vLLM server (docs/scaling.md)."""
    problems = []
    try:
        ping(open_store())
        store = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        store = "error"
        problems.append(f"store: {type(exc).__name__}: {exc}")
    ready = bool(getattr(engine, "ready", True))
    error = getattr(engine, "error", None)
    if ready:
        model = "ready"
    elif error:
        model = "failed"
        problems.append(f"model: {error}")
    else:
        model = "loading"
    detail = {"store": store, "model": model}
    if ready and getattr(engine, "remote", False):  # generation on a vLLM server: asked at every probe
        error = engine.generation_problem()
        detail["generation"] = "error" if error else "ok"
        if error:
            problems.append(f"generation: {error}")
    problem = "; ".join(problems)
    if problem != _last_health_problem[0]:
        _last_health_problem[0] = problem
        if problem:
            log.warning("health check: not ready: %s", problem)
    return store == "ok" and ready and detail.get("generation", "ok") == "ok", detail
