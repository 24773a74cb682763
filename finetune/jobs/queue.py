"""Asking for a retraining job, and saying how one is doing: the queue's front door (`request_retrain`, used
by Slack's /kb-retrain, the playground and `kbloop train --queue`) and one-line descriptions for people
(`describe_job`, `describe_progress`). The worker that runs the jobs is finetune.jobs.worker.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt

from finetune.jobs.protocol import JobProgress
from store import ConfigError
from store.jobs import Job, enqueue_job
from store.teams import require_team

RETRAIN = "retrain"


def request_retrain(db, *, requester: str, reply_channel: str | None = None, reply_thread_ts: str | None = None,
                    params: dict | None = None) -> Job:
    """Queue a retraining job. Raises store.jobs.JobAlreadyActive (with `.job`) while one is queued or
    running; `describe_job(exc.job)` says which and when it should end.

    `params`: {"force": true} trains even if the approved examples did not change; {"train": {...}}
    overrides training settings (finetune.training.config.TrainConfig field names); {"team": NAME} trains that
    team's adapter (store.teams: the shared and the team's examples; the team must exist).
    """
    params = dict(params or {})
    unknown = set(params) - {"force", "train", "team"}
    if unknown:
        raise ConfigError(f"unknown retrain parameter(s): {', '.join(sorted(unknown))} (known: force, train, team)")
    if params.get("team") is not None:
        require_team(db, params["team"])
    if not isinstance(params.get("train", {}), dict):
        raise ConfigError("retrain parameter `train` must be an object of training settings")
    _check_train_overrides(params.get("train") or {})
    return enqueue_job(db, kind=RETRAIN, requester=requester, params=params, reply_channel=reply_channel,
                       reply_thread_ts=reply_thread_ts, exclusive=True)


def _check_train_overrides(overrides: dict) -> None:
    if not overrides:
        return
    try:
        from finetune.training.config import TrainConfig, check_settings
    except ImportError:  # training not installed in this checkout: the child will say so
        return
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"unknown training setting(s): {', '.join(bad)}")
    check_settings(TrainConfig(**overrides))  # the rules `kbloop train` and /kb-retrain apply, before queueing


def job_eta_s(job: Job, *, now: _dt.datetime | None = None) -> float | None:
    """Seconds until the job is expected to end, from the child's last progress report; None if unknown."""
    return _eta_from_progress(job.progress, now=now) if job.status == "running" else None


def _eta_from_progress(progress: dict | JobProgress, *, now: _dt.datetime | None = None) -> float | None:
    p = progress if isinstance(progress, JobProgress) else JobProgress.from_dict(progress)
    eta = p.eta_s
    if eta is None:
        return None
    stamp = p.updated_at
    if stamp:
        now = now or _dt.datetime.now(_dt.timezone.utc)
        eta -= max(0.0, (now - _dt.datetime.fromisoformat(stamp)).total_seconds())
    return max(0.0, float(eta))


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d}s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def describe_job(job: Job) -> str:
    """One line for people: 'job 7 (requested by U1) is running: training step 12/40, loss 1.234, about 2 min left'."""
    who = f" (requested by {job.requester})" if job.requester else ""
    if (job.params or {}).get("team"):
        who += f" for team {job.params['team']}"
    if job.status == "queued":
        return f"job {job.id}{who} is queued"
    if job.status != "running":
        tail = f": {job.error}" if job.error else ""
        return f"job {job.id}{who} {job.status}{tail}"
    return f"job {job.id}{who} is running: {describe_progress(job.progress)}"


def describe_progress(progress: dict | JobProgress) -> str:
    """'training step 12/40, loss 1.234; about 2 min 05s left'. `progress`: a JobProgress or its JSON."""
    p = progress if isinstance(progress, JobProgress) else JobProgress.from_dict(progress)
    doing = p.detail or p.phase
    if p.total and p.phase == "training":
        doing += f" step {p.step or 0}/{p.total}"
    if p.loss is not None:
        doing += f", loss {p.loss:.3f}"
    eta = _eta_from_progress(p)
    return doing + (f"; about {format_duration(eta)} left" if eta is not None else "; end time not known yet")
