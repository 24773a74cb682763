"""The playground's review queue: answers with votes or corrections (`review_items`), a curator's decision on one
(`interaction_reviews`: `record_interaction_review`), and a voted answer approved as an example
(`approve_interaction`).
"""

from __future__ import annotations

import json

import sqlite_utils

from store.db import StoreError, write_transaction
from store.examples import blocking_findings, check_example_text, confirmation_hash, example_hash
from store.interactions import get_interaction
from store.sensitive import describe
from store.teams import team_filter
from store.text import now

REVIEW_STATUSES = ("to_review", "unreviewed", "pending", "approved", "rejected", "merged")


def review_items(
    db: sqlite_utils.Database, *, vote: str | None = None, status: str | None = None, channel_id: str | None = None,
    since: str | None = None, until: str | None = None, search: str | None = None, interaction_id: int | None = None,
    limit: int = 200, team: str | None = None,
) -> list[dict]:
    """Answers with votes or corrections, filtered, 👎 and not-yet-reviewed first.
    `team`: only that team's answers (store.teams.SHARED: those of no team); None: every team's.

    Each row: the interaction's columns, `up`, `down`, `corrections` (list), `example_id`, `example_status`,
    `example_answer`, `review_decision`, `reviewer`, and `status`: the example's status when the answer
    became (or has, from a correction) an example, else the curator's decision, else "unreviewed".
    vote: "down" (any 👎), "up" (👍 and no 👎); status: one of REVIEW_STATUSES ("to_review" = unreviewed
    or pending); since / until: ISO dates (inclusive), compared with the answer's time.
    """
    if vote not in (None, "", "all", "up", "down"):
        raise StoreError(f"vote filter must be up, down or all, not {vote!r}")
    if status not in (None, "", "all") and status not in REVIEW_STATUSES:
        raise StoreError(f"status filter must be one of {', '.join(REVIEW_STATUSES)}, not {status!r}")
    where, args = [], []
    if interaction_id is not None:
        where.append("id = ?")
        args.append(interaction_id)
    if vote == "down":
        where.append("down > 0")
    elif vote == "up":
        where.append("up > 0 AND down = 0")
    if status == "to_review":
        where.append("status IN ('unreviewed', 'pending')")
    elif status not in (None, "", "all"):
        where.append("status = ?")
        args.append(status)
    if channel_id:
        where.append("channel_id = ?")
        args.append(channel_id)
    if team:
        condition, team_args = team_filter(team)
        where.append(condition)
        args += team_args
    if since:
        where.append("created_at >= ?")
        args.append(since)
    if until:
        # An ISO date as the upper bound means "through the end of that day".
        where.append("created_at < ?")
        args.append(until + "\uffff" if len(until) <= 10 else until)
    if search:
        where.append("(question LIKE ? OR answer LIKE ? OR IFNULL(corrections, '') LIKE ?)")
        args += [f"%{search}%"] * 3
    sql = f"""
    WITH voted AS (
      SELECT i.*,
        SUM(CASE WHEN f.vote = 1 THEN 1 ELSE 0 END) AS up,
        SUM(CASE WHEN f.vote = -1 THEN 1 ELSE 0 END) AS down,
        json_group_array(f.correction) FILTER (WHERE f.correction IS NOT NULL) AS corrections
      FROM interactions i JOIN feedback f ON f.interaction_id = i.id
      GROUP BY i.id
    ), items AS (
      SELECT v.*, e.id AS example_id, e.status AS example_status, e.answer AS example_answer,
        r.decision AS review_decision, COALESCE(e.reviewer, r.reviewer) AS reviewer,
        COALESCE(e.reviewed_at, r.reviewed_at) AS reviewed_at,
        CASE WHEN e.status = 'rejected' AND e.note LIKE 'merged into %' THEN 'merged'
             WHEN e.status IS NOT NULL THEN e.status
             WHEN r.decision IS NOT NULL THEN r.decision ELSE 'unreviewed' END AS status
      FROM voted v
      LEFT JOIN examples e ON e.id = (SELECT MAX(x.id) FROM examples x WHERE x.interaction_id = v.id)
      LEFT JOIN interaction_reviews r ON r.interaction_id = v.id
    )
    SELECT * FROM items {"WHERE " + " AND ".join(where) if where else ""}
    ORDER BY status IN ('unreviewed', 'pending') DESC, down DESC, id DESC
    LIMIT ?
    """
    out = []
    for r in db.query(sql, args + [limit]):
        r = dict(r)
        r["sources"] = json.loads(r["sources"] or "[]")
        r["corrections"] = json.loads(r["corrections"] or "[]")
        out.append(r)
    return out


def review_item(db: sqlite_utils.Database, interaction_id: int) -> dict:
    """One row of `review_items`, whatever its status."""
    get_interaction(db, interaction_id)
    rows = review_items(db, interaction_id=interaction_id, limit=1)
    if rows:
        return rows[0]
    raise StoreError(f"answer #{interaction_id} has no votes or corrections: it is not in the review queue")


def review_counts(db: sqlite_utils.Database) -> dict:
    """How many queue items are in each review status, and how many are left (unreviewed + pending)."""
    counts = {s: 0 for s in REVIEW_STATUSES if s != "to_review"}
    for row in review_items(db, limit=1_000_000):
        counts[row["status"]] += 1
    counts["left"] = counts["unreviewed"] + counts["pending"]
    return counts


def approve_interaction(
    db: sqlite_utils.Database, interaction_id: int, *, reviewer: str, answer: str, question: str | None = None,
    sensitive_ok: bool = False,
) -> int:
    """Turn a voted answer (with no example yet) into an approved example of the answer's team (store.teams);
    returns the example id.

    Refuses when the question is already an example (of the same team): that is a merge, not a second row. Text holding secrets or
    identity numbers needs `sensitive_ok` (the curator confirmed it).
    """
    answer = (answer or "").strip()
    if not answer:
        raise StoreError("the answer to approve is empty")
    stamp = now()
    with write_transaction(db):
        interaction = get_interaction(db, interaction_id)
        q = (question or "").strip() or interaction.question
        check_example_text(q, answer, what=f"answer #{interaction_id}")
        found = blocking_findings(q, answer)
        if found and not sensitive_ok:
            raise StoreError(f"answer #{interaction_id} contains {describe(found)}: redact it, or confirm that it may "
                             "train (“approve anyway”)")
        h = example_hash(q, "", interaction.team)
        existing = db.execute("SELECT id FROM examples WHERE content_hash = ?", [h]).fetchone()
        if existing:
            raise StoreError(f"example #{existing[0]} already asks {q!r}; merge into it instead")
        cur = db.execute(
            """INSERT INTO examples (question, input, answer, status, source, interaction_id, rejected_answer,
               content_hash, reviewer, reviewed_at, sensitive_confirmed, team, created_at, updated_at)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
            [q, "", answer, "approved", "playground", interaction_id,
             interaction.answer if answer != interaction.answer.strip() else None, h, reviewer, stamp,
             confirmation_hash(q, "", answer) if found else None, interaction.team, stamp, stamp],
        )
        example_id = cur.lastrowid
        record_interaction_review(db, interaction_id, decision="approved", reviewer=reviewer, example_id=example_id)
    return example_id


def record_interaction_review(
    db: sqlite_utils.Database, interaction_id: int, *, decision: str, reviewer: str, example_id: int | None = None,
) -> None:
    """A curator's decision on a voted answer (the latest decision wins)."""
    if decision not in ("approved", "rejected", "merged"):
        raise StoreError(f"decision must be approved, rejected or merged, not {decision!r}")
    with write_transaction(db):
        get_interaction(db, interaction_id)
        db.execute(
            """INSERT INTO interaction_reviews (interaction_id, decision, example_id, reviewer, reviewed_at)
               VALUES (?,?,?,?,?) ON CONFLICT(interaction_id) DO UPDATE SET decision = excluded.decision,
               example_id = excluded.example_id, reviewer = excluded.reviewer, reviewed_at = excluded.reviewed_at""",
            [interaction_id, decision, example_id, reviewer, now()],
        )
