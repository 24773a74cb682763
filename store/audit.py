"""The audit log: every admin action, allowed or refused."""

from __future__ import annotations

import json

import sqlite_utils

from store.db import write_transaction
from store.text import now


def record_audit(db: sqlite_utils.Database, *, actor: str, action: str, allowed: bool, target: str | None = None,
                 detail: dict | None = None) -> int:
    with write_transaction(db):
        cur = db.execute(
            "INSERT INTO audit_log (actor, action, target, allowed, detail, created_at) VALUES (?,?,?,?,?,?)",
            [actor, action, target, int(allowed), json.dumps(detail or {}, ensure_ascii=False), now()],
        )
        return cur.lastrowid


def list_audit(db: sqlite_utils.Database, *, limit: int = 100) -> list[dict]:
    out = []
    for r in db.query("SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", [limit]):
        r = dict(r)
        r["detail"] = json.loads(r["detail"] or "{}")
        r["allowed"] = bool(r["allowed"])
        out.append(r)
    return out
