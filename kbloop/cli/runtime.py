"""Commands: serve (everything in one process) and demo (offline, end to end, on sample data)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from kbloop.cli.app import app, ctx, fail


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on. Beyond loopback needs KBLOOP_PLAYGROUND_AUTH.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    worker: Annotated[bool, typer.Option(help="Run queued retraining jobs in this process.")] = True,
) -> None:
    """One process: Slack endpoint (/slack/events), playground (/playground), /healthz and the job runner,
    sharing one loaded model. With SLACK_APP_TOKEN it also connects through Socket Mode."""
    from kbloop.serve import serve as run_serve
    from playground import PlaygroundError

    c = ctx()
    c.db  # noqa: B018  (the workspace must exist: one clear line otherwise)

    def announce(services) -> None:
        typer.echo(f"kbloop serving on http://{host}:{port}/  (playground: /playground/, health: /healthz)")
        for note in services.notes:
            typer.echo(f"  {note}")
        typer.echo("Ctrl+C to stop.")

    try:
        run_serve(c.settings, host=host, port=port, with_worker=worker, on_ready=announce)
    except PlaygroundError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


class _PrintProgress:
    """A JobNotifier that draws the demo's training job on the terminal."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                 TimeRemainingColumn())
        self.task = None

    def job_started(self, job) -> None:
        self.progress.start()
        self.task = self.progress.add_task(f"Training (job {job.id})", total=None, info="starting")

    def job_progress(self, job, progress: dict) -> None:
        from finetune.jobs.protocol import JobProgress

        p = JobProgress.from_dict(progress)
        info = p.phase
        if p.loss is not None:
            info = f"{info} loss {p.loss:.3f}".strip()
        self.progress.update(self.task, total=p.total, completed=p.step or 0, info=info)

    def job_finished(self, job, outcome: dict) -> None:
        self.progress.stop()
        typer.echo(outcome.get("message", outcome.get("status", "")))
        if outcome.get("table"):
            typer.echo(outcome["table"])


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Interface for the playground.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the playground and Slack endpoint.")] = 8000,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the playground when ready.")] = True,
    epochs: Annotated[float | None, typer.Option(
        help="Train each adapter this many epochs instead of tiny's defaults: quicker, but the model alone "
             "then reproduces less of what it was taught (under half of it: the retrain starts from the base "
             "instead of continuing the first adapter).", min=0.01)] = None,
) -> None:
    """Offline, end to end: a workspace with the sample knowledge base and QA pairs, a first adapter trained on
    the `tiny` base, a few answers with votes in the review queue, an approved correction answered at once
    and then learnt by a continued retrain, then the playground (and Slack when configured). Safe to run
    again: it reuses what is already there."""
    from finetune.jobs.worker import Worker, WorkerConfig
    from finetune.serving.retrieval import embed_missing_passages
    from kbloop.answering import engine_for
    from kbloop.serve import samples_dir
    from kbloop.serve import serve as run_serve
    from kbloop.settings import load_settings
    from store import open_db
    from store.adapters import active_adapter
    from store.documents import import_documents
    from store.examples import add_examples, list_examples, review_example
    from store.formats import read_examples_file
    from store.interactions import feedback_stats, record_vote

    samples = samples_dir()
    if not (samples / "qa.jsonl").exists():
        fail(f"{samples}: the sample data is missing; run the demo from a kbloop source checkout")
    # Offline whatever the environment says; and, unless told otherwise, the one person trying kbloop on their
    # machine may press Train in the playground (it still answers loopback only, or asks for a login).
    local_admin = {} if "KBLOOP_PLAYGROUND_LOCAL_ADMIN" in os.environ else {"KBLOOP_PLAYGROUND_LOCAL_ADMIN": True}
    settings = load_settings(KBLOOP_BASE_MODEL="tiny", **local_admin)
    settings.kbloop_home.mkdir(parents=True, exist_ok=True)
    db = open_db(settings.db_path)
    typer.echo(f"Workspace: {settings.kbloop_home.resolve()}")

    import_documents(db, [samples / "kb"])

    embed_missing_passages(db)
    added, dupes = add_examples(db, read_examples_file(samples / "qa.jsonl").examples, status="approved", source="import",
                                reviewer="demo")
    typer.echo(f"Knowledge base and QA pairs imported ({added} new examples, {dupes} already there).")

    worker = Worker(db_path=settings.db_path, home=settings.kbloop_home,
                    config=WorkerConfig(base_model="tiny", progress_notify_interval_s=1.0,
                                        heartbeat_interval_s=1.0, stale_after_s=30.0),
                    notifier=_PrintProgress())
    # An epoch budget replaces tiny's step floor and early stop too: the run is as short as asked.
    budget = {"train": {"epochs": epochs, "min_steps": 0, "stop_reproduced": 0.0}} if epochs else {}
    if active_adapter(db) is None:
        # The tiny defaults (docs/training.md): the adapter reproduces its training answers.
        typer.echo("Training a first adapter on the tiny base (its defaults: a few minutes on two CPU cores)…")
        version = _run_demo_job(db, worker, params={"force": True, **budget})["version"]
        if active_adapter(db) is None and version:
            # The tiny base has random weights: an adapter that memorises the training answers can score
            # worse than it on held-out loss, so the gate may keep it as a candidate. The demo then promotes
            # it as an admin would (`kbloop promote --force`, audited); later adapters meet the gate against it.
            from finetune.registry.promotion import promote

            promote(db, version, actor="demo", force=True)
            typer.echo(f"{version} promoted by the demo (forced: it did not pass the held-out gate against the "
                       "tiny base's random weights; see docs/training.md).")
    active = active_adapter(db)
    typer.echo(f"Active adapter: {active.version if active else 'none (base model)'}")

    if feedback_stats(db)["interactions"] == 0:
        engine = engine_for(settings).start()
        try:
            if not engine.wait_ready(300):
                fail(f"the model did not load: {engine.error}")
            # Three questions with approved answers (verified answers, given as approved) and two without
            # (tiny has nothing sensible to say): one of those gets a correction, the loop's starting point.
            questions = [
                ("My laptop was stolen. What do I do?", 1, None),
                ("停车罚单可以报销吗？", 1, None),
                ("What are the IT helpdesk opening hours?", 1, None),
                ("报销的截止时间是什么时候？", -1, None),
                (DEMO_CORRECTED, -1, DEMO_CORRECTION),
            ]
            for i, (question, vote, correction) in enumerate(questions):
                answer = engine.answer(question, source="playground", user_id=f"demo-user-{i}")
                record_vote(db, interaction_id=answer.interaction_id, user_id=f"demo-user-{i}", vote=vote,
                            correction=correction, source="playground")
            typer.echo("Seeded the review queue with a few answers and votes.")

            # The loop, once: a curator approves the correction; the next asker gets it at once.
            [pending] = [e for e in list_examples(db, status="pending") if e.question == DEMO_CORRECTED]
            review_example(db, pending.id, decision="approved", reviewer="demo-curator")
            typer.echo(f'\nA curator approved the correction to "{DEMO_CORRECTED}". Asked again, before any retraining:')
            _show(engine.answer(DEMO_CORRECTED, source="playground", user_id="demo-user-5"))
            typer.echo("\nRetraining with the new answer, continuing the active adapter where it can…")
            outcome = _run_demo_job(db, worker, params=budget)
            if outcome.get("start"):
                typer.echo(f"Started from: {outcome['start']}")
            typer.echo("The model alone (`kbloop ask --model-only`) now says:")
            _show(engine.answer(DEMO_CORRECTED, record=False, model_only=True))
        finally:
            engine.close()

    if serve_after:
        run_serve(settings, host=host, port=port, on_ready=lambda services: _announce_demo(host, port, services))


DEMO_CORRECTED = "Where is the Berlin office?"
DEMO_CORRECTION = "Ask the office team in #berlin-office; the address is in the Berlin office guide."


def _run_demo_job(db, worker, *, params: dict) -> dict:
    """Queue a retraining job and run it in this process's worker; its outcome, or one clear line."""
    import threading

    from finetune.jobs.queue import request_retrain

    job = request_retrain(db, requester="demo", params=params)
    finished = worker.run_once(stop_event=threading.Event())
    if finished is None or finished.id != job.id or finished.status != "succeeded":
        error = finished.error if finished is not None else "the job did not run"
        fail(f"the demo's training job failed: {error}")
    return finished.result


def _show(answer) -> None:
    typer.echo(f"  {answer.text}")
    typer.echo(f"  ({answer.verified_line or 'generated by ' + (answer.adapter_version or 'the base model')})")


def _announce_demo(host: str, port: int, services) -> None:
    typer.echo(f"\nkbloop demo is running: open http://{host}:{port}/playground/")
    for note in services.notes:
        typer.echo(f"  {note}")
    # Other commands read KBLOOP_BASE_MODEL, whose default is the hub model, not the demo's base.
    typer.echo('  CLI, from another terminal here: KBLOOP_BASE_MODEL=tiny kbloop ask "Who must be notified about '
               'a SEV1, and how fast?"')
    typer.echo("Ctrl+C to stop.")
