"""The child process that runs one job for a worker (finetune.jobs.worker.Worker starts it; people don't).

    python -m finetune.jobs.child JOB_ID --db PATH --home PATH --base BASE --worker-id ID

or the same module under `accelerate launch` / `torchrun` (every rank runs it; rank 0 reports), started
as `python -m finetune.jobs.child --exec torchrun … -m finetune.jobs.child JOB_ID …`.

It dies with its parent (PR_SET_PDEATHSIG), stops at the next training step on SIGTERM, writes progress
(`jobs.progress`) and the per-step log (`train_steps`) to the store, and leaves its outcome in
`$KBLOOP_HOME/jobs/<id>/outcome.json` for the worker, which alone finishes the job and promotes.
Exit status: 0 done, 1 failed, 2 the job is not this worker's (any more), 3 cancelled. What it writes and
exits with is finetune.jobs.protocol, which the worker reads with.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as _dt
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from finetune.jobs.protocol import (
    CANCELLED,
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_NOT_OURS,
    EXIT_OK,
    FAILED,
    SUCCEEDED,
    ChildResult,
    JobProgress,
    write_child_result,
)
from store import KbloopError, StoreError, open_db
from store.jobs import Job, get_job, log_train_step, set_job_progress
from store.text import now


class JobCancelled(Exception):
    """The job was asked to stop (SIGTERM), or it is no longer this worker's."""


class ProgressReporter:
    """Writes the job's progress (a JobProgress: phase, step, total, loss, eta_s, updated_at) and the step log.

    Only the main rank writes; writes are spaced `min_interval_s` apart (the last step always lands).
    """

    def __init__(self, db, job: Job, *, is_main: bool = True, min_interval_s: float = 0.5):
        self.db, self.job, self.is_main, self.min_interval_s = db, job, is_main, min_interval_s
        self.run = f"job-{job.id}"
        self.progress = JobProgress()
        self._last_write = 0.0
        self._last_logged_step = -1

    def phase(self, name: str, **changes) -> None:
        """`changes`: other JobProgress fields (detail, eta_s, dataset_hash, n_examples)."""
        self.progress = dataclasses.replace(self.progress, phase=name, **changes)
        self._write(force=True)

    def step(self, info) -> None:
        """`on_step` for finetune.training.trainer.train_adapter: a StepInfo(step, total_steps, epoch, loss, lr, eta_s)."""
        step, total = int(info.step), int(info.total_steps)
        self.progress = dataclasses.replace(
            self.progress, phase="training", step=step, total=total,
            loss=None if info.loss is None else float(info.loss),
            epoch=None if info.epoch is None else float(info.epoch),
            eta_s=None if info.eta_s is None else float(info.eta_s),
        )
        if self.is_main and step != self._last_logged_step:
            self._last_logged_step = step
            log_train_step(self.db, run=self.run, step=step, loss=self.progress.loss, epoch=self.progress.epoch,
                           learning_rate=getattr(info, "learning_rate", None), job_id=self.job.id)
        self._write(force=step >= total)

    def _write(self, *, force: bool) -> None:
        if not self.is_main:
            return
        t = time.monotonic()
        if not force and t - self._last_write < self.min_interval_s:
            return
        self._last_write = t
        set_job_progress(self.db, self.job.id, dataclasses.replace(self.progress, updated_at=now()).to_dict())


class StopSignal:
    """`should_stop()` for training: SIGTERM received, or the job stopped being this worker's."""

    def __init__(self, db, job_id: int, worker_id: str, *, check_every_s: float = 2.0):
        self.db, self.job_id, self.worker_id, self.check_every_s = db, job_id, worker_id, check_every_s
        self.event = threading.Event()
        self._next_check = 0.0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        signal.signal(signal.SIGINT, lambda *_: self.event.set())

    def __call__(self) -> bool:
        if self.event.is_set():
            return True
        t = time.monotonic()
        if t >= self._next_check:
            self._next_check = t + self.check_every_s
            job = get_job(self.db, self.job_id)
            if job.status != "running" or job.worker_id != self.worker_id:
                self.event.set()
        return self.event.is_set()

    def check(self) -> None:
        if self():
            raise JobCancelled("the job was cancelled or taken from this worker")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies: a `kill -9` of the worker takes the training
    with it, so an orphan can never register anything for a job the next worker already failed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the job-ownership checks still hold
        pass
    parent = os.environ.get("KBLOOP_JOB_PARENT_PID")
    # Launched directly by the worker: if it is already gone, the death signal came too late.
    if parent and os.environ.get("RANK") is None and os.getppid() != int(parent):
        os._exit(EXIT_NOT_OURS)


# --------------------------------------------------------------------------------------------------
# What a job does
# --------------------------------------------------------------------------------------------------

Runner = Callable[..., ChildResult]


def run_retrain(db, job: Job, *, home: Path, base: str, reporter: ProgressReporter,
                should_stop: StopSignal) -> ChildResult:
    """Train a candidate on the approved examples, evaluated against the active adapter on the same held-out
    set, and register it as a candidate. The worker promotes it when the gate passed."""
    from finetune.registry.candidates import train_candidate
    from finetune.training.config import TrainConfig
    from store.examples import approved_snapshot

    team = job.params.get("team")  # a team's adapter (store.teams), None: the shared one
    examples, digest = approved_snapshot(db, team=team)
    expected = os.environ.get("KBLOOP_JOB_DATASET_HASH")
    if expected and digest != expected:  # every rank must train on the same snapshot
        raise StoreError("the approved examples changed while the job started; queue it again")
    reporter.phase("preparing", dataset_hash=digest, n_examples=len(examples))
    config = TrainConfig(base=base, **(job.params.get("train") or {}))
    if config.objective != "sft" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StoreError(f"objective {config.objective} trains in one process; run the worker without --nproc")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return _train_as_helper_rank(db, config, home=home, examples=examples, should_stop=should_stop, team=team)

    def on_phase(text: str) -> None:  # "preparing data", "training", "evaluating v3", "saving"
        reporter.phase(text.split(" ")[0], detail=text, **({} if text == "training" else {"eta_s": None}))

    result = train_candidate(db, home=home, config=config, job_id=job.id, on_step=reporter.step,
                             should_stop=should_stop, on_phase=on_phase, team=team)
    adapter, verdict = result.adapter, result.verdict
    from finetune.registry.folders import read_metadata

    return ChildResult(
        start=read_metadata(Path(adapter.path)).get("start"),  # continued from the active adapter, or why not
        status=SUCCEEDED, version=adapter.version, passed=bool(verdict.passed),
        reasons=list(verdict.reasons), table=verdict.table, metrics=adapter.metrics,
        active_version=result.active.version if result.active else None,
        dataset_hash=adapter.dataset_hash or digest, n_examples=adapter.dataset_size or len(examples),
    )


def _train_as_helper_rank(db, config, *, home: Path, examples, should_stop, team: str | None = None) -> ChildResult:
    """Ranks other than 0 under accelerate/torchrun: the same training split into a scratch folder, so that
    DDP's collectives line up with rank 0's train_candidate; rank 0 alone evaluates and registers."""
    import shutil
    import tempfile
    from dataclasses import replace

    from finetune.model.loading import is_tiny_base, resolve_base
    from finetune.registry.continuing import plan_continuation, train_continued
    from finetune.registry.split import training_split
    from finetune.training.config import prompt_passages
    from finetune.training.trainer import train_adapter
    from store.adapters import serving_adapter

    base_path = resolve_base(config.base, home=home, db=db)
    tiny = is_tiny_base(base_path)
    config = replace(config, k_passages=prompt_passages(config, tiny=tiny))
    train = training_split(db, k_passages=config.k_passages, team=team).train  # rank 0's split, corrections included
    # The same start as rank 0 (continued or from the base), or the collectives would not line up.
    plan = plan_continuation(db, config, tiny=tiny, active=serving_adapter(db, team), train=train)
    config = replace(config, base=base_path)
    scratch = Path(tempfile.mkdtemp(prefix=f"kbloop-rank{os.environ.get('RANK')}-"))
    try:
        continued = None
        if plan.previous is not None:
            continued = train_continued(config, plan, scratch / "continued", tiny=tiny, on_step=None,
                                        should_stop=should_stop)
        if continued is None or not continued.stopped_early:  # rank 0 falls back to the base the same way
            train_adapter(config, list(train), scratch / "base", should_stop=should_stop)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ChildResult(status=SUCCEEDED, extra={"rank": int(os.environ.get("RANK", "0"))})


RUNNERS: dict[str, Runner] = {"retrain": run_retrain}


def _cancelled_exceptions() -> tuple[type[BaseException], ...]:
    try:
        from finetune.training.trainer import TrainingCancelled
    except ImportError:
        return (JobCancelled,)
    return (JobCancelled, TrainingCancelled)


def main(argv: list[str] | None = None, *, runners: dict[str, Runner] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--exec"]:
        # `--exec LAUNCHER …`: the launcher (torchrun, accelerate) inherits the death signal through
        # execve, so a killed worker takes the launcher, and the launcher its ranks.
        die_with_parent()
        os.execvp(argv[1], argv[1:])
    parser = argparse.ArgumentParser(prog="python -m finetune.jobs.child", description=__doc__.split("\n\n")[0])
    parser.add_argument("job_id", type=int)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--worker-id", required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    runners = runners or RUNNERS
    is_main = int(os.environ.get("RANK", "0")) == 0

    db = open_db(args.db)
    job = get_job(db, args.job_id)
    if job.status != "running" or job.worker_id != args.worker_id:
        print(f"job {job.id} is {job.status} for {job.worker_id}, not running for {args.worker_id}", file=sys.stderr)
        return EXIT_NOT_OURS
    stop = StopSignal(db, job.id, args.worker_id)
    stop.install()
    reporter = ProgressReporter(db, job, is_main=is_main)
    started = _dt.datetime.now(_dt.timezone.utc)
    print(f"{now()} job {job.id} ({job.kind}) started, pid {os.getpid()}, rank {os.environ.get('RANK', '0')}",
          flush=True)

    def finish(result: ChildResult, code: int) -> int:
        if is_main:
            elapsed = round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1)
            write_child_result(args.home, job.id, dataclasses.replace(result, elapsed_s=elapsed))
        print(f"{now()} job {job.id}: {result.status} {result.error or ''}", flush=True)
        return code

    runner = runners.get(job.kind)
    if runner is None:
        return finish(ChildResult(status=FAILED, error=f"no runner for job kind {job.kind!r}"), EXIT_FAILED)
    try:
        result = runner(db, job, home=args.home, base=args.base, reporter=reporter, should_stop=stop)
    except _cancelled_exceptions():
        return finish(ChildResult(status=CANCELLED, error="cancelled before the candidate was registered"),
                      EXIT_CANCELLED)
    except KbloopError as exc:  # a user-fixable problem: say it in one line
        return finish(ChildResult(status=FAILED, error=str(exc)), EXIT_FAILED)
    except Exception as exc:
        traceback.print_exc()
        return finish(ChildResult(status=FAILED, error=f"{type(exc).__name__}: {exc}"), EXIT_FAILED)
    return finish(result, EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
