"""Admin and status slash commands: /kb-retrain, /kb-rollback (admins only), /kb-status (everyone).

Every admin command, allowed or refused, is written to audit_log (action "slack:/kb-retrain" …) before
anything else happens. Replies are ephemeral, through the command's response_url. /kb-retrain's options
are checked when typed, by the rules `kbloop train` applies (finetune.training.config.check_settings), so a bad
one is answered at once instead of failing the job later. /kb-status shows everyone a job's short
reason for failing; the whole error (server paths, the training log's last line) only to admins.
"""

from __future__ import annotations

import dataclasses
import logging

from slack_bolt import App

import bot.messages as messages
from bot.blocks import escape_mrkdwn
from bot.runtime import BotRuntime
from finetune.serving.protocol import AnswerEngine
from store import KbloopError, StoreError
from store.adapters import active_adapter
from store.audit import record_audit
from store.jobs import JobAlreadyActive, active_jobs, list_jobs
from store.teams import list_teams, require_team

log = logging.getLogger("kbloop.bot")

# Metrics shown by /kb-status, in this order, with the label people see.
STATUS_METRICS = (
    ("heldout_loss", "held-out loss"), ("heldout_token_f1", "token F1"), ("heldout_exact_match", "exact match"),
    ("train_reproduced", "train reproduced"), ("stop_rate", "stop rate"), ("forgetting_delta", "forgetting Δ"),
)
RETRAIN_SHORTCUTS = {"force"}
# `from=base` / `from=v3`, as `kbloop train --from`: the TrainConfig field is start_from (the default, continuing
# from the active adapter, is TrainConfig's own, so the bot, the worker and the playground share it).
# The other aliases are `kbloop train`'s option names for the same fields.
RETRAIN_ALIASES = {"from": "start_from", "lr": "learning_rate", "batch": "batch_size", "passages": "k_passages"}


def parse_retrain_args(text: str) -> dict:
    """`force method=lora rank=16 epochs=2` -> {"force": True, "train": {"method": "lora", "rank": 16, …}}.
    Names are finetune.training.config.TrainConfig fields (request_retrain checks them), and `team=NAME` (the
    team's adapter, store.teams) -> {"team": NAME}. ValueError on bad syntax."""
    params: dict = {}
    train: dict = {}
    for word in text.split():
        if word.lower() in RETRAIN_SHORTCUTS:
            params[word.lower()] = True
            continue
        key, sep, raw = word.partition("=")
        if not sep or not key or not raw:
            raise ValueError(f"`{word}` is not key=value")
        key = key.replace("-", "_")
        if key == "team":
            params["team"] = raw
            continue
        train[RETRAIN_ALIASES.get(key, key)] = raw if key == "from" else _coerce(raw)
    if train:
        params["train"] = train
    return params


def check_retrain_options(params: dict) -> None:
    """The training settings of a parsed /kb-retrain, checked by `kbloop train`'s rules. ValueError for an
    option that is not one; StoreError naming a bad value."""
    from finetune.training.config import TrainConfig, check_settings  # imported on use: keeps `import bot` light

    train = params.get("train") or {}
    if "base" in train:
        raise ValueError(messages.RETRAIN_NO_BASE)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"base"}
    unknown = sorted(set(train) - known)
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    config = TrainConfig(**train)
    check_settings(config)
    # A /kb-retrain run is registered: the registry's own check (rank within vLLM's limit, servable targets),
    # which the job would run first thing, runs now.
    from finetune.registry.folders import check_registrable

    check_registrable(config)


def _coerce(raw: str):
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def status_text(db, *, engine: AnswerEngine | None = None, admin: bool = False) -> str:
    """The /kb-status report in mrkdwn (outside values escaped). `admin`: with jobs' whole errors and progress
    details; everyone else sees a failed job's short reason (bot.messages.public_reason)."""
    lines = [messages.STATUS_TITLE]
    active = active_adapter(db)
    if active is None:
        lines.append(messages.STATUS_NO_ADAPTER)
    else:
        rank = active.params.get("rank") or active.params.get("r")
        desc = ", ".join(x for x in (active.method, f"r={rank}" if rank else "",
                                     f"{active.dataset_size} examples" if active.dataset_size else "") if x)
        since = (active.activated_at or active.created_at or "")[:16].replace("T", " ")
        lines.append(f"Active adapter: *{escape_mrkdwn(active.version)}* ({escape_mrkdwn(desc)}), since {since} UTC")
        metrics = active.metrics if isinstance(active.metrics, dict) else {}
        shown = [f"{label} {_fmt(metrics[key])}" for key, label in STATUS_METRICS if metrics.get(key) is not None]
        if shown:
            lines.append("Metrics: " + escape_mrkdwn(" · ".join(shown)))
    for team in list_teams(db):  # each team's own active adapter, or the shared one it falls back to
        own = active_adapter(db, team.name)
        adapter = f"*{escape_mrkdwn(own.version)}* ({escape_mrkdwn(own.method)}, {own.dataset_size or 0} examples)" \
            if own else messages.STATUS_TEAM_SHARED
        lines.append(messages.STATUS_TEAM.format(team=escape_mrkdwn(team.name), adapter=adapter))
    jobs = active_jobs(db)
    if not jobs:
        lines.append(messages.STATUS_NO_JOBS)
    for job in jobs:
        lines.append("• " + escape_mrkdwn(_describe_job(job, admin=admin)))
    finished = next((j for j in list_jobs(db, limit=10) if j.status not in ("queued", "running")), None)
    if finished is not None:
        lines.append(messages.STATUS_LAST_JOB + escape_mrkdwn(_describe_job(finished, admin=admin)))
    if engine is not None:
        ready = getattr(engine, "ready", True)
        base = str(getattr(engine, "base_model", ""))
        if not admin and base.startswith(("/", "~", ".")):
            base = base.rstrip("/").rsplit("/", 1)[-1]  # a local model folder: its name, not where it lives
        lines.append(f"Model: {escape_mrkdwn(base)} ({'ready' if ready else 'loading'})")
    return "\n".join(lines)


def _describe_job(job, *, admin: bool) -> str:
    from finetune.jobs.queue import describe_job

    if admin:
        return describe_job(job)
    who = f" (requested by {job.requester})" if job.requester else ""
    if job.status == "running":  # the phase only: a progress detail can name files
        job = dataclasses.replace(job, progress={k: v for k, v in job.progress.items() if k != "detail"})
        return describe_job(job)
    if job.status == "failed":
        return f"job {job.id}{who} failed: {messages.public_reason(job.error)} ({messages.DETAILS_FOR_ADMINS})"
    if job.status == "succeeded":
        return f"job {job.id}{who} succeeded"
    return describe_job(dataclasses.replace(job, error=None))


def _request_retrain(db, *, requester: str, reply_channel: str | None, params: dict):
    from finetune.jobs.queue import request_retrain  # imported on use: keeps `import bot` light

    return request_retrain(db, requester=requester, reply_channel=reply_channel, params=params)


def _rollback(db, *, actor: str, team: str | None = None):
    from finetune.registry.promotion import rollback  # records its own audit row ("rollback")

    return rollback(db, actor=actor, team=team)


def parse_rollback_args(text: str) -> str | None:
    """`team=eng` -> "eng"; "" -> None (the shared adapter). ValueError for anything else."""
    words = text.split()
    if not words:
        return None
    key, sep, raw = words[0].partition("=")
    if len(words) > 1 or key != "team" or not sep or not raw:
        raise ValueError(f"`{text.strip()}` is not team=NAME")
    return raw


def _refuse(rt: BotRuntime, respond, command: dict, name: str) -> bool:
    """Audit the command; refuse it (True) if the user is not an admin."""
    user = command.get("user_id") or "?"
    allowed = rt.config.is_admin(user)
    record_audit(rt.db(), actor=user, action=f"slack:{name}", allowed=allowed,
                 detail={"text": command.get("text") or "", "channel": command.get("channel_id")})
    if not allowed:
        log.warning("refused %s from %s (not in KBLOOP_ADMINS)", name, user)
        text = messages.NOT_ADMIN.format(command=name)
        if not rt.config.admins:
            text += messages.NO_ADMINS_CONFIGURED
        respond(text=text, response_type="ephemeral")
    return not allowed


def register_command_handlers(app: App, rt: BotRuntime) -> None:
    @app.command("/kb-retrain")
    @rt.after_ack
    def on_retrain(ack, command, respond):
        ack()
        if _refuse(rt, respond, command, "/kb-retrain"):
            return
        user, channel = command["user_id"], command.get("channel_id")
        try:
            params = parse_retrain_args(command.get("text") or "")
            check_retrain_options(params)
        except ValueError as exc:
            respond(text=f"{escape_mrkdwn(str(exc))}. {messages.RETRAIN_USAGE}", response_type="ephemeral")
            return
        except KbloopError as exc:
            respond(text=messages.retrain_invalid(escape_mrkdwn(str(exc))) + " " + messages.RETRAIN_USAGE,
                    response_type="ephemeral")
            return
        try:
            job = _request_retrain(rt.db(), requester=user, reply_channel=channel, params=params)
        except JobAlreadyActive as exc:
            job = exc.job
            progress = ""
            if job.status == "running" and job.progress:
                from finetune.jobs.queue import describe_progress

                progress = " (" + describe_progress(job.progress) + ")"
            respond(text=messages.retrain_already_active(job.id, job.status, job.requester, escape_mrkdwn(progress)),
                    response_type="ephemeral")
            return
        except KbloopError as exc:
            respond(text=messages.retrain_failed_to_queue(escape_mrkdwn(str(exc))) + "\n" + messages.RETRAIN_USAGE,
                    response_type="ephemeral")
            return
        record_audit(rt.db(), actor=user, action="retrain_queued", allowed=True, target=f"job:{job.id}",
                     detail={"params": job.params, "channel": channel})
        respond(text=messages.retrain_queued(job.id, rt.config.notify_channel), response_type="ephemeral")

    @app.command("/kb-rollback")
    @rt.after_ack
    def on_rollback(ack, command, respond):
        ack()
        if _refuse(rt, respond, command, "/kb-rollback"):
            return
        try:
            team = parse_rollback_args(command.get("text") or "")
        except ValueError as exc:
            respond(text=f"{escape_mrkdwn(str(exc))}. {messages.ROLLBACK_USAGE}", response_type="ephemeral")
            return
        try:
            require_team(rt.db(), team)
            current, previous = _rollback(rt.db(), actor=command["user_id"], team=team)
        except StoreError as exc:
            respond(text=messages.rollback_failed(escape_mrkdwn(str(exc))), response_type="ephemeral")
            return
        respond(text=messages.rolled_back(escape_mrkdwn(current.version),
                                          escape_mrkdwn(previous.version) if previous else None,
                                          escape_mrkdwn(team) if team else None),
                response_type="ephemeral")

    @app.command("/kb-status")
    @rt.after_ack
    def on_status(ack, command, respond):
        ack()
        admin = rt.config.is_admin(command.get("user_id"))
        respond(text=status_text(rt.db(), engine=rt.engine, admin=admin), response_type="ephemeral")
