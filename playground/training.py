"""Training tab handlers (admins): retrain (on the approved examples, or on the votes: objective kto / dpo), follow a job's progress and loss, promote and roll back.

Each team (store.teams) has its own adapter: retraining and rolling back act on the shared adapter, or on the
team chosen (`team`), as Slack's `/kb-retrain team=NAME` and `/kb-rollback team=NAME` do; promoting a version
acts on the version's own team.

Every action checks `require_admin` here, server-side; the tab is only hidden from others as a courtesy.
Jobs go through the same queue as Slack's /kb-retrain (finetune.jobs.queue.request_retrain); promotion goes
through the registry's gate (finetune.registry.promotion.promote), so the verdict shown is the one that decided.
"""

from __future__ import annotations

import pandas as pd
import sqlite_utils

from finetune.jobs.protocol import JobProgress
from finetune.jobs.queue import describe_job, request_retrain
from finetune.registry.folders import adapter_objective
from finetune.registry.promotion import promote as registry_promote
from finetune.registry.promotion import rollback as registry_rollback
from finetune.registry.promotion import stored_verdict
from playground.auth import AdminRequired, Viewer, require_admin
from playground.review import Outcome
from store import KbloopError, StoreError
from store.adapters import active_adapter, get_adapter, list_adapters
from store.audit import record_audit
from store.jobs import JobAlreadyActive, active_jobs, get_job, list_jobs, request_cancel, train_steps
from store.teams import list_teams, require_team

JOB_COLUMNS = ["id", "status", "requester", "phase", "step", "loss", "created_at", "finished_at", "error"]
ADAPTER_COLUMNS = ["version", "team", "status", "method", "objective", "rank", "examples", "held-out loss", "exact match", "token F1",
                   "stop rate", "created_at"]


def _actor(viewer: Viewer) -> str:
    return f"playground:{viewer.name}"


def start_retrain(db: sqlite_utils.Database, viewer: Viewer, *, force: bool = False, overrides: dict | None = None,
                  team: str | None = None) -> Outcome:
    """Queue a retraining job for the shared adapter, or `team`'s (refused while one is queued or running: it
    says which; refused for a team that does not exist)."""
    try:
        require_admin(db, viewer, "start_retraining")
        params: dict = {"force": True} if force else {}
        if team:
            params["team"] = team
        train = {k: v for k, v in (overrides or {}).items() if v not in (None, "")}
        if train:
            params["train"] = train
        job = request_retrain(db, requester=_actor(viewer), params=params)
    except JobAlreadyActive as exc:
        return Outcome(False, f"Not queued: {describe_job(exc.job)}.")
    except KbloopError as exc:  # not an admin, a bad setting, a database problem
        return Outcome(False, f"Not queued: {exc}")

    record_audit(db, actor=_actor(viewer), action="retrain", allowed=True, target=str(job.id), detail=params)
    return Outcome(True, f"Job {job.id} queued{f' for team {team}' if team else ''}; a worker (`kbloop worker` or `kbloop serve`) will run it.")


def cancel_job(db: sqlite_utils.Database, viewer: Viewer, job_id: int | str | None = None) -> Outcome:
    try:
        require_admin(db, viewer, "cancel_a_job")
        if job_id in (None, ""):
            jobs = active_jobs(db)
            if not jobs:
                return Outcome(False, "No job is queued or running.")
            job_id = jobs[0].id
        job = request_cancel(db, int(job_id))
    except (AdminRequired, StoreError, ValueError) as exc:
        return Outcome(False, f"Not cancelled: {exc}")

    record_audit(db, actor=_actor(viewer), action="cancel", allowed=True, target=str(job.id))
    state = "cancelled" if job.status == "cancelled" else "asked to stop"
    return Outcome(True, f"Job {job.id} {state}.")


def jobs_frame(db: sqlite_utils.Database, *, limit: int = 20) -> pd.DataFrame:
    rows = []
    for j in list_jobs(db, limit=limit):
        p = JobProgress.from_dict(j.progress) if j.progress else None
        rows.append({"id": j.id, "status": j.status, "requester": j.requester or "", "phase": p.phase if p else "",
                     "step": f"{p.step}/{p.total}" if p and p.total else "",
                     "loss": round(p.loss, 4) if p and isinstance(p.loss, (int, float)) else None,
                     "created_at": j.created_at[:19], "finished_at": (j.finished_at or "")[:19],
                     "error": j.error or ""})
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def current_job_id(db: sqlite_utils.Database) -> int | None:
    """The job to follow: the running / queued one, else the most recent."""
    jobs = active_jobs(db) or list_jobs(db, limit=1)
    return jobs[0].id if jobs else None


def progress_markdown(db: sqlite_utils.Database, job_id: int | None) -> str:
    if job_id is None:
        return "No training job yet."
    job = get_job(db, job_id)
    line = describe_job(job).capitalize() + "."
    if job.status == "succeeded" and job.result:
        r = job.result
        line += f" Outcome: {r.get('outcome', '')} {r.get('version', '') or ''}".rstrip() + "."
        if r.get("reasons"):
            line += " " + "; ".join(r["reasons"])
    return line


def progress_fraction(db: sqlite_utils.Database, job_id: int | None) -> float:
    if job_id is None:
        return 0.0

    p = JobProgress.from_dict(get_job(db, job_id).progress)
    return min(1.0, (p.step or 0) / p.total) if p.total else 0.0


def loss_frame(db: sqlite_utils.Database, job_id: int | None) -> pd.DataFrame:
    """The job's training loss per step (the training child logs it under run "job-<id>")."""
    rows = [r for r in train_steps(db, f"job-{job_id}") if r["loss"] is not None] if job_id is not None else []
    return pd.DataFrame({"step": [int(r["step"]) for r in rows], "loss": [float(r["loss"]) for r in rows]},
                        columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})


def adapters_frame(db: sqlite_utils.Database) -> pd.DataFrame:
    def pct(v):
        return round(100 * v, 1) if isinstance(v, (int, float)) else None

    rows = []
    for a in reversed(list_adapters(db)):
        m = a.metrics
        rows.append({"version": a.version, "team": a.team or "", "status": a.status, "method": a.method, "objective": adapter_objective(a),
                     "rank": a.params.get("rank", a.params.get("r", "")), "examples": a.dataset_size,
                     "held-out loss": round(m["heldout_loss"], 4) if isinstance(m.get("heldout_loss"), (int, float)) else None,
                     "exact match": pct(m.get("heldout_exact_match")), "token F1": pct(m.get("heldout_token_f1")),
                     "stop rate": pct(m.get("stop_rate")), "created_at": a.created_at[:19]})
    return pd.DataFrame(rows, columns=ADAPTER_COLUMNS)


def verdict_markdown(db: sqlite_utils.Database, version: str | None) -> str:
    """The gate's verdict for `version` against what is active now for its team, with its metric table; without a
    version, what answers: the shared adapter and each team's own."""
    if not version:
        active = active_adapter(db)
        lines = [f"Active adapter: **{active.version}**." if active
                 else "No adapter is active: the bot answers with the base model."]
        for team in list_teams(db):
            own = active_adapter(db, team.name)
            lines.append(f"- team {team.name}: **{own.version}**" if own
                         else f"- team {team.name}: the shared adapter (none of its own)")
        return "\n".join(lines)

    try:
        adapter = get_adapter(db, version)
    except StoreError as exc:
        return str(exc)
    verdict = stored_verdict(db, adapter)
    head = f"**{version}** ({adapter.status}) vs {verdict.against}: " + (
        "gate **passed**" if verdict.passed else "gate **failed**")
    reasons = "\n".join(f"- {r}" for r in verdict.reasons)
    table = f"\n\n```\n{verdict.table}\n```" if verdict.table else ""
    return f"{head}\n\n{reasons}{table}"


def promote(db: sqlite_utils.Database, viewer: Viewer, version: str | None, *, force: bool = False) -> Outcome:
    """Make `version` active if the gate passes (or an admin forces it); the bot switches without a restart."""
    try:
        require_admin(db, viewer, "promote", target=version)
        if not version:
            return Outcome(False, "Not promoted: pick a version first")
        verdict = registry_promote(db, version, actor=_actor(viewer), force=force)
    except (AdminRequired, StoreError) as exc:
        return Outcome(False, f"Not promoted: {exc}".replace("Not promoted: " + str(version) + " not promoted: ",
                                                            f"{version} not promoted: "))
    how = "gate passed" if verdict.passed else "forced past the gate: " + "; ".join(verdict.reasons)
    return Outcome(True, f"{version} is now active ({how}).")


def rollback(db: sqlite_utils.Database, viewer: Viewer, *, team: str | None = None) -> Outcome:
    """Retire the shared active adapter, or `team`'s, and go back to the one active before it."""
    try:
        require_admin(db, viewer, "roll_back")
        require_team(db, team)
        current, previous = registry_rollback(db, actor=_actor(viewer), team=team)
    except (AdminRequired, StoreError) as exc:
        return Outcome(False, f"Not rolled back: {exc}")
    fallback = "the shared adapter" if team else "the base model"
    whose = f"team {team}: " if team else ""
    return Outcome(True, f"Rolled back {whose}from {current.version} to {previous.version if previous else fallback}.")
