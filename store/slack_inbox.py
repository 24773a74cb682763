"""The Slack event inbox (`slack_event_inbox`): Events API deliveries acknowledged to Slack, not yet handled.

Slack wants its 200 within 3 seconds and does not send an acknowledged delivery again, so the HTTP
door (bot.server) writes each verified delivery here before it answers 200; a dispatcher hands the
oldest ones to the listeners and removes them. A delivery still here after a crash or a restart is
handled then. Deliveries are stored verified: they are dispatched without a second signature check,
which a backlog older than Slack's 5-minute window would fail.
"""

from __future__ import annotations

import json
import threading
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


@dataclass(frozen=True)
class Delivery:
    event_id: str
    body: str
    headers: dict[str, str]


def put_slack_events(db: sqlite_utils.Database, deliveries: list[Delivery]) -> list[bool]:
    """Keep several verified deliveries in one transaction; for each, False when it was already waiting."""
    stamp = now()
    with write_transaction(db):
        return [db.execute("INSERT INTO slack_event_inbox (event_id, body, headers, received_at) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (event_id) DO NOTHING",
                           [d.event_id, d.body, json.dumps(d.headers), stamp]).rowcount == 1
                for d in deliveries]


class GroupCommit:
    """Deliveries that arrive together are stored in one transaction (group commit).

    Every request thread calls `put()` and returns once its delivery is committed. While one thread commits
    (or waits for the database's write lock, held by an answer being recorded), the deliveries that arrive
    queue up, and the next thread to get the turn commits all of them: under a burst, one transaction and one
    wait for the write lock instead of one each (docs/benchmarks.md, "Acknowledgement latency").
    """

    def __init__(self, db_for_thread):
        self._db_for_thread = db_for_thread  # the calling thread's connection (store.db.local_db)
        self._queue: list[_Waiting] = []
        self._queue_guard = threading.Lock()
        self._turn = threading.Lock()

    def put(self, delivery: Delivery) -> bool:
        """Store one delivery (raises what the commit raised); False when it was already waiting."""
        waiting = _Waiting(delivery)
        with self._queue_guard:
            self._queue.append(waiting)
        with self._turn:
            if not waiting.done:
                with self._queue_guard:
                    group, self._queue = self._queue, []
                try:
                    stored = put_slack_events(self._db_for_thread(), [w.delivery for w in group])
                except Exception as exc:  # noqa: BLE001 - every delivery of the group is refused alike
                    for w in group:
                        w.error, w.done = exc, True
                else:
                    for w, fresh in zip(group, stored):
                        w.stored, w.done = fresh, True
        if waiting.error is not None:
            raise waiting.error
        return waiting.stored


@dataclass
class _Waiting:
    delivery: Delivery
    done: bool = False
    stored: bool = False
    error: Exception | None = None


def pending_slack_events(db: sqlite_utils.Database, *, limit: int = 50) -> list[InboxEvent]:
    """The oldest waiting deliveries first."""
    return [InboxEvent(r["id"], r["event_id"], r["body"], json.loads(r["headers"] or "{}"), r["received_at"])
            for r in db.query("SELECT * FROM slack_event_inbox ORDER BY id LIMIT ?", [limit])]


def remove_slack_event(db: sqlite_utils.Database, inbox_id: int) -> None:
    with write_transaction(db):
        db.execute("DELETE FROM slack_event_inbox WHERE id = ?", [inbox_id])


def count_pending_slack_events(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COUNT(*) FROM slack_event_inbox").fetchone()[0]
