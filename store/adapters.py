"""The adapter registry's rows (`adapters`): candidates, the one active adapter, rollback history.

Each team (store.teams) has its own: an adapter registered for a team is a candidate for that team, and activating
it retires only that team's active adapter; `team` None is the shared adapter, which answers every question whose
team has no active adapter of its own.

The folders themselves are written by `finetune`; this module only records them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import sqlite_utils

from store.db import StoreError, write_transaction
from store.text import now

# What an adapter version may be called: it names a folder ($KBLOOP_HOME/adapters/<version>/) and a vLLM LoRA.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Adapter:
    version: str
    path: str
    base_model: str
    method: str
    params: dict
    dataset_hash: str | None
    dataset_size: int | None
    metrics: dict
    status: str
    job_id: int | None
    note: str | None
    created_at: str
    activated_at: str | None
    rolled_back_at: str | None
    team: str | None = None  # None: the shared adapter


def _adapter(row: dict) -> Adapter:
    data = {k: row[k] for k in Adapter.__dataclass_fields__}
    data["params"] = json.loads(row["params"] or "{}")
    data["metrics"] = json.loads(row["metrics"] or "{}")
    return Adapter(**data)


def passages_of(adapter: Adapter) -> int:
    """Retrieved passages per prompt the adapter was trained with (3 for adapters that predate the record)."""
    k = adapter.params.get("k_passages")
    return 3 if k is None else int(k)


def next_version(db: sqlite_utils.Database) -> str:
    """v1, v2, … (never reused, also after a failed registration)."""
    rows = db.execute("SELECT version FROM adapters").fetchall()
    nums = [int(v[1:]) for (v,) in rows if v.startswith("v") and v[1:].isdigit()]
    return f"v{max(nums, default=0) + 1}"


def register_adapter(
    db: sqlite_utils.Database, *, version: str, path: str, base_model: str, method: str, params: dict,
    dataset_hash: str | None, dataset_size: int | None, metrics: dict, job_id: int | None = None,
    team: str | None = None,
) -> Adapter:
    with write_transaction(db):
        if db.execute("SELECT 1 FROM adapters WHERE version = ?", [version]).fetchone():
            raise StoreError(f"adapter version {version} already exists")
        db["adapters"].insert({
            "version": version, "path": path, "base_model": base_model, "method": method,
            "params": json.dumps(params, ensure_ascii=False), "dataset_hash": dataset_hash,
            "dataset_size": dataset_size, "metrics": json.dumps(metrics, ensure_ascii=False),
            "status": "candidate", "job_id": job_id, "team": team, "created_at": now(),
        })
    return get_adapter(db, version)


def update_metrics(db: sqlite_utils.Database, version: str, metrics: dict) -> None:
    with write_transaction(db):
        get_adapter(db, version)
        db["adapters"].update(version, {"metrics": json.dumps(metrics, ensure_ascii=False)})


def set_adapter_note(db: sqlite_utils.Database, version: str, note: str) -> None:
    with write_transaction(db):
        db["adapters"].update(version, {"note": note})


def get_adapter(db: sqlite_utils.Database, version: str) -> Adapter:
    rows = list(db["adapters"].rows_where("version = ?", [version]))
    if not rows:
        known = ", ".join(r[0] for r in db.execute("SELECT version FROM adapters ORDER BY created_at")) or "none yet"
        raise StoreError(f"no adapter {version!r} (known: {known})")
    return _adapter(rows[0])


def list_adapters(db: sqlite_utils.Database) -> list[Adapter]:
    return [_adapter(r) for r in db.query("SELECT * FROM adapters ORDER BY created_at")]


def active_adapter(db: sqlite_utils.Database, team: str | None = None) -> Adapter | None:
    """The active adapter of `team` (None: the shared one), or None. No fallback here: `serving_adapter` falls back."""
    rows = list(db["adapters"].rows_where("status = 'active' AND team IS ?", [team]))
    return _adapter(rows[0]) if rows else None


def serving_adapter(db: sqlite_utils.Database, team: str | None = None) -> Adapter | None:
    """The adapter that answers a question of `team`: the team's active adapter, else the shared active one."""
    return (active_adapter(db, team) if team is not None else None) or active_adapter(db)


def activate_adapter(db: sqlite_utils.Database, version: str) -> Adapter:
    """Make `version` the active adapter of its team (or the shared one); the previous one is retired (and can be
    rolled back to)."""
    with write_transaction(db):
        team = get_adapter(db, version).team
        db.execute("UPDATE adapters SET status = 'retired' WHERE status = 'active' AND team IS ? AND version != ?",
                   [team, version])
        db.execute("UPDATE adapters SET status = 'active', activated_at = ?, rolled_back_at = NULL WHERE version = ?",
                   [now(), version])
    return get_adapter(db, version)


def rollback_adapter(db: sqlite_utils.Database, team: str | None = None) -> tuple[Adapter | None, Adapter | None]:
    """Retire the active adapter of `team` (None: the shared one) and reactivate the one of the same team active
    before it. Returns (from, to); `to` None = none of its own (a team's questions then get the shared adapter,
    shared questions the base)."""
    with write_transaction(db):
        current = active_adapter(db, team)
        if current is None:
            whose = f"team {team!r} has no active adapter of its own" if team else "no shared adapter is active"
            raise StoreError(f"{whose}: nothing to roll back")
        stamp = now()
        db.execute("UPDATE adapters SET status = 'retired', rolled_back_at = ? WHERE version = ?",
                   [stamp, current.version])
        prev = db.execute(
            """SELECT version FROM adapters WHERE status = 'retired' AND rolled_back_at IS NULL
               AND activated_at IS NOT NULL AND version != ? AND team IS ? ORDER BY activated_at DESC LIMIT 1""",
            [current.version, team]).fetchone()
        if prev is None:
            return current, None
        db.execute("UPDATE adapters SET status = 'active' WHERE version = ?", [prev[0]])
    return current, get_adapter(db, prev[0])
