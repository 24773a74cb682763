"""Commands: playground."""

from __future__ import annotations

from typing import Annotated

import typer

from kbloop.cli.app import app, ctx, fail


@app.command("playground")
def playground_command(
    host: Annotated[str, typer.Option(help="Interface to listen on. Beyond loopback needs KBLOOP_PLAYGROUND_AUTH.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    engine: Annotated[bool, typer.Option(help="Load the answer model for the Chat tab (off: review and data only).")] = True,
) -> None:
    """The Gradio playground: review feedback into training examples, curate and export the dataset, chat with
    and compare adapters, and (admins) retrain, promote and roll back."""
    from playground import PlaygroundConfig, PlaygroundError, build_playground, check_bind, launch

    c = ctx()
    config = PlaygroundConfig.from_settings(c.settings, host=host, port=port)
    try:
        check_bind(config)  # before loading anything
    except PlaygroundError as exc:
        fail(str(exc))
    c.db  # noqa: B018  (the database must exist, `kbloop init`; fails with one line otherwise)
    answerer = None
    if engine:
        from kbloop.answering import engine_for

        answerer = engine_for(c.settings).start()
    demo = build_playground(config=config, engine=answerer, db_path=c.settings.db_path, home=c.settings.kbloop_home)
    if config.login_required:
        login = "login required"
    elif config.local_admin:
        login = "no login: loopback only; you are 'local', an admin (KBLOOP_PLAYGROUND_LOCAL_ADMIN)"
    else:
        login = "no login: loopback only; you are 'local', a curator (KBLOOP_PLAYGROUND_LOCAL_ADMIN=true to train)"
    typer.echo(f"Playground on http://{host}:{port}/ ({login}); Ctrl+C to stop.")
    try:
        launch(demo, config=config, quiet=True)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    finally:
        if answerer is not None:
            answerer.close()
