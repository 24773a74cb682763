"""The playground as one Gradio app: the five tabs, each built by its own module, and the page load.

    demo = build_playground(config=PlaygroundConfig(), engine=engine, db_path=db_path, home=home)
    launch(demo, config=config)                      # `kbloop playground`
    mount_playground(fastapi_app, demo, config=config)  # `kbloop serve`, at /playground

Each tab is laid out and wired in a `*_tab.py` module beside its handler module (review_tab.py beside
review.py, and so on for dataset, chat, search, training). Every event handler resolves the caller
(gr.Request.username, or "local" without a login) and opens the calling thread's own database connection
(playground.context); the decisions themselves live in the handler modules, which are tested without Gradio.
Endpoints carry api_name so gradio_client (and scripts) can drive the app.

Launched or mounted, the app sits behind playground.auth's PlaygroundGuard (loopback names only without a
login) and LoginGate (passwords, with a wait after repeated failures).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import gradio as gr

from finetune.serving.protocol import AnswerEngine
from playground.auth import LoginGate, PlaygroundGuard
from playground.chat_tab import build_chat_tab
from playground.config import PlaygroundConfig, check_bind
from playground.context import TabContext
from playground.dataset_tab import build_dataset_tab
from playground.review_tab import build_review_tab
from playground.search_tab import build_search_tab
from playground.training_tab import build_training_tab

# No phoning home: the playground runs on machines that may not reach the internet at all.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CSS = """
#review-flags { color: #b45309; }
.kb-small textarea { font-size: 0.9em; }
footer { display: none !important; }
"""

# Gradio's own copies of uploads and downloads (its cache): every 15 minutes, those older than an hour go.
GRADIO_CACHE_SWEEP = (900, 3600)


def build_playground(*, config: PlaygroundConfig, engine: AnswerEngine | None, db_path: Path | str,
                     home: Path | str | None = None) -> gr.Blocks:
    """The playground as a gr.Blocks (not launched). `engine` may be None: the chat tab then says so."""
    ctx = TabContext(config=config, db_path=Path(db_path))

    with gr.Blocks(title=config.title, analytics_enabled=False, delete_cache=GRADIO_CACHE_SWEEP) as demo:
        with gr.Row():
            gr.Markdown(f"## {config.title}")
            whoami = gr.Markdown("", elem_id="whoami")

        review_tab = build_review_tab(ctx)
        dataset_tab = build_dataset_tab(ctx)
        chat_tab = build_chat_tab(ctx, engine)
        build_search_tab(ctx)
        training_tab = build_training_tab(ctx)

        def on_load(request: gr.Request):
            viewer = ctx.who(request)
            role = "admin" if viewer.is_admin else "curator"
            logout = " · [log out](logout)" if config.login_required else ""
            head = f"Signed in as **{viewer.name}** ({role}){logout}"
            admin = viewer.is_admin
            versions = training_tab.version_choices() if admin else []
            polled = training_tab.poll(request) if admin else [gr.update()] * 4
            return ([head, gr.update(visible=admin), gr.Timer(active=admin), gr.update(choices=versions)]
                    + review_tab.refresh("all", "to_review", "", "", "", "")
                    + list(dataset_tab.show("", "approved")) + chat_tab.model_choices() + list(polled))

        demo.load(on_load, None,
                  [whoami, training_tab.tab, training_tab.timer, training_tab.version] + review_tab.outputs
                  + dataset_tab.outputs + chat_tab.outputs + training_tab.poll_outputs, api_name="whoami")
    demo.kbloop_exports = dataset_tab.exports  # launch / mount_playground remove them when the server stops
    return demo


def launch(demo: gr.Blocks, *, config: PlaygroundConfig, prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the playground on config.host:config.port (refused beyond loopback without a login)."""
    check_bind(config)
    return demo.launch(
        server_name=config.host, server_port=config.port, auth=_auth(config),
        auth_message="kbloop playground: sign in with your curator account." if config.auth else None,
        prevent_thread_lock=prevent_thread_lock, share=False, ssr_mode=False, show_error=True, quiet=quiet,
        theme=gr.themes.Soft(), css=CSS, footer_links=[], max_file_size="50mb", app_kwargs=_app_kwargs(demo, config),
    )


def mount_playground(app, demo: gr.Blocks, *, config: PlaygroundConfig, path: str = "/playground"):
    """Mount the playground inside a FastAPI app (`kbloop serve`); the same login rule applies to its host,
    and the same guard to its requests (the rest of `app`, such as /slack/events, is not affected)."""
    check_bind(config)
    return gr.mount_gradio_app(app, demo, path, auth=_auth(config), ssr_mode=False, show_error=True,
                               theme=gr.themes.Soft(), css=CSS, footer_links=[], max_file_size="50mb",
                               app_kwargs=_app_kwargs(demo, config))


def _auth(config: PlaygroundConfig):
    return LoginGate.from_config(config) if config.auth else None


def _app_kwargs(demo: gr.Blocks, config: PlaygroundConfig) -> dict:
    """For the FastAPI app Gradio builds: the guard in front of every route, and a lifespan that removes
    the export folders when the server stops."""
    from starlette.middleware import Middleware

    exports = getattr(demo, "kbloop_exports", None)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            if exports is not None:
                exports.close()

    return {"middleware": [Middleware(PlaygroundGuard, loopback_only=not config.login_required)],
            "lifespan": lifespan}
