"""Commands: `kbloop worker` (runs queued retraining jobs) and `kbloop jobs` (list, show, queue, cancel).

`worker_config(settings, …)` and `build_job_notifier(settings)` are also what `kbloop serve` uses to run
the same worker in a thread beside the bot and the playground.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Annotated, Optional

import typer

from kbloop.cli.app import app, ctx, fail

jobs_app = typer.Typer(help="Retraining jobs: list, show, queue, cancel.", invoke_without_command=True)
app.add_typer(jobs_app, name="jobs")

log = logging.getLogger("kbloop.jobs")


def worker_config(settings, **overrides):
    """The WorkerConfig for these settings; `overrides` are WorkerConfig fields (CLI options)."""
    from finetune.jobs.worker import WorkerConfig

    values = {"base_model": settings.base_model}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return WorkerConfig(**values)


class ConsoleNotifier:
    """Job notices on the worker's terminal."""

    def job_started(self, job) -> None:
        typer.echo(f"job {job.id} started ({job.kind}, requested by {job.requester or 'unknown'})")

    def job_progress(self, job, progress: dict) -> None:
        from finetune.jobs.queue import describe_progress

        typer.echo(f"job {job.id}: {describe_progress(progress)}")

    def job_finished(self, job, outcome: dict) -> None:
        typer.echo(f"job {job.id} {outcome.get('status')}: {outcome.get('message') or outcome.get('error') or ''}")
        if outcome.get("table"):
            typer.echo(outcome["table"])


class FanOutNotifier:
    """Tells every notifier; one failing does not stop the others (the worker logs it)."""

    def __init__(self, *notifiers):
        self.notifiers = [n for n in notifiers if n is not None]

    def _each(self, method: str, *args) -> None:
        for n in self.notifiers:
            try:
                getattr(n, method)(*args)
            except Exception:
                log.exception("%s.%s failed", type(n).__name__, method)

    def job_started(self, job) -> None:
        self._each("job_started", job)

    def job_progress(self, job, progress: dict) -> None:
        self._each("job_progress", job, progress)

    def job_finished(self, job, outcome: dict) -> None:
        self._each("job_finished", job, outcome)


def build_job_notifier(settings):
    """A SlackJobNotifier when a bot token is configured (the worker needs no signing secret), else None."""
    if not settings.slack_bot_token:
        return None
    try:
        from bot import BotConfig, SlackJobNotifier
    except ImportError as exc:  # the Slack app is not installed in this checkout
        log.warning("Slack notices disabled: %s", exc)
        return None
    return SlackJobNotifier.from_config(BotConfig.from_settings(settings, http=False))


@app.command()
def worker(
    once: Annotated[bool, typer.Option("--once", help="Run at most one queued job, then exit.")] = False,
    launcher: Annotated[Optional[str], typer.Option(
        help="How training processes start: python (one process, default), accelerate or torchrun (multi-GPU).")] = None,
    nproc: Annotated[Optional[int], typer.Option(help="Training processes under accelerate/torchrun, one per GPU (default 1).")] = None,
    heartbeat_s: Annotated[Optional[float], typer.Option(help="Heartbeat interval of a running job, seconds (default 5).")] = None,
    stale_after_s: Annotated[Optional[float], typer.Option(
        help="A running job of a worker on another host whose heartbeat is older than this many seconds is failed (default 60); on this host the worker's process is asked instead.")] = None,
    poll_s: Annotated[Optional[float], typer.Option(help="How often an idle worker looks for jobs, seconds (default 2).")] = None,
    cancel_grace_s: Annotated[Optional[float], typer.Option(
        help="After a cancel, seconds between SIGTERM and SIGKILL of the training process (default 15).")] = None,
) -> None:
    """Run queued retraining jobs, one at a time, each in a child process.

    A job of a worker that died is marked failed (with the reason) when the next worker starts.
    """
    from finetune.jobs.worker import Worker
    from store import KbloopError

    c = ctx()
    s = c.settings
    c.db  # noqa: B018  (a missing database is a one-line error here, not in the loop)
    try:
        config = worker_config(s, launcher=launcher, nproc=nproc, heartbeat_interval_s=heartbeat_s,
                               stale_after_s=stale_after_s, poll_interval_s=poll_s, cancel_grace_s=cancel_grace_s)
    except KbloopError as exc:
        fail(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    notifier = FanOutNotifier(ConsoleNotifier(), build_job_notifier(s))
    w = Worker(db_path=s.db_path, home=s.kbloop_home, config=config, notifier=notifier)
    stop = threading.Event()

    def _stop(signum, _frame) -> None:
        typer.echo(f"worker: {signal.Signals(signum).name} received, stopping the running job", err=True)
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if once:
            job = w.run_once(stop_event=stop)
            if job is None:
                typer.echo("No queued jobs.")
            elif job.status == "failed":
                fail(f"job {job.id} failed: {job.error}")
            return
        typer.echo(f"Worker {config.worker_id} waiting for jobs on {s.db_path} (Ctrl-C stops).")
        w.run_forever(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _job_line(job) -> str:
    from finetune.jobs.queue import describe_job

    when = (job.finished_at or job.started_at or job.created_at)[:19].replace("T", " ")
    return f"#{job.id} {job.kind:8} {job.status:9} {when}  {describe_job(job)}"


@jobs_app.callback()
def jobs_list(
    typer_ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(help="queued | running | succeeded | failed | cancelled")] = None,
    limit: Annotated[int, typer.Option(help="How many to show (newest first).")] = 20,
) -> None:
    """List jobs, newest first."""
    if typer_ctx.invoked_subcommand is not None:
        return
    from store.jobs import list_jobs

    statuses = ("queued", "running", "succeeded", "failed", "cancelled")
    if status is not None and status not in statuses:
        fail(f"--status must be one of {', '.join(statuses)}, not {status!r}")
    jobs = list_jobs(ctx().db, status=status, limit=limit)
    if not jobs:
        typer.echo("No jobs.")
    for job in jobs:
        typer.echo(_job_line(job))


@jobs_app.command("show")
def jobs_show(job_id: Annotated[int, typer.Argument(help="Job id (see `kbloop jobs`).")]) -> None:
    """A job's status, progress and outcome, with its metric table."""
    from store.jobs import get_job

    job = get_job(ctx().db, job_id)
    typer.echo(_job_line(job))
    if job.error:
        typer.echo(f"error: {job.error}")
    if job.result.get("message"):
        typer.echo(job.result["message"])
    if job.result.get("table"):
        typer.echo(job.result["table"])


def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@jobs_app.command("retrain")
def jobs_retrain(
    force: Annotated[bool, typer.Option("--force", help="Train even if the approved examples did not change.")] = False,
    team: Annotated[Optional[str], typer.Option(help="Retrain this team's adapter (kbloop teams), as /kb-retrain team=NAME.")] = None,
) -> None:
    """Queue a retraining job (what /kb-retrain does); a running `kbloop worker` picks it up."""
    from finetune.jobs.queue import describe_job, request_retrain
    from store.audit import record_audit
    from store.jobs import JobAlreadyActive

    db = ctx().db
    try:
        params = {**({"force": True} if force else {}), **({"team": team} if team else {})}
        job = request_retrain(db, requester=_actor(), params=params or None)
    except JobAlreadyActive as exc:
        fail(f"not queued: {describe_job(exc.job)}")
    record_audit(db, actor=_actor(), action="retrain", allowed=True, target=f"job {job.id}")
    typer.echo(f"Queued job {job.id}. Run `kbloop worker` (or `kbloop serve`) to train it; `kbloop jobs` shows progress.")


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[int, typer.Argument(help="Job id (see `kbloop jobs`).")]) -> None:
    """Cancel a job: a queued one at once; a running one stops at its next step (nothing half-trained is kept)."""
    from store.audit import record_audit
    from store.jobs import request_cancel

    db = ctx().db
    job = request_cancel(db, job_id)
    record_audit(db, actor=_actor(), action="cancel_job", allowed=True, target=f"job {job_id}")
    if job.status == "cancelled":
        typer.echo(f"Job {job_id} cancelled before it started.")
    else:
        typer.echo(f"Job {job_id} is being stopped; its worker marks it cancelled within a few seconds.")
