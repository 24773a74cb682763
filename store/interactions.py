"""Questions and answers (`interactions`), votes and corrections (`feedback`), Slack delivery dedupe."""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlite_utils

from store.db import StoreError, write_transaction
from store.examples import add_pending_correction, blocking_findings, check_example_text, confirmation_hash
from store.sensitive import describe
from store.teams import team_filter, visible_to
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


def claim_slack_event(db: sqlite_utils.Database, event_id: str) -> bool:
    """True the first time an event id is seen; False for a retried delivery (persisted across restarts)."""
    with write_transaction(db):
        cur = db.execute("INSERT INTO slack_events (event_id, received_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                         [event_id, now()])
        return cur.rowcount == 1


@dataclass(frozen=True)
class CorrectionPair:
    """An approved correction and the bot's answer it replaced: DPO's chosen and rejected."""

    id: int  # the example's
    interaction_id: int | None
    question: str
    input: str
    answer: str  # the correction, as approved
    rejected_answer: str


def correction_pairs(db: sqlite_utils.Database, *, team: str | None = None) -> tuple[list[CorrectionPair], int]:
    """Corrections that a curator approved, with the answer each replaced: DPO data. Returns (pairs, left out).
    `team`: those that may train that team's adapter (shared and the team's; None: shared ones only).

    The rejected side is the bot's answer as Slack got it, never reviewed: a pair whose texts hold secrets or
    identity numbers is left out (unless a curator confirmed exactly these texts)."""
    pairs, left_out = [], 0
    visible, args = visible_to(team)
    for r in db.query(
        f"""SELECT id, interaction_id, question, input, answer, rejected_answer, sensitive_confirmed FROM examples
           WHERE status = 'approved' AND rejected_answer IS NOT NULL AND rejected_answer != answer AND {visible}
           ORDER BY id""", args):
        confirmed = r["sensitive_confirmed"] == confirmation_hash(r["question"], r["input"], r["answer"])
        if blocking_findings(r["question"], r["rejected_answer"]) or (
                blocking_findings(r["question"], r["answer"], r["input"]) and not confirmed):
            left_out += 1
            continue
        pairs.append(CorrectionPair(r["id"], r["interaction_id"], r["question"], r["input"] or "", r["answer"],
                                    r["rejected_answer"]))
    return pairs, left_out


def preference_pairs(db: sqlite_utils.Database, *, team: str | None = None) -> tuple[list[dict], int]:
    """(prompt, chosen, rejected) from corrections that a curator approved: DPO data. Returns (rows, left out).
    The selection is `correction_pairs`'s, the one `kbloop train --objective dpo [--team T]` uses."""
    pairs, left_out = correction_pairs(db, team=team)
    return [{"prompt": p.question, "chosen": p.answer, "rejected": p.rejected_answer} for p in pairs], left_out


@dataclass(frozen=True)
class LabelledAnswer:
    """One answer with a label: an employee's vote on the bot's answer (👍 desirable, 👎 undesirable), or a
    👎's correction (desirable). What `kbloop data export --format kto` writes and `kbloop train --objective kto`
    learns from (`voted_answers`)."""

    interaction_id: int
    question: str
    answer: str
    desirable: bool
    kind: str  # "vote" | "correction"
    example_id: int | None = None  # the example the interaction's correction became (latest), if any


def voted_answers(db: sqlite_utils.Database, *, corrections: bool = False,
                  team: str | None = None) -> tuple[list[LabelledAnswer], int]:
    """Votes on answers, latest vote per user, in vote order, and how many were left out. Returns (rows, left out).
    `team`: votes on the answers that may train that team's adapter (asked in no team's channel, or in the
    team's; None: the shared adapter's, no team's).

    Left out: votes on an answer a curator rejected (the review queue's status "rejected": the answer, or the
    correction it became, was rejected; a correction merged into another example is not a rejection), and texts
    holding secrets or identity numbers (store.sensitive): raw Slack questions and answers are never reviewed.
    With `corrections`, each interaction's correction follows its votes as a desirable answer: the example it
    became, as a curator may have edited it (pending or approved), scanned like every example (a curator's
    confirmation of exactly that text lets it through).
    """
    rows: list[LabelledAnswer] = []
    left_out = 0
    corrected: set[int] = set()
    visible, args = visible_to(team, "i.team")
    for r in db.query(
            """SELECT f.vote, f.correction, i.id AS interaction_id, i.question, i.answer, e.id AS example_id,
                      e.status AS example_status, e.note AS example_note, e.question AS example_question,
                      e.input AS example_input, e.answer AS example_answer, e.sensitive_confirmed,
                      r.decision AS review_decision
               FROM feedback f JOIN interactions i ON i.id = f.interaction_id
               LEFT JOIN examples e ON e.id = (SELECT MAX(x.id) FROM examples x WHERE x.interaction_id = i.id)
               LEFT JOIN interaction_reviews r ON r.interaction_id = i.id
               WHERE {visible}
               ORDER BY f.id""".format(visible=visible), args):
        # The review queue's status (review_items), without its aggregation: the example's, else the decision.
        merged = r["example_status"] == "rejected" and (r["example_note"] or "").startswith("merged into ")
        status = "merged" if merged else (r["example_status"] or r["review_decision"])
        if status == "rejected" or blocking_findings(r["question"], r["answer"]):
            left_out += 1
            continue
        rows.append(LabelledAnswer(r["interaction_id"], r["question"], r["answer"], r["vote"] == 1, "vote",
                                   r["example_id"]))
        if not corrections or r["vote"] != -1 or not r["correction"] or r["interaction_id"] in corrected:
            continue
        corrected.add(r["interaction_id"])
        question, input_, answer = r["question"], "", r["correction"]
        confirmed = False
        if r["example_id"] is not None and r["example_status"] in ("pending", "approved"):
            question, input_, answer = r["example_question"], r["example_input"] or "", r["example_answer"]
            confirmed = r["sensitive_confirmed"] == confirmation_hash(question, input_, answer)
        if blocking_findings(question, answer, input_) and not confirmed:
            left_out += 1
            continue
        rows.append(LabelledAnswer(r["interaction_id"], r["question"], answer.strip(), True, "correction",
                                   r["example_id"]))
    return rows, left_out


def labelled_answers(db: sqlite_utils.Database, *, team: str | None = None) -> tuple[list[dict], int]:
    """(prompt, completion, label) per vote on an answer: KTO data (👍 true, 👎 false). Latest vote per user.
    Returns (rows, left out); the selection is `voted_answers`'s, the one `kbloop train --objective kto [--team T]`
    uses."""
    votes, left_out = voted_answers(db, team=team)
    return [{"prompt": v.question, "completion": v.answer, "label": v.desirable} for v in votes], left_out


# The playground's review queue ----------------------------------------------------------------------

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


def review_channels(db: sqlite_utils.Database) -> list[str]:
    """Channels that answers in the queue came from, for the queue's filter."""
    return [r[0] for r in db.execute(
        "SELECT DISTINCT channel_id FROM interactions WHERE channel_id IS NOT NULL "
        "AND id IN (SELECT interaction_id FROM feedback) ORDER BY channel_id")]


def approve_interaction(
    db: sqlite_utils.Database, interaction_id: int, *, reviewer: str, answer: str, question: str | None = None,
    sensitive_ok: bool = False,
) -> int:
    """Turn a voted answer (with no example yet) into an approved example of the answer's team (store.teams);
    returns the example id.

    Refuses when the question is already an example (of the same team): that is a merge, not a second row. Text holding secrets or
    identity numbers needs `sensitive_ok` (the curator confirmed it).
    """
    from store.examples import example_hash

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


def count_slack_answers(db: sqlite_utils.Database, event_id: str) -> int:
    """How many interactions were recorded for one Slack event (tests and benchmarks check it is one)."""
    return db.execute("SELECT COUNT(*) FROM interactions WHERE event_id = ?", [event_id]).fetchone()[0]


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


# The Slack AI-app surface (issue 18) ---------------------------------------------------------------------

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
