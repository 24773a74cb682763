"""Questions and answers (`interactions`) and the votes and corrections on them (`feedback`); kbloop's earlier
answers in a Slack thread, and the channels voted answers came from.

The review queue over them is store.review, what the votes teach store.preferences, Slack's delivery dedupe and
handler failures store.slack_events, assistant threads store.assistant_threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlite_utils

from store.db import StoreError, write_transaction
from store.examples import add_pending_correction
from store.text import now


@dataclass(frozen=True)
class Interaction:
    id: int
    question: str
    answer: str
    source: str
    user_id: str | None
    channel_id: str | None
    thread_ts: str | None
    message_ts: str | None
    event_id: str | None
    adapter_version: str | None
    sources: list[dict]
    latency_ms: int | None
    created_at: str
    verified_example_id: int | None = None  # the approved example it repeated (a verified answer)
    team: str | None = None  # the team whose channel it was asked in; None: shared (store.teams)


@dataclass(frozen=True)
class Vote:
    interaction_id: int
    user_id: str
    vote: int
    correction: str | None
    source: str | None
    created_at: str
    updated_at: str


def _interaction(row: dict) -> Interaction:
    data = {k: row[k] for k in Interaction.__dataclass_fields__}
    data["sources"] = json.loads(row["sources"] or "[]")
    return Interaction(**data)


def record_interaction(
    db: sqlite_utils.Database, *, question: str, answer: str, source: str, sources: list[dict] | None = None,
    adapter_version: str | None = None, latency_ms: int | None = None, user_id: str | None = None,
    channel_id: str | None = None, thread_ts: str | None = None, message_ts: str | None = None,
    event_id: str | None = None, verified_example_id: int | None = None, team: str | None = None,
) -> int:
    with write_transaction(db):
        cur = db.execute(
            """INSERT INTO interactions (question, answer, source, user_id, channel_id, thread_ts, message_ts,
               event_id, adapter_version, sources, latency_ms, verified_example_id, team, created_at)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
            [question, answer, source, user_id, channel_id, thread_ts, message_ts, event_id, adapter_version,
             json.dumps(sources or [], ensure_ascii=False), latency_ms, verified_example_id, team, now()],
        )
        return cur.lastrowid


def set_interaction_message(db: sqlite_utils.Database, interaction_id: int, *, channel_id: str, message_ts: str,
                            thread_ts: str | None = None) -> None:
    """Remember where the answer was posted (known only after chat.postMessage returns)."""
    with write_transaction(db):
        db["interactions"].update(interaction_id, {"channel_id": channel_id, "message_ts": message_ts,
                                                   "thread_ts": thread_ts})


def get_interaction(db: sqlite_utils.Database, interaction_id: int) -> Interaction:
    rows = list(db["interactions"].rows_where("id = ?", [interaction_id]))
    if not rows:
        raise StoreError(f"no interaction with id {interaction_id}")
    return _interaction(rows[0])


def list_interactions(
    db: sqlite_utils.Database, *, vote: int | None = None, channel_id: str | None = None, search: str | None = None,
    since: str | None = None, limit: int = 200,
) -> list[Interaction]:
    where, args = [], []
    if vote is not None:
        where.append("id IN (SELECT interaction_id FROM feedback WHERE vote = ?)")
        args.append(vote)
    if channel_id:
        where.append("channel_id = ?")
        args.append(channel_id)
    if search:
        where.append("(question LIKE ? OR answer LIKE ?)")
        args += [f"%{search}%", f"%{search}%"]
    if since:
        where.append("created_at >= ?")
        args.append(since)
    sql = "SELECT * FROM interactions" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY id DESC LIMIT ?"
    return [_interaction(r) for r in db.query(sql, args + [limit])]


def record_vote(
    db: sqlite_utils.Database, *, interaction_id: int, user_id: str, vote: int, correction: str | None = None,
    source: str = "slack",
) -> Vote:
    """One vote per user per answer; the latest wins. A correction also queues a pending example.

    A later vote without a correction keeps the earlier correction text only if the vote is still 👎.
    """
    if vote not in (1, -1):
        raise StoreError(f"vote must be +1 or -1, not {vote!r}")
    correction = (correction or "").strip() or None
    stamp = now()
    with write_transaction(db):
        interaction = get_interaction(db, interaction_id)
        db.execute(
            """INSERT INTO feedback (interaction_id, user_id, vote, correction, source, created_at, updated_at)
               VALUES (?,?,?,?,?,?,?)
               ON CONFLICT(interaction_id, user_id) DO UPDATE SET
                 vote = excluded.vote,
                 correction = CASE WHEN excluded.vote = 1 THEN NULL
                                   ELSE COALESCE(excluded.correction, feedback.correction) END,
                 source = excluded.source,
                 updated_at = excluded.updated_at""",
            [interaction_id, user_id, vote, correction, source, stamp, stamp],
        )
        if correction and vote == -1:
            add_pending_correction(
                db, interaction_id=interaction_id, question=interaction.question, corrected_answer=correction,
                rejected_answer=interaction.answer, source="feedback" if source == "slack" else "playground",
                team=interaction.team,
            )
        row = db.execute(
            "SELECT interaction_id, user_id, vote, correction, source, created_at, updated_at FROM feedback "
            "WHERE interaction_id = ? AND user_id = ?", [interaction_id, user_id]).fetchone()
    return Vote(*row)


def votes_for(db: sqlite_utils.Database, interaction_id: int) -> list[Vote]:
    return [Vote(*r) for r in db.execute(
        "SELECT interaction_id, user_id, vote, correction, source, created_at, updated_at FROM feedback "
        "WHERE interaction_id = ? ORDER BY updated_at", [interaction_id])]


def feedback_stats(db: sqlite_utils.Database) -> dict:
    row = db.execute(
        "SELECT SUM(vote = 1), SUM(vote = -1), SUM(correction IS NOT NULL), COUNT(DISTINCT interaction_id) FROM feedback"
    ).fetchone()
    total = db.execute("SELECT COUNT(*) FROM interactions").fetchone()[0]
    return {"interactions": total, "up": row[0] or 0, "down": row[1] or 0, "corrections": row[2] or 0,
            "voted_interactions": row[3] or 0}


def review_channels(db: sqlite_utils.Database) -> list[str]:
    """Channels that answers in the queue came from, for the queue's filter."""
    return [r[0] for r in db.execute(
        "SELECT DISTINCT channel_id FROM interactions WHERE channel_id IS NOT NULL "
        "AND id IN (SELECT interaction_id FROM feedback) ORDER BY channel_id")]


def thread_interactions(db: sqlite_utils.Database, *, channel_id: str, thread_ts: str,
                        before_id: int | None = None) -> list[Interaction]:
    """kbloop's own earlier answers in one Slack thread, oldest first (the turns a follow-up is asked after);
    with `before_id`, only those recorded before that interaction."""
    sql = "SELECT * FROM interactions WHERE channel_id = ? AND thread_ts = ?"
    args: list = [channel_id, thread_ts]
    if before_id is not None:
        sql += " AND id < ?"
        args.append(before_id)
    return [_interaction(r) for r in db.query(sql + " ORDER BY id", args)]
