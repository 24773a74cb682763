"""The Slack assistant surface (Slack's AI-app side panel and agent DMs): each assistant thread's context (the
channel the user is looking at: `assistant_threads`) and the questions suggested when a thread starts.
"""

from __future__ import annotations

import json

import sqlite_utils

from store.db import write_transaction
from store.teams import visible_to
from store.text import now


def suggested_questions(db: sqlite_utils.Database, *, since: str, limit: int = 4, team: str | None = None) -> list[str]:
    """Questions to suggest when an assistant thread starts: asked since `since` (an ISO time), the most
    asked and the most 👍'd alternately, each once (compared without case or surrounding spaces), in the words
    most recently used. Questions whose answers got more 👎 than 👍 are left out: they would suggest a
    bad answer. Empty when nothing was asked. `team`: questions asked in no team's channel or in that team's
    (store.teams): another team's questions are never suggested."""
    visible, args = visible_to(team, "i.team")
    rows = list(db.query(
        """WITH asked AS (
             SELECT lower(trim(i.question)) AS key, COUNT(DISTINCT i.id) AS asked, MAX(i.id) AS last_id,
               COALESCE(SUM(CASE WHEN f.vote = 1 THEN 1 ELSE 0 END), 0) AS up,
               COALESCE(SUM(CASE WHEN f.vote = -1 THEN 1 ELSE 0 END), 0) AS down
             FROM interactions i LEFT JOIN feedback f ON f.interaction_id = i.id
             WHERE i.created_at >= ? AND trim(i.question) != '' AND {visible}
             GROUP BY key)
           SELECT a.asked, a.up, a.down, i.question FROM asked a JOIN interactions i ON i.id = a.last_id
           WHERE a.up >= a.down""".format(visible=visible), [since, *args]))
    by_asked = sorted(rows, key=lambda r: (-r["asked"], -r["up"], r["question"]))
    by_up = sorted((r for r in rows if r["up"] > 0), key=lambda r: (-r["up"], -r["asked"], r["question"]))
    out: list[str] = []
    for pair in zip(by_asked, by_up + [None] * len(by_asked)):
        for r in pair:
            if r is not None and r["question"].strip() not in out and len(out) < limit:
                out.append(r["question"].strip())
    return out


def save_assistant_thread_context(db: sqlite_utils.Database, *, channel_id: str, thread_ts: str, context: dict,
                                  user_id: str | None = None) -> None:
    """Keep an assistant thread's context (the channel the user is looking at); the latest wins."""
    with write_transaction(db):
        db.execute(
            """INSERT INTO assistant_threads (channel_id, thread_ts, user_id, context, updated_at) VALUES (?,?,?,?,?)
               ON CONFLICT(channel_id, thread_ts) DO UPDATE SET context = excluded.context,
                 user_id = COALESCE(excluded.user_id, assistant_threads.user_id), updated_at = excluded.updated_at""",
            [channel_id, thread_ts, user_id, json.dumps(context or {}, ensure_ascii=False), now()])


def assistant_thread_context(db: sqlite_utils.Database, *, channel_id: str, thread_ts: str) -> dict | None:
    row = db.execute("SELECT context FROM assistant_threads WHERE channel_id = ? AND thread_ts = ?",
                     [channel_id, thread_ts]).fetchone()
    return json.loads(row[0]) if row else None
