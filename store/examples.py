"""Training examples (`examples`): import, the curation queue, and the approved snapshot."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import sqlite_utils

from store.db import StoreError, write_transaction
from store.text import content_hash, now

STATUSES = ("pending", "approved", "rejected")
SOURCES = ("import", "feedback", "playground")


@dataclass(frozen=True)
class Example:
    id: int
    question: str
    input: str
    answer: str
    status: str
    source: str
    interaction_id: int | None
    rejected_answer: str | None
    reviewer: str | None
    reviewed_at: str | None
    note: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class NewExample:
    question: str
    answer: str
    input: str = ""


def _row(row: dict) -> Example:
    return Example(**{k: row[k] for k in Example.__dataclass_fields__})


def example_hash(question: str, input: str = "") -> str:
    # One example per question (+ input): a second answer to the same question is an edit, not a new row.
    return content_hash(question, input)


def add_examples(
    db: sqlite_utils.Database, examples: list[NewExample], *, status: str = "approved", source: str = "import",
    reviewer: str | None = None,
) -> tuple[int, int]:
    """Insert examples in one transaction, skipping questions already present. Returns (added, duplicates)."""
    _check(status, STATUSES, "status")
    _check(source, SOURCES, "source")
    added = 0
    stamp = now()
    with write_transaction(db):
        for ex in examples:
            cur = db.execute(
                """INSERT INTO examples (question, input, answer, status, source, content_hash, reviewer,
                   reviewed_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(content_hash) DO NOTHING""",
                [ex.question, ex.input or "", ex.answer, status, source, example_hash(ex.question, ex.input),
                 reviewer, stamp if status != "pending" else None, stamp, stamp],
            )
            added += cur.rowcount
    return added, len(examples) - added


def add_pending_correction(
    db: sqlite_utils.Database, *, interaction_id: int, question: str, corrected_answer: str, rejected_answer: str,
    source: str = "feedback",
) -> int:
    """A correction from a 👎 becomes (or updates) a pending example tied to its interaction."""
    stamp = now()
    with write_transaction(db):
        row = db.execute(
            "SELECT id FROM examples WHERE interaction_id = ? AND status = 'pending'", [interaction_id]
        ).fetchone()
        if row:
            db.execute(
                "UPDATE examples SET answer = ?, rejected_answer = ?, updated_at = ? WHERE id = ?",
                [corrected_answer, rejected_answer, stamp, row[0]],
            )
            return row[0]
        # The same question may already be an example: keep one row per question, send it back to review.
        h = example_hash(question, "")
        existing = db.execute("SELECT id FROM examples WHERE content_hash = ?", [h]).fetchone()
        if existing:
            db.execute(
                """UPDATE examples SET answer = ?, rejected_answer = ?, interaction_id = ?, status = 'pending',
                   source = ?, reviewer = NULL, reviewed_at = NULL, updated_at = ? WHERE id = ?""",
                [corrected_answer, rejected_answer, interaction_id, source, stamp, existing[0]],
            )
            return existing[0]
        cur = db.execute(
            """INSERT INTO examples (question, input, answer, status, source, interaction_id, rejected_answer,
               content_hash, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)""",
            [question, "", corrected_answer, "pending", source, interaction_id, rejected_answer, h, stamp, stamp],
        )
        return cur.lastrowid


def get_example(db: sqlite_utils.Database, example_id: int) -> Example:
    rows = list(db["examples"].rows_where("id = ?", [example_id]))
    if not rows:
        raise StoreError(f"no example with id {example_id}")
    return _row(rows[0])


def list_examples(
    db: sqlite_utils.Database, *, status: str | None = None, source: str | None = None, search: str | None = None,
    limit: int | None = None, offset: int = 0,
) -> list[Example]:
    where, args = [], []
    if status:
        _check(status, STATUSES, "status")
        where.append("status = ?")
        args.append(status)
    if source:
        _check(source, SOURCES, "source")
        where.append("source = ?")
        args.append(source)
    if search:
        where.append("(question LIKE ? OR answer LIKE ?)")
        args += [f"%{search}%", f"%{search}%"]
    sql = "SELECT * FROM examples" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ? OFFSET ?"
        args += [limit, offset]
    return [_row(r) for r in db.query(sql, args)]


def review_example(
    db: sqlite_utils.Database, example_id: int, *, decision: str, reviewer: str, answer: str | None = None,
    question: str | None = None, note: str | None = None,
) -> Example:
    """Approve (optionally with an edited answer / question) or reject an example."""
    if decision not in ("approved", "rejected", "pending"):
        raise StoreError(f"decision must be approved, rejected or pending, not {decision!r}")
    if answer is not None and not answer.strip():
        raise StoreError("the edited answer is empty")
    with write_transaction(db):
        current = get_example(db, example_id)
        new_question = question.strip() if question else current.question
        updates = {
            "status": decision,
            "reviewer": reviewer,
            "reviewed_at": now(),
            "updated_at": now(),
            "answer": answer.strip() if answer is not None else current.answer,
            "question": new_question,
            "content_hash": example_hash(new_question, current.input),
        }
        if note is not None:
            updates["note"] = note
        try:
            db["examples"].update(example_id, updates)
        except Exception as exc:  # the edited question collides with another example
            if "UNIQUE" in str(exc):
                raise StoreError(f"another example already asks {new_question!r}; merge instead") from None
            raise
    return get_example(db, example_id)


def merge_example(db: sqlite_utils.Database, example_id: int, into_id: int, *, reviewer: str, answer: str | None = None) -> Example:
    """Fold a queue item into an existing example: optionally take its answer, reject the duplicate."""
    with write_transaction(db):
        get_example(db, into_id)
        if answer is not None:
            db["examples"].update(into_id, {"answer": answer, "updated_at": now(), "reviewer": reviewer, "reviewed_at": now()})
        db["examples"].update(
            example_id, {"status": "rejected", "note": f"merged into {into_id}", "reviewer": reviewer,
                         "reviewed_at": now(), "updated_at": now()},
        )
    return get_example(db, into_id)


def update_example(db: sqlite_utils.Database, example_id: int, *, question: str | None = None, answer: str | None = None,
                   input: str | None = None) -> Example:
    with write_transaction(db):
        cur = get_example(db, example_id)
        q = question if question is not None else cur.question
        i = input if input is not None else cur.input
        db["examples"].update(example_id, {"question": q, "input": i, "answer": answer if answer is not None else cur.answer,
                                           "content_hash": example_hash(q, i), "updated_at": now()})
    return get_example(db, example_id)


def approved_snapshot(db: sqlite_utils.Database) -> tuple[list[Example], str]:
    """The approved examples, in a stable order, and a hash that changes whenever any of them does."""
    examples = list_examples(db, status="approved")
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.id, ex.question, ex.input, ex.answer], ensure_ascii=False).encode())
    return examples, digest.hexdigest()[:16]


def example_stats(db: sqlite_utils.Database) -> dict:
    by_status = {s: 0 for s in STATUSES}
    by_status.update({r[0]: r[1] for r in db.execute("SELECT status, COUNT(*) FROM examples GROUP BY status")})
    by_source = {s: 0 for s in SOURCES}
    by_source.update({r[0]: r[1] for r in db.execute("SELECT source, COUNT(*) FROM examples GROUP BY source")})
    return {"by_status": by_status, "by_source": by_source}



def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise StoreError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")



def example_questions(db: sqlite_utils.Database, *, statuses: tuple[str, ...] = ("approved", "pending")) -> list[tuple[int, str, str]]:
    """(id, question, status) of the examples in `statuses`: candidates for near-duplicate lookup."""
    for s in statuses:
        _check(s, STATUSES, "status")
    marks = ",".join("?" * len(statuses))
    return [tuple(r) for r in db.execute(f"SELECT id, question, status FROM examples WHERE status IN ({marks}) ORDER BY id",
                                          list(statuses))]


def examples_growth_by_source(db: sqlite_utils.Database) -> list[tuple[str, str, int]]:
    """(day, source, approved examples created that day) for the dataset growth plot."""
    return [tuple(r) for r in db.execute(
        "SELECT substr(created_at, 1, 10) AS day, source, COUNT(*) FROM examples WHERE status = 'approved' "
        "GROUP BY day, source ORDER BY day, source")]
