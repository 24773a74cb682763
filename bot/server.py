"""HTTP mode: an ASGI app with POST /slack/events (events, slash commands, interactivity) and GET /healthz.

`kbloop serve` mounts the same endpoint in its own FastAPI app:

    fastapi_app.add_route("/slack/events", slack_events_endpoint(app), methods=["POST"])

The door checks every request once, on the raw bytes, before anything parses it (bot.verification):
unsigned, stale or replayed is 401, a body over 1 MiB is 413, a verified body that is not Slack's
JSON or form is 400. Bolt's own signature check is off (bot.app): this is the one place requests are
verified, so what passed it can be handled later without a second check.

Acknowledging fast under load: Events API deliveries (JSON, type `event_callback`) carry nothing for
the response, so once verified they are written to the store's event inbox and answered 200; one
dispatcher thread feeds the inbox to bolt, oldest first, and removes each delivery once dispatched. A
delivery acknowledged just before a crash or a restart is still in the inbox and handled by the next
process; it was verified when it arrived, so a backlog older than Slack's 5-minute window is handled
too. Slash commands and interactivity, whose ack may carry a reply or modal errors, go through bolt
on Starlette's thread pool (bolt's own Starlette adapter would block the event loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from slack_bolt import App, BoltRequest
from slack_bolt.adapter.starlette.handler import to_starlette_response
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot.app import health
from bot.config import BotConfigError
from bot.verification import RecentSignatures, Refused, SlackBody, check_signature, read_body, request_timestamp
from store import local_db
from store.slack_inbox import Delivery, GroupCommit, InboxEvent, pending_slack_events, remove_slack_event
from store.text import now

log = logging.getLogger("kbloop.bot")

EVENTS_PATH = "/slack/events"
HEALTH_PATH = "/healthz"
# Headers the listeners read (bolt's context.retry_num / retry_reason); kept with an inbox delivery.
INBOX_HEADERS = ("content-type", "x-slack-retry-num", "x-slack-retry-reason")


class EventDispatcher:
    """Feeds the verified Events API deliveries in the inbox to bolt on one background thread.

    `accept()` stores a delivery (the door answers 200 only after it returns); the thread dispatches
    the waiting ones oldest first and removes each once bolt has taken it. At start it first handles
    what an earlier process left, once the engine has loaded its model (at most `model_wait_s`): they
    were acknowledged long ago, and a "still loading, ask again" answer would waste them. It also looks
    every `poll_s` seconds, for deliveries left while it was busy or written by another process on the
    same database. `stop()` leaves what still waits for the next start.
    """

    def __init__(self, app: App, *, db_path: Path, priority=None, poll_s: float = 2.0,
                 model_wait_s: float = 600.0):
        self.app = app
        self.db_path = Path(db_path)
        self.priority = priority
        self.poll_s = poll_s
        self.model_wait_s = model_wait_s
        self._started_at = now()
        self._inbox = GroupCommit(lambda: local_db(self.db_path))
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kbloop-event-dispatch", daemon=True)
        self._wake.set()
        self._thread.start()

    def accept(self, *, event_id: str, body: str, headers: dict[str, str]) -> None:
        """Keep a verified delivery (a retry of one still waiting adds nothing) and wake the thread."""
        self._inbox.put(Delivery(event_id, body, headers))
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - the deliveries stay in the inbox; try again at the next wake
                log.exception("event inbox: could not read or update the store")
                self._stopping.wait(self.poll_s)

    def _drain(self) -> None:
        db = local_db(self.db_path)
        while not self._stopping.is_set():
            batch = pending_slack_events(db)
            if not batch:
                return
            for item in batch:
                if item.received_at < self._started_at:
                    self._wait_for_model()
                if self._stopping.is_set():
                    return
                if self.priority is not None:
                    self.priority.wait_for_quiet()
                self._dispatch(item)
                # Removed once bolt has it: the listeners claim the event id in the store before answering
                # (bot.questions), so a delivery dispatched twice (two processes, a crash just here) answers once.
                remove_slack_event(db, item.id)

    def _wait_for_model(self) -> None:
        engine = getattr(getattr(self.app, "kbloop", None), "engine", None)
        deadline = time.monotonic() + self.model_wait_s
        while (not getattr(engine, "ready", True) and not getattr(engine, "error", None)
               and time.monotonic() < deadline and not self._stopping.is_set()):
            self._stopping.wait(0.2)

    def _dispatch(self, item: InboxEvent) -> None:
        try:
            response = self.app.dispatch(BoltRequest(body=item.body, headers=item.headers))
            if response.status >= 400:
                log.warning("event %s dispatch answered %s: %s", item.event_id, response.status,
                            str(response.body)[:200])
        except Exception as exc:  # noqa: BLE001 - the delivery was acked; keep serving the next ones
            runtime = getattr(self.app, "kbloop", None)
            if runtime is not None:
                runtime.record_error("event", exc, event_id=item.event_id)
            else:
                log.exception("event %s dispatch failed", item.event_id)


class SlackDoor:
    """The checks every request to /slack/events passes, in order (see bot.verification)."""

    def __init__(self, signing_secret: str, *, clock=time.time):
        self.signing_secret = signing_secret
        self.clock = clock
        self.seen = RecentSignatures(clock=clock)

    async def admit(self, request: Request) -> SlackBody:
        """The verified, parsed body; Refused with the status and reason otherwise."""
        timestamp, signature = request_timestamp(request.headers, now=self.clock())
        body = await read_body(request)
        check_signature(self.signing_secret, body, timestamp, signature)
        try:
            self.seen.check_fresh(signature, timestamp)
            replay = None
        except Refused as refused:
            # Slack's immediate retry of an event (X-Slack-Retry-Num) within the same second repeats the
            # timestamp, so the signature too. Events are deduplicated by event_id further in (at most one
            # answer per event, persisted), so a repeated event delivery may pass; nothing else may.
            if "x-slack-retry-num" not in request.headers:
                raise
            replay = refused
        parsed = SlackBody(body, request.headers.get("content-type"))
        if replay is not None and not parsed.is_event_callback:
            raise replay
        return parsed


def slack_events_endpoint(app: App) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette/FastAPI endpoint for Slack's requests: verified at the door, then handed to bolt."""
    runtime = getattr(app, "kbloop", None)
    secret = runtime.config.signing_secret if runtime is not None else None
    if not secret:
        # Bolt does not verify requests itself (bot.app): without a secret this door would let anyone in.
        raise BotConfigError("SLACK_SIGNING_SECRET is not set: the signing secret from your Slack app's "
                             "Basic Information page (needed in HTTP mode)")
    priority = runtime.priority
    door = SlackDoor(secret)
    dispatcher = EventDispatcher(app, db_path=runtime.db_path, priority=priority)
    runtime.dispatchers.append(dispatcher)  # stopped by bot.shutdown(app)

    async def slack_events(request: Request) -> Response:
        try:
            slack_body = await door.admit(request)
        except Refused as refused:
            log.info("refused a request to %s: %s %s", EVENTS_PATH, refused.status, refused.reason)
            return JSONResponse({"error": refused.reason}, status_code=refused.status)
        # Only verified requests count as Slack traffic that background work steps aside for (bot.priority):
        # an unsigned flood must not slow the answers.
        priority.request_seen()
        if slack_body.is_event_callback:
            headers = {k: request.headers[k] for k in INBOX_HEADERS if k in request.headers}
            try:
                await run_in_threadpool(dispatcher.accept, event_id=slack_body.payload["event_id"],
                                        body=slack_body.text, headers=headers)
            except Exception:  # noqa: BLE001 - not stored, so not acked: Slack retries it
                log.exception("could not store event %s", slack_body.payload.get("event_id"))
                return JSONResponse({"error": "the event could not be stored; retry later"}, status_code=503)
            return Response(status_code=200)
        bolt_request = BoltRequest(body=slack_body.text, query=str(request.query_params),
                                   headers=dict(request.headers))
        try:
            bolt_response = await run_in_threadpool(app.dispatch, bolt_request)
        except Exception:  # noqa: BLE001 - the details go to the log, never to the caller
            log.exception("dispatching a %s request failed", slack_body.payload.get("type") or "slash command")
            return JSONResponse({"error": "internal error"}, status_code=500)
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


def _uvicorn_server(app: App, host: str, port: int, *, log_level: str = "info", thread: bool = False):
    import uvicorn

    config = uvicorn.Config(build_asgi(app), host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="off")
    return _thread_server(config) if thread else uvicorn.Server(config)


def run_http(app: App, host: str = "127.0.0.1", port: int = 3000) -> None:
    """Serve until interrupted."""
    log.info("Slack HTTP endpoint on http://%s:%s%s", host, port, EVENTS_PATH)
    _uvicorn_server(app, host, port).run()


def _thread_server(config):
    """A uvicorn.Server that stops as soon as it is asked to and its connections have closed.

    uvicorn's own notices `should_exit` at its next 0.1 s tick, then pauses a fixed 0.1 s before it waits for open
    connections: about 0.15 s per stop, paid by every test that starts a bot (the fast suite stops over a hundred).
    This one is woken by `stop()` and waits for exactly what uvicorn waits for (open connections, then running
    tasks, then the listening sockets and the lifespan) without the fixed pause; answers in flight still finish."""
    import asyncio

    import uvicorn

    class ThreadServer(uvicorn.Server):
        _wake: asyncio.Event | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        def request_exit(self) -> None:
            self.should_exit = True
            loop, wake = self._loop, self._wake
            if loop is not None and wake is not None:
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:  # the loop has already closed: nothing left to wake
                    pass

        async def main_loop(self) -> None:  # uvicorn's loop (on_tick every 0.1 s), woken at once by request_exit
            self._wake, self._loop = asyncio.Event(), asyncio.get_running_loop()
            counter = 0
            should_exit = await self.on_tick(counter)
            while not should_exit:
                counter = (counter + 1) % 864000
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.1)
                except asyncio.TimeoutError:
                    pass
                should_exit = await self.on_tick(counter)

        async def shutdown(self, sockets=None) -> None:
            logging.getLogger("uvicorn.error").info("Shutting down")
            for server in self.servers:  # stop accepting new connections
                server.close()
            for connection in list(self.server_state.connections):  # idle ones close now, busy ones after answering
                connection.shutdown()
            while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
                await asyncio.sleep(0.005)
            for server in self.servers:
                await server.wait_closed()
            if not self.force_exit:
                await self.lifespan.shutdown()

    return ThreadServer(config)


class BackgroundHttpServer:
    """The HTTP server in a thread (tests, benchmarks, embedding): `with BackgroundHttpServer(app) as s: s.url`."""

    def __init__(self, app: App, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        if port == 0:  # pick a free port up front so .url is known before the server starts
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.host, self.port = host, port
        self._server = _uvicorn_server(app, host, port, log_level=log_level, thread=True)
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
        self._server.request_exit()
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
