"""`kbloop serve`: one process with the Slack endpoint, the playground, /healthz and the job runner,
sharing one loaded answer engine.

    POST /slack/events   events, slash commands, interactivity (when SLACK_BOT_TOKEN + SLACK_SIGNING_SECRET)
    GET  /healthz        200 when the store and the model are ready, 503 otherwise (the reason goes to the log)
    /playground          the Gradio app (a login when KBLOOP_PLAYGROUND_AUTH is set)

Shutdown (SIGINT / SIGTERM): stop taking work, let answers in flight finish, stop the training child
(the job ends "failed: stopped by shutdown", and nothing half-trained is registered), close the engine.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from kbloop.settings import Settings

log = logging.getLogger("kbloop.serve")


@dataclass
class Services:
    """What one `kbloop serve` process runs; built by `build_services`, stopped by `stop`."""

    settings: Settings
    engine: object
    slack_app: object | None = None
    worker_thread: threading.Thread | None = None
    socket_mode: object | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        self.stop_event.set()
        if self.socket_mode is not None:
            try:
                self.socket_mode.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.exception("closing Socket Mode")
        if self.slack_app is not None:
            from bot import shutdown

            shutdown(self.slack_app, wait=True)  # answers in flight are posted before we go
        if self.worker_thread is not None:
            self.worker_thread.join(timeout=60)
        self.engine.close()


def build_services(settings: Settings, *, with_worker: bool = True, with_slack: bool = True) -> Services:
    from kbloop.answering import engine_for

    engine = engine_for(settings).start()
    services = Services(settings=settings, engine=engine)
    notifier = None
    if with_slack and settings.slack_bot_token:
        from bot import BotConfig, SlackJobNotifier, build_app

        # HTTP needs the signing secret; Socket Mode alone can run without it.
        config = BotConfig.from_settings(settings, http=not settings.slack_app_token)
        services.slack_app = build_app(config=config, engine=engine, db_path=settings.db_path)
        notifier = SlackJobNotifier(client=services.slack_app.client, notify_channel=config.notify_channel)
        if settings.slack_app_token:
            from slack_bolt.adapter.socket_mode import SocketModeHandler

            services.socket_mode = SocketModeHandler(services.slack_app, settings.slack_app_token)
            services.socket_mode.connect()
            services.notes.append("Slack: Socket Mode connected")
        if settings.slack_signing_secret:
            services.notes.append("Slack: HTTP endpoint at /slack/events")
    else:
        services.notes.append("Slack: off (set SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET to answer in Slack)")
    if with_worker:
        from finetune.jobs.worker import Worker, WorkerConfig

        worker = Worker(db_path=settings.db_path, home=settings.kbloop_home,
                        config=WorkerConfig(base_model=settings.base_model), notifier=notifier)
        services.worker_thread = threading.Thread(target=worker.run_forever, args=(services.stop_event,),
                                                  name="kbloop-worker", daemon=True)
        services.worker_thread.start()
        services.notes.append("Jobs: runner started (one training job at a time)")
    return services


def build_asgi(services: Services, *, host: str, port: int):
    """The FastAPI app: Slack endpoint, health, playground. `services` must already be built."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, RedirectResponse

    from playground import PlaygroundConfig, build_playground, mount_playground
    from store import local_db

    settings = services.settings
    app = FastAPI(title="kbloop", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz():
        from bot.app import readiness  # the bot's own /healthz rule: states only, the reasons go to the log

        ok, detail = readiness(lambda: local_db(settings.db_path), services.engine)
        return JSONResponse({"ok": ok, **detail}, status_code=200 if ok else 503)

    if services.slack_app is not None and settings.slack_signing_secret:
        from bot import slack_events_endpoint

        app.add_route("/slack/events", slack_events_endpoint(services.slack_app), methods=["POST"])
    else:
        @app.post("/slack/events")
        def slack_not_configured(request: Request):
            return JSONResponse({"error": "Slack is not configured on this server: set SLACK_BOT_TOKEN and "
                                          "SLACK_SIGNING_SECRET"}, status_code=503)

    @app.get("/")
    def root():
        return RedirectResponse("/playground/")

    config = PlaygroundConfig.from_settings(settings, host=host, port=port)
    demo = build_playground(config=config, engine=services.engine, db_path=settings.db_path,
                            home=settings.kbloop_home)
    return mount_playground(app, demo, config=config, path="/playground")


def serve(settings: Settings, *, host: str, port: int, with_worker: bool = True,
          on_ready=None) -> None:
    """Run everything until SIGINT / SIGTERM, then shut down gracefully."""
    import uvicorn

    from playground import PlaygroundConfig, check_bind

    check_bind(PlaygroundConfig.from_settings(settings, host=host, port=port))  # before loading anything
    services = build_services(settings, with_worker=with_worker)
    try:
        app = build_asgi(services, host=host, port=port)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                               timeout_graceful_shutdown=30))
        if on_ready is not None:
            threading.Thread(target=_announce_when_started, args=(server, services, on_ready), daemon=True).start()
        # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal to the handler that
        # was there before; a quiet one lets the rest of the shutdown (services.stop) run and exit 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _note_signal)
        server.run()
    finally:
        services.stop()


def _note_signal(signum, _frame) -> None:
    log.info("received %s: shutting down", signal.Signals(signum).name)


def _announce_when_started(server, services: Services, on_ready) -> None:
    import time

    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        on_ready(services)


def samples_dir() -> Path:
    """The shipped sample data (a source checkout's samples/ folder)."""
    return Path(__file__).resolve().parent.parent / "samples"
