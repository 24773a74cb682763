"""The Slack event inbox (`slack_event_inbox`): Events API deliveries acknowledged to Slack, not yet handled.

Slack wants its 200 within 3 seconds and does not send an acknowledged delivery again, so the HTTP
door (bot.server) writes each verified delivery here before it answers 200; a dispatcher hands the
oldest ones to the listeners and removes them. A delivery still here after a crash or a restart is
handled then. Deliveries are stored verified: they are dispatched without a second signature check,
which a backlog older than Slack's 5-minute window would fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlite_utils

from store.db import write_transaction
from store.text import now


@dataclass(frozen=True)
class InboxEvent:
    id: int
    event_id: str
    body: str
    headers: dict[str, str]
    received_at: str


def put_slack_event(db: sqlite_utils.Database, *, event_id: str, body: str, headers: dict[str, str]) -> bool:
    """Keep one verified delivery; False when a delivery of the same event already waits (a retry)."""
    with write_transaction(db):
        cur = db.execute(
            "INSERT INTO slack_event_inbox (event_id, body, headers, received_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (event_id) DO NOTHING",
            [event_id, body, json.dumps(headers), now()],
        )
        return cur.rowcount == 1


def pending_slack_events(db: sqlite_utils.Database, *, limit: int = 50) -> list[InboxEvent]:
    """The oldest waiting deliveries first."""
    return [InboxEvent(r["id"], r["event_id"], r["body"], json.loads(r["headers"] or "{}"), r["received_at"])
            for r in db.query("SELECT * FROM slack_event_inbox ORDER BY id LIMIT ?", [limit])]


def remove_slack_event(db: sqlite_utils.Database, inbox_id: int) -> None:
    with write_transaction(db):
        db.execute("DELETE FROM slack_event_inbox WHERE id = ?", [inbox_id])


def count_pending_slack_events(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COUNT(*) FROM slack_event_inbox").fetchone()[0]
