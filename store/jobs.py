"""The job queue (`jobs`) and the training log (`train_steps`).

A job is claimed atomically by one worker; a running job heartbeats; a job whose heartbeat stops
(its worker died) is marked failed by the next worker, unless that worker's process is known to be alive
(`fail_stale_jobs(owner_alive=…)`). Only one training job runs at a time.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from dataclasses import dataclass

import sqlite_utils

from store.db import StoreError, write_transaction
from store.text import now

ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    status: str
    requester: str | None
    reply_channel: str | None
    reply_thread_ts: str | None
    params: dict
    progress: dict
    result: dict
    error: str | None
    worker_id: str | None
    pid: int | None
    cancel_requested: bool
    created_at: str
    started_at: str | None
    heartbeat_at: str | None
    finished_at: str | None


def _job(row: dict) -> Job:
    data = {k: row[k] for k in Job.__dataclass_fields__}
    for key in ("params", "progress", "result"):
        data[key] = json.loads(row[key] or "{}")
    data["cancel_requested"] = bool(row["cancel_requested"])
    return Job(**data)


class JobAlreadyActive(StoreError):
    def __init__(self, job: Job):
        self.job = job
        super().__init__(f"job {job.id} is already {job.status}")


def enqueue_job(
    db: sqlite_utils.Database, *, kind: str = "retrain", requester: str | None = None, params: dict | None = None,
    reply_channel: str | None = None, reply_thread_ts: str | None = None, exclusive: bool = True,
) -> Job:
    """Queue a job. With `exclusive`, refuse (JobAlreadyActive) while another job of the kind is queued or running."""
    with write_transaction(db):
        if exclusive:
            row = db.execute(
                "SELECT * FROM jobs WHERE kind = ? AND status IN ('queued','running') ORDER BY id LIMIT 1", [kind]
            ).fetchone()
            if row:
                raise JobAlreadyActive(get_job(db, row[0]))
        cur = db.execute(
            """INSERT INTO jobs (kind, status, requester, reply_channel, reply_thread_ts, params, progress, result,
               cancel_requested, created_at) VALUES (?, 'queued', ?, ?, ?, ?, '{}', '{}', 0, ?)""",
            [kind, requester, reply_channel, reply_thread_ts, json.dumps(params or {}, ensure_ascii=False), now()],
        )
        job_id = cur.lastrowid
    return get_job(db, job_id)


def claim_next_job(db: sqlite_utils.Database, *, worker_id: str, pid: int | None = None) -> Job | None:
    """Atomically take the oldest queued job, unless a job is already running (one at a time)."""
    with write_transaction(db):
        if db.execute("SELECT 1 FROM jobs WHERE status = 'running'").fetchone():
            return None
        stamp = now()
        row = db.execute(
            """UPDATE jobs SET status = 'running', worker_id = ?, pid = ?, started_at = ?, heartbeat_at = ?
               WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1)
               RETURNING id""",
            [worker_id, pid, stamp, stamp],
        ).fetchone()
    return get_job(db, row[0]) if row else None


def heartbeat(db: sqlite_utils.Database, job_id: int, *, progress: dict | None = None) -> bool:
    """Refresh the heartbeat (and progress). Returns True if cancellation was requested."""
    with write_transaction(db):
        if progress is not None:
            db.execute("UPDATE jobs SET heartbeat_at = ?, progress = ? WHERE id = ?",
                       [now(), json.dumps(progress, ensure_ascii=False), job_id])
        else:
            db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", [now(), job_id])
        row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", [job_id]).fetchone()
    return bool(row and row[0])


def finish_job(db: sqlite_utils.Database, job_id: int, *, status: str, result: dict | None = None,
               error: str | None = None) -> Job:
    if status not in ("succeeded", "failed", "cancelled"):
        raise StoreError(f"a job finishes as succeeded, failed or cancelled, not {status!r}")
    with write_transaction(db):
        db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ? WHERE id = ?",
                   [status, json.dumps(result or {}, ensure_ascii=False), error, now(), job_id])
    return get_job(db, job_id)


def request_cancel(db: sqlite_utils.Database, job_id: int) -> Job:
    """Queued jobs are cancelled at once; a running job is asked to stop (its worker ends it)."""
    with write_transaction(db):
        job = get_job(db, job_id)
        if job.status == "queued":
            db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, error = 'cancelled before it started' "
                       "WHERE id = ?", [now(), job_id])
        elif job.status == "running":
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", [job_id])
        else:
            raise StoreError(f"job {job_id} already {job.status}")
    return get_job(db, job_id)


def fail_stale_jobs(db: sqlite_utils.Database, *, stale_after_s: float,
                    owner_alive: Callable[[str | None], bool] | None = None) -> list[Job]:
    """Mark running jobs whose heartbeat stopped as failed, with the reason.

    `owner_alive(worker_id)`: True when the job's worker is known to be alive (its process runs on this
    host). Such a job is left running however old its heartbeat: a late heartbeat (a slow disk, a busy
    machine) is not a dead worker, and failing a live job would have two workers act on it.
    """
    cutoff = (_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=stale_after_s)).isoformat(timespec="microseconds")
    failed = []
    with write_transaction(db):
        rows = db.execute("SELECT id, worker_id, heartbeat_at FROM jobs WHERE status = 'running' AND heartbeat_at < ?",
                          [cutoff]).fetchall()
        for job_id, worker, beat in rows:
            if owner_alive is not None and owner_alive(worker):
                continue
            db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                [now(), f"worker {worker} stopped responding (last heartbeat {beat}); the job was abandoned", job_id],
            )
            failed.append(job_id)
    return [get_job(db, job_id) for job_id in failed]


def get_job(db: sqlite_utils.Database, job_id: int) -> Job:
    rows = list(db["jobs"].rows_where("id = ?", [job_id]))
    if not rows:
        raise StoreError(f"no job with id {job_id}")
    return _job(rows[0])


def list_jobs(db: sqlite_utils.Database, *, status: str | None = None, limit: int = 50) -> list[Job]:
    if status:
        rows = db.query("SELECT * FROM jobs WHERE status = ? ORDER BY id DESC LIMIT ?", [status, limit])
    else:
        rows = db.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", [limit])
    return [_job(r) for r in rows]


def active_jobs(db: sqlite_utils.Database) -> list[Job]:
    return [_job(r) for r in db.query("SELECT * FROM jobs WHERE status IN ('queued','running') ORDER BY id")]


def log_train_step(db: sqlite_utils.Database, *, run: str, step: int, loss: float | None, epoch: float | None = None,
                   learning_rate: float | None = None, job_id: int | None = None) -> None:
    with write_transaction(db):
        db.execute(
            "INSERT INTO train_steps (run, job_id, step, epoch, loss, learning_rate, created_at) VALUES (?,?,?,?,?,?,?)",
            [run, job_id, step, epoch, loss, learning_rate, now()],
        )


def train_steps(db: sqlite_utils.Database, run: str) -> list[dict]:
    return [dict(r) for r in db.query("SELECT step, epoch, loss, learning_rate, created_at FROM train_steps "
                                      "WHERE run = ? ORDER BY step", [run])]


def set_job_progress(db: sqlite_utils.Database, job_id: int, progress: dict) -> None:
    """Progress written by the job's child process; the heartbeat stays the worker's (a live child of a
    dead worker must not look alive)."""
    with write_transaction(db):
        db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'",
                   [json.dumps(progress, ensure_ascii=False), job_id])


def set_job_pid(db: sqlite_utils.Database, job_id: int, pid: int) -> None:
    """The pid of the process running the job (the worker's child), for operators and `kbloop jobs`."""
    with write_transaction(db):
        db.execute("UPDATE jobs SET pid = ? WHERE id = ?", [pid, job_id])


def abandon_job(db: sqlite_utils.Database, job_id: int, *, reason: str) -> Job | None:
    """Mark a running job failed with `reason`, unless it already ended. Returns the job if it was changed."""
    with write_transaction(db):
        cur = db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ? AND status = 'running'",
                         [now(), reason, job_id])
        changed = cur.rowcount
    return get_job(db, job_id) if changed else None


def running_jobs(db: sqlite_utils.Database) -> list[Job]:
    return [_job(r) for r in db.query("SELECT * FROM jobs WHERE status = 'running' ORDER BY id")]
