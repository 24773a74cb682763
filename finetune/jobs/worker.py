"""The worker that runs retraining jobs (the queue's front door, `request_retrain`, is finetune.jobs.queue).

A job is a row in the store's `jobs` table. A `Worker` claims one atomically, heartbeats while it runs,
and runs the training in a CHILD PROCESS (`python -m finetune.jobs.child JOB_ID …`, or the same module under
`accelerate launch` / `torchrun` with N processes: finetune.jobs.launch), so that a crash or an out-of-memory kill ends the job,
not the worker, the bot or the playground that share its process.

Who writes what:
- the worker (parent) owns the job's status and heartbeat: it claims, heartbeats, cancels, promotes and
  finishes; a worker that dies stops heartbeating, and the next worker marks its job failed. On the same
  host the next worker asks the process instead (pid and start time, from the worker id:
  finetune.jobs.worker_ids): a live worker's job is never failed, however late its heartbeat, and a dead one's is
  failed at once;
- notices (JobNotifier: Slack) go out from a thread of their own through a bounded queue, so a slow or
  hung Slack never delays the heartbeat (finetune.jobs.notices);
- the child writes progress (`progress` JSON: phase, step, total, loss, eta_s) and the training log
  (`train_steps`), trains and registers a *candidate* (finetune.registry.candidates.train_candidate), and leaves its
  result in `$KBLOOP_HOME/jobs/<id>/outcome.json`;
- the worker then promotes the candidate when the gate passed and reports the outcome (JobNotifier).

What they say to each other (JobProgress, ChildResult, JobOutcome, the exit codes, job_dir) is
finetune.jobs.protocol; this module and the child (finetune.jobs.child) import it, not each other.

Assumptions: one training job runs at a time across every worker of a database (claim_next_job
refuses to start a second); the child dies with its worker (PR_SET_PDEATHSIG), and a candidate is
promoted only by a worker that still owns the job, so nothing half-trained or abandoned is ever served.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.jobs.launch import LAUNCHERS, child_command, child_failure, signal_group
from finetune.jobs.notices import JobNotifier, NoticeSender
from finetune.jobs.protocol import (
    CANCELLED,
    CANDIDATE,
    DONE,
    EXIT_OK,
    PROMOTED,
    SUCCEEDED,
    UNCHANGED,
    ChildResult,
    JobOutcome,
    job_dir,
    read_child_result,
)
from finetune.jobs.queue import RETRAIN
from finetune.jobs.worker_ids import default_worker_id, owner_alive_here
from store import ConfigError, StoreError, open_db
from store.jobs import (
    Job,
    abandon_job,
    claim_next_job,
    fail_stale_jobs,
    finish_job,
    get_job,
    heartbeat,
    running_jobs,
    set_job_pid,
)

log = logging.getLogger("kbloop.jobs")


@dataclass(frozen=True)
class WorkerConfig:
    """How the worker runs jobs. Built once from settings/CLI options (kbloop.cli.worker.worker_config)."""

    base_model: str = "tiny"
    # The worker refreshes its job's heartbeat this often; a job whose heartbeat is older than
    # `stale_after_s` belongs to a dead worker and is marked failed by the next worker that looks.
    heartbeat_interval_s: float = 5.0
    stale_after_s: float = 60.0
    poll_interval_s: float = 2.0  # how often an idle worker looks for a queued job
    cancel_grace_s: float = 15.0  # SIGTERM, then SIGKILL after this long
    progress_notify_interval_s: float = 30.0  # at most one progress notice per this many seconds
    # Notices wait in a queue of at most this many (older progress notices give way to newer ones) …
    max_pending_notices: int = 64
    # … and a worker that is done (run_once returns, run_forever stops) waits this long for them to go out.
    notice_flush_s: float = 30.0
    # Multi-GPU: run the child under `accelerate launch` or `torchrun` with `nproc` processes.
    launcher: str = "python"
    nproc: int = 1
    # The child's command before its arguments; None = this interpreter running finetune.jobs.child.
    child_command: tuple[str, ...] | None = None
    worker_id: str = field(default_factory=default_worker_id)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"worker launcher must be one of {', '.join(LAUNCHERS)}, not {self.launcher!r}")
        if self.nproc < 1:
            raise ConfigError(f"worker nproc must be at least 1, not {self.nproc}")
        if self.launcher == "python" and self.nproc != 1:
            raise ConfigError("worker nproc > 1 needs launcher accelerate or torchrun")
        if self.max_pending_notices < 1:
            raise ConfigError(f"worker max_pending_notices must be at least 1, not {self.max_pending_notices}")
        if self.heartbeat_interval_s <= 0 or self.stale_after_s <= 2 * self.heartbeat_interval_s:
            raise ConfigError(
                f"stale_after_s ({self.stale_after_s}) must be more than twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or live jobs would be declared dead"
            )


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------

class Worker:
    """Claims queued jobs one at a time and runs each in a child process.

    `run_once()` recovers jobs of dead workers, then runs at most one job to its end; `run_forever(stop)`
    repeats until `stop` is set (`kbloop worker`, or a thread inside `kbloop serve`).
    """

    def __init__(self, *, db_path: Path, home: Path, config: WorkerConfig | None = None,
                 notifier: JobNotifier | None = None):
        self.db_path = Path(db_path)
        self.home = Path(home)
        self.config = config or WorkerConfig()
        self.notifier = notifier
        self._notices = (NoticeSender(notifier, max_pending=self.config.max_pending_notices)
                         if notifier is not None else None)
        self._db = None
        self._db_thread: int | None = None
        self._dataset_hash: str | None = None  # the snapshot every rank of a launcher must train on

    @property
    def db(self):
        # sqlite3 connections are per thread: the worker opens its own in the thread that runs it.
        if self._db is None or self._db_thread != threading.get_ident():
            self._db = open_db(self.db_path)
            self._db_thread = threading.get_ident()
        return self._db

    # -- loop ------------------------------------------------------------------------------------
    def run_forever(self, stop_event: threading.Event) -> None:
        log.info("worker %s watching %s", self.config.worker_id, self.db_path)
        try:
            while not stop_event.is_set():
                try:
                    job = self._run_one(stop_event)
                except Exception:  # a broken job must not end the loop that serves the next one
                    log.exception("worker %s: job run failed", self.config.worker_id)
                    job = None
                if job is None:
                    stop_event.wait(self.config.poll_interval_s)
        finally:
            self._flush_before_leaving()

    def run_once(self, *, stop_event: threading.Event | None = None) -> Job | None:
        """Recover abandoned jobs, then claim and run one queued job. Returns the finished job, or None.

        Waits (up to `notice_flush_s`) for the job's notices to go out: `kbloop worker --once` exits next."""
        try:
            return self._run_one(stop_event or threading.Event())
        finally:
            self._flush_before_leaving()

    def flush_notices(self, timeout: float) -> bool:
        """Wait until every queued notice was handed to the notifier; False if `timeout` passed first."""
        return self._notices.flush(timeout) if self._notices is not None else True

    def pending_notices(self) -> int:
        return self._notices.pending() if self._notices is not None else 0

    def _flush_before_leaving(self) -> None:
        if not self.flush_notices(self.config.notice_flush_s):
            log.warning("worker %s: %d job notice(s) not delivered within %.0fs (is Slack reachable?)",
                        self.config.worker_id, self.pending_notices(), self.config.notice_flush_s)

    def _run_one(self, stop_event: threading.Event) -> Job | None:
        self.recover_abandoned()
        job = claim_next_job(self.db, worker_id=self.config.worker_id, pid=os.getpid())
        if job is None:
            return None
        log.info("worker %s claimed job %s (%s)", self.config.worker_id, job.id, job.kind)
        self._notify("job_started", job)
        try:
            outcome = self._run(job, stop_event)
        except Exception as exc:  # the worker's own failure: the job says why, the worker lives on
            log.exception("job %s failed in the worker", job.id)
            outcome = JobOutcome.failed(f"the worker failed while running the job: {exc}")
        return self._finish(job, outcome)

    def recover_abandoned(self) -> list[Job]:
        """Fail running jobs whose worker is gone: a dead local process at once, a worker on another host
        once its heartbeat is stale. A job whose worker runs on this host is never failed here: a heartbeat
        can be late while the worker lives, and then two workers would act on one job."""
        failed = []
        host = socket.gethostname()
        for job in running_jobs(self.db):
            if job.worker_id != self.config.worker_id and owner_alive_here(job.worker_id, host=host) is False:
                w_pid = job.worker_id.partition(":")[2].partition(":")[0].partition("@")[0]
                gone = abandon_job(self.db, job.id, reason=(
                    f"worker {job.worker_id} died while running the job (process {w_pid} is gone); "
                    "nothing from it was promoted"))
                if gone:
                    failed.append(gone)
        failed += fail_stale_jobs(self.db, stale_after_s=self.config.stale_after_s,
                                  owner_alive=lambda worker_id: owner_alive_here(worker_id, host=host) is True)
        for job in failed:
            log.warning("job %s marked failed: %s", job.id, job.error)
            self._notify("job_finished", job, JobOutcome.failed(job.error or "the worker stopped").to_dict())
        return failed

    # -- one job -----------------------------------------------------------------------------------
    def _run(self, job: Job, stop_event: threading.Event) -> JobOutcome:
        outcome = self._before_child(job)
        if outcome is not None:
            return outcome
        self._dataset_hash = None
        if job.kind == RETRAIN and self.config.launcher != "python":
            from finetune.model.loading import resolve_base
            from store.examples import approved_snapshot

            # every rank checks it trains on this
            self._dataset_hash = approved_snapshot(self.db, team=job.params.get("team"))[1]
            resolve_base(self.config.base_model, home=self.home, db=self.db)  # build `tiny` once, not per rank
        workdir = job_dir(self.home, job.id)
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        rc, how = self._supervise(job, workdir, stop_event)
        return self._after_child(job, workdir, rc, how)

    def _before_child(self, job: Job) -> JobOutcome | None:
        """Retraining: refuse an empty dataset, skip an unchanged one (unless forced)."""
        if job.kind != RETRAIN:
            return None
        from store.adapters import active_adapter
        from store.examples import approved_snapshot

        team = job.params.get("team")  # a team's adapter: the shared and the team's examples (store.teams)
        examples, digest = approved_snapshot(self.db, team=team)
        if not examples:
            return JobOutcome.failed("there are no approved examples to train on; approve some with "
                                     "`kbloop review` or the playground first")
        from finetune.registry.promotion import dataset_unchanged

        # A preference run (kto, dpo) learns from the votes, not the approved examples: their hash says nothing.
        preference = (job.params.get("train") or {}).get("objective", "sft") != "sft"
        if not job.params.get("force") and not preference and dataset_unchanged(self.db, team):
            active = active_adapter(self.db, team)
            msg = (f"the approved examples ({len(examples)}, hash {digest}) have not changed since the active "
                   f"adapter {active.version if active else ''} was trained; nothing to do "
                   "(retrain with force to train anyway)")
            return JobOutcome(status=SUCCEEDED, outcome=UNCHANGED, reasons=[msg], message=msg,
                              active_version=active.version if active else None, dataset_hash=digest,
                              n_examples=len(examples))
        return None

    def child_command(self, job: Job) -> list[str]:
        return child_command(job.id, db_path=self.db_path, home=self.home, config=self.config)

    def _supervise(self, job: Job, workdir: Path, stop_event: threading.Event) -> tuple[int, str]:
        """Run the child to its end: heartbeat, pass progress on, cancel (TERM, then KILL) when asked."""
        env = dict(os.environ, KBLOOP_JOB_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
        if self._dataset_hash:
            env["KBLOOP_JOB_DATASET_HASH"] = self._dataset_hash
        # The child must import this checkout's packages whatever the working directory.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(workdir / "child.log", "ab") as logf:
            proc = subprocess.Popen(self.child_command(job), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            set_job_pid(self.db, job.id, proc.pid)
            return self._watch(job, proc, stop_event)
        except BaseException:  # the worker itself failed (or was interrupted): never leave the child behind
            signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise

    def _watch(self, job: Job, proc: subprocess.Popen, stop_event: threading.Event) -> tuple[int, str]:
        cfg = self.config
        how = "exited"
        term_at: float | None = None
        next_beat = 0.0
        last_notice = time.monotonic()
        last_progress: dict = {}
        while True:
            rc = proc.poll()
            if rc is not None:
                return rc, how
            t = time.monotonic()
            if t >= next_beat:
                next_beat = t + cfg.heartbeat_interval_s
                if heartbeat(self.db, job.id) and term_at is None:
                    how, term_at = "cancelled", t
                    log.info("job %s: cancellation requested, stopping the child", job.id)
                    signal_group(proc, signal.SIGTERM)
                progress = get_job(self.db, job.id).progress
                if progress and progress != last_progress and t - last_notice >= cfg.progress_notify_interval_s:
                    last_progress, last_notice = progress, t
                    self._notify("job_progress", job, progress)
            if stop_event.is_set() and term_at is None:
                how, term_at = "stopped", t
                signal_group(proc, signal.SIGTERM)
            if term_at is not None and t - term_at > cfg.cancel_grace_s:
                signal_group(proc, signal.SIGKILL)
                term_at = float("inf")  # killed once; wait for the exit
            time.sleep(min(0.2, cfg.heartbeat_interval_s))

    def _after_child(self, job: Job, workdir: Path, rc: int, how: str) -> JobOutcome:
        child = read_child_result(workdir)
        if how == "cancelled":
            version = child.version if child else None
            msg = "cancelled by an admin"
            if version:
                msg += f"; candidate {version} was finished but is not promoted"
            return JobOutcome(status=CANCELLED, outcome=CANCELLED, message=msg, reasons=[msg], version=version,
                              error=msg)
        if how == "stopped":
            return JobOutcome.failed("the worker was stopped while the job ran; nothing was promoted")
        if rc != EXIT_OK or child is None or child.status != SUCCEEDED:
            return JobOutcome.failed(child_failure(rc, child, workdir))
        if job.kind != RETRAIN:
            return JobOutcome.from_child(child, status=SUCCEEDED, outcome=DONE)
        return self._conclude_retrain(job, child)

    def _conclude_retrain(self, job: Job, trained: ChildResult) -> JobOutcome:
        """Promote the candidate when the gate passed; otherwise keep it as a candidate, saying why."""
        from store.adapters import set_adapter_note

        version = trained.version
        outcome = JobOutcome.from_child(trained, status=SUCCEEDED)
        # Only a worker that still owns the job may promote (a stale-marked job was given up).
        current = get_job(self.db, job.id)
        if current.status != "running" or current.worker_id != self.config.worker_id:
            return JobOutcome.failed(
                f"the job was taken from this worker ({current.status}); candidate {version} is not promoted")
        if trained.passed:
            from finetune.registry.promotion import promote

            try:
                promote(self.db, version, actor=f"job {job.id} for {job.requester or 'unknown'}")
            except StoreError as exc:
                set_adapter_note(self.db, version, f"not promoted: {exc}")
                return outcome.replace(outcome=CANDIDATE, promoted=False, reasons=[str(exc)],
                                       message=f"{version} trained but not promoted: {exc}")
            n_examples = trained.n_examples if trained.n_examples is not None else "?"
            return outcome.replace(outcome=PROMOTED, promoted=True,
                                   message=f"{version} trained on {n_examples} examples and promoted: "
                                           "the bot answers with it now")
        reasons = trained.reasons or ["the gate did not pass"]
        set_adapter_note(self.db, version, "not promoted: " + "; ".join(reasons))
        return outcome.replace(outcome=CANDIDATE, promoted=False,
                               message=f"{version} trained but not promoted: {'; '.join(reasons)}. "
                                       f"{trained.active_version or 'The current model'} stays active.")

    def _finish(self, job: Job, outcome: JobOutcome) -> Job:
        status = outcome.status
        result = {k: v for k, v in outcome.to_dict().items() if k != "error"}
        current = get_job(self.db, job.id)
        if current.status == "running":
            job = finish_job(self.db, job.id, status=status, result=result,
                             error=outcome.error if status != SUCCEEDED else None)
        else:  # already ended elsewhere (marked stale): keep that verdict
            job = current
            outcome = outcome.replace(status=current.status, error=current.error)
        log.info("job %s %s: %s", job.id, job.status, outcome.message or outcome.error)
        self._notify("job_finished", job, outcome.to_dict())
        return job

    def _notify(self, method: str, job: Job, *args) -> None:
        """Queue a notice; never waits for the notifier (a hung Slack must not stop the heartbeat)."""
        if self._notices is not None:
            self._notices.send(method, job, *args)


