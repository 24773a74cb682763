"""Slack deliveries answered once (`slack_events`: a retried delivery is recognised by its event id, also across
restarts) and the failures of Slack handlers kept for operators (`bot_errors`: Slack itself was answered 200).
"""

from __future__ import annotations

import json

import sqlite_utils

from store.db import write_transaction
from store.text import now


def claim_slack_event(db: sqlite_utils.Database, event_id: str) -> bool:
    """True the first time an event id is seen; False for a retried delivery (persisted across restarts)."""
    with write_transaction(db):
        cur = db.execute("INSERT INTO slack_events (event_id, received_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                         [event_id, now()])
        return cur.rowcount == 1


def claim_slack_events(db: sqlite_utils.Database, keys: list[str]) -> bool:
    """Claim several delivery keys in one transaction (an event id and the message it is about).

    True only if none was seen before; every key is recorded either way, so a later delivery of any of
    them is refused too.
    """
    stamp = now()
    fresh = 0
    with write_transaction(db):
        for key in keys:
            cur = db.execute("INSERT INTO slack_events (event_id, received_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                             [key, stamp])
            fresh += cur.rowcount == 1
    return fresh == len(keys)


def count_slack_answers(db: sqlite_utils.Database, event_id: str) -> int:
    """How many interactions were recorded for one Slack event (tests and benchmarks check it is one)."""
    return db.execute("SELECT COUNT(*) FROM interactions WHERE event_id = ?", [event_id]).fetchone()[0]


def record_bot_error(db: sqlite_utils.Database, *, kind: str, error: str, event_id: str | None = None,
                     user_id: str | None = None, channel_id: str | None = None, detail: dict | None = None) -> int:
    """Keep a failure of a Slack handler (Slack itself was still answered 200). Returns its id (the "ref")."""
    with write_transaction(db):
        cur = db.execute(
            "INSERT INTO bot_errors (kind, event_id, user_id, channel_id, error, detail, created_at) "
            "VALUES (?,?,?,?,?,?,?)",
            [kind, event_id, user_id, channel_id, error[:2000], json.dumps(detail or {}, ensure_ascii=False), now()],
        )
        return cur.lastrowid


def list_bot_errors(db: sqlite_utils.Database, *, limit: int = 100) -> list[dict]:
    out = []
    for r in db.query("SELECT * FROM bot_errors ORDER BY id DESC LIMIT ?", [limit]):
        r = dict(r)
        r["detail"] = json.loads(r["detail"] or "{}")
        out.append(r)
    return out
