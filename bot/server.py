"""HTTP mode: an ASGI app with POST /slack/events (events, slash commands, interactivity) and GET /healthz.

`kbloop serve` mounts the same endpoint in its own FastAPI app:

    fastapi_app.add_route("/slack/events", slack_events_endpoint(app), methods=["POST"])

Acknowledging fast under load: Events API deliveries (JSON, type `event_callback`) carry nothing for
the response, so once their signature and timestamp check out they are answered 200 on the event loop
and handed to one dispatcher thread that runs them through bolt (which verifies them again and runs
the listeners). Slash commands and interactivity, whose ack may carry a reply or modal errors, go
through bolt on Starlette's thread pool (bolt's own Starlette adapter would block the event loop).
A bad signature or a timestamp older than 5 minutes is 401 on either path, before anything runs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Awaitable, Callable

from slack_bolt import App
from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from slack_sdk.signature import SignatureVerifier

from bot.app import health

log = logging.getLogger("kbloop.bot")

EVENTS_PATH = "/slack/events"
HEALTH_PATH = "/healthz"


class EventDispatcher:
    """Acks verified Events API deliveries at once and feeds them to bolt on a background thread."""

    def __init__(self, app: App, signing_secret: str, priority=None):
        self.app = app
        self.priority = priority
        self.verifier = SignatureVerifier(signing_secret)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kbloop-event-dispatch", daemon=True)
        self._thread.start()

    def try_ack(self, request: Request, body: bytes) -> Response | None:
        """A response for an event delivery (200 queued, or 401); None when bolt must answer it itself."""
        if not body.startswith(b"{") or b'"event_callback"' not in body:
            return None
        try:
            payload = json.loads(body)
        except ValueError:
            return None
        if payload.get("type") != "event_callback":
            return None
        if not self.verifier.is_valid(body, request.headers.get("x-slack-request-timestamp"),
                                      request.headers.get("x-slack-signature")):
            return JSONResponse({"error": "invalid request"}, status_code=401)
        self._queue.put(to_bolt_request(request, body))
        return Response(status_code=200)

    def _run(self) -> None:
        while True:
            bolt_request = self._queue.get()
            if self.priority is not None:
                self.priority.wait_for_quiet()
            try:
                response = self.app.dispatch(bolt_request)
                if response.status >= 400:
                    log.warning("event dispatch answered %s: %s", response.status, response.body[:200])
            except Exception:  # noqa: BLE001 - the delivery was acked; keep serving the next ones
                log.exception("event dispatch failed")


def slack_events_endpoint(app: App) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette/FastAPI endpoint that hands Slack's request to bolt (signature check included)."""
    runtime = getattr(app, "kbloop", None)
    secret = runtime.config.signing_secret if runtime is not None else None
    priority = runtime.priority if runtime is not None else None
    dispatcher = EventDispatcher(app, secret, priority) if secret else None

    async def slack_events(request: Request) -> Response:
        if priority is not None:
            priority.request_seen()
        body = await request.body()
        if dispatcher is not None:
            quick = dispatcher.try_ack(request, body)
            if quick is not None:
                return quick
        bolt_response = await run_in_threadpool(app.dispatch, to_bolt_request(request, body))
        return to_starlette_response(bolt_response)

    return slack_events


def healthz_endpoint(app: App) -> Callable[[Request], Awaitable[Response]]:
    async def healthz(request: Request) -> Response:
        ok, detail = await run_in_threadpool(health, app)
        return JSONResponse({"ok": ok, **detail}, status_code=200 if ok else 503)

    return healthz


def build_asgi(app: App) -> Starlette:
    return Starlette(routes=[
        Route(EVENTS_PATH, slack_events_endpoint(app), methods=["POST"]),
        Route(HEALTH_PATH, healthz_endpoint(app), methods=["GET"]),
    ])


def _uvicorn_server(app: App, host: str, port: int, *, log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(build_asgi(app), host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="off")
    return uvicorn.Server(config)


def run_http(app: App, host: str = "127.0.0.1", port: int = 3000) -> None:
    """Serve until interrupted."""
    log.info("Slack HTTP endpoint on http://%s:%s%s", host, port, EVENTS_PATH)
    _uvicorn_server(app, host, port).run()


class BackgroundHttpServer:
    """The HTTP server in a thread (tests, benchmarks, embedding): `with BackgroundHttpServer(app) as s: s.url`."""

    def __init__(self, app: App, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        if port == 0:  # pick a free port up front so .url is known before the server starts
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.host, self.port = host, port
        self._server = _uvicorn_server(app, host, port, log_level=log_level)
        self._thread = threading.Thread(target=self._server.run, name="kbloop-bot-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> BackgroundHttpServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the bot's HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundHttpServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_socket_mode(app: App, app_token: str) -> None:
    """Connect to Slack over Socket Mode (no public URL needed) and serve until interrupted."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    log.info("Slack Socket Mode: connecting")
    SocketModeHandler(app, app_token).start()
