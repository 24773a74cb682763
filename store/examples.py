"""Training examples (`examples`): import, the curation queue, and the approved snapshot."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import sqlite_utils

from store.db import StoreError, write_transaction
from store.sensitive import Finding, blocking, describe, find_sensitive_in
from store.teams import require_team, team_filter, visible_to
from store.text import content_hash, now

STATUSES = ("pending", "approved", "rejected")
SOURCES = ("import", "feedback", "playground")

# The longest question, context (`input`) and answer an example may hold, in characters. A Slack question or a KB
# answer is a few hundred; these leave room for long procedures while refusing a pasted log or a 30 MB row that
# would fill the prompt and the database. Every path into `examples` checks them (`example_problems`).
MAX_QUESTION_CHARS = 4_000
MAX_INPUT_CHARS = 20_000
MAX_ANSWER_CHARS = 20_000


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
    disputes_example_id: int | None = None  # a correction of a question that already had this example
    sensitive_confirmed: str | None = None  # confirmation_hash of a flagged text someone approved anyway
    team: str | None = None  # None: shared (store.teams)


@dataclass(frozen=True)
class NewExample:
    question: str
    answer: str
    input: str = ""


def _row(row: dict) -> Example:
    return Example(**{k: row[k] for k in Example.__dataclass_fields__})


def example_hash(question: str, input: str = "", team: str | None = None) -> str:
    # One example per question (+ input) per team: a second answer to the same question is an edit, not a new row;
    # two teams (or a team and the shared set) may each answer the same question their own way.
    digest = content_hash(question, input)
    return digest if team is None else f"{digest}@{team}"


def example_problems(question: str, answer: str, input: str = "") -> list[str]:
    """What makes a text unfit to store as an example (too long, a NUL character), one reason each; [] if fine."""
    problems = []
    for name, value, limit in (("question", question, MAX_QUESTION_CHARS), ("input", input, MAX_INPUT_CHARS),
                               ("answer", answer, MAX_ANSWER_CHARS)):
        value = value or ""
        if len(value) > limit:
            problems.append(f"the {name} is {len(value):,} characters long; the limit is {limit:,}")
        if "\x00" in value:
            # SQLite stores it, but C strings (and most tools reading the database) stop at it.
            problems.append(f"the {name} contains a NUL character (\\u0000)")
    return problems


def check_example_text(question: str, answer: str, input: str = "", *, what: str = "the example") -> None:
    problems = example_problems(question, answer, input)
    if problems:
        raise StoreError(f"{what}: " + "; ".join(problems))


def confirmation_hash(question: str, input: str, answer: str) -> str:
    """What a confirmation of flagged text is valid for: any later edit of the text needs a new one."""
    return content_hash(question, input or "", answer)


def blocking_findings(question: str, answer: str, input: str = "") -> list[Finding]:
    """Secrets and identity or payment numbers in an example's texts (contact details are not among them)."""
    return blocking(find_sensitive_in(question, input or "", answer))


def withheld_reason(ex: Example) -> str | None:
    """Why an approved example must not train (flagged text nobody confirmed), or None when it may."""
    found = blocking_findings(ex.question, ex.answer, ex.input)
    if not found or ex.sensitive_confirmed == confirmation_hash(ex.question, ex.input, ex.answer):
        return None
    return f"contains {describe(found)}"


def add_examples(
    db: sqlite_utils.Database, examples: list[NewExample], *, status: str = "approved", source: str = "import",
    reviewer: str | None = None, sensitive_ok: bool = False, team: str | None = None,
) -> tuple[int, int]:
    """Insert examples in one transaction, skipping questions already present. Returns (added, duplicates).

    Approved examples holding secrets or identity numbers are refused unless `sensitive_ok` (a person confirmed
    them; recorded, so training start keeps them); import them as pending to review them instead.
    `team`: they belong to that team (it must exist), None: shared. A duplicate is a question the same team (or
    the shared set) already has.
    """
    _check(status, STATUSES, "status")
    team = require_team(db, team)
    _check(source, SOURCES, "source")
    for n, ex in enumerate(examples, start=1):
        check_example_text(ex.question, ex.answer, ex.input, what=f"example {n} ({_short(ex.question)})")
    confirmed: dict[int, str] = {}
    if status == "approved":
        for n, ex in enumerate(examples, start=1):
            found = blocking_findings(ex.question, ex.answer, ex.input)
            if found and not sensitive_ok:
                raise StoreError(f"example {n} ({_short(ex.question)}) contains {describe(found)}: not approved "
                                 "silently; add it as pending to review it, or redact it")
            if found:
                confirmed[n] = confirmation_hash(ex.question, ex.input, ex.answer)
    added = 0
    stamp = now()
    with write_transaction(db):
        for n, ex in enumerate(examples, start=1):
            cur = db.execute(
                """INSERT INTO examples (question, input, answer, status, source, content_hash, reviewer,
                   reviewed_at, sensitive_confirmed, team, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(content_hash) DO NOTHING""",
                [ex.question, ex.input or "", ex.answer, status, source, example_hash(ex.question, ex.input, team),
                 reviewer, stamp if status != "pending" else None, confirmed.get(n), team, stamp, stamp],
            )
            added += cur.rowcount
    return added, len(examples) - added


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def add_pending_correction(
    db: sqlite_utils.Database, *, interaction_id: int, question: str, corrected_answer: str, rejected_answer: str,
    source: str = "feedback", team: str | None = None,
) -> int:
    """A correction from a 👎 becomes (or updates) a pending example tied to its interaction, of the interaction's
    `team` (feedback from a team's channel belongs to that team).

    When the question (case and spacing aside) already has an example, the correction is its own pending item
    pointing at that example (`disputes_example_id`): a curator's approved answer stays approved, keeps training and
    keeps serving as a verified answer until a curator approves the correction (`review_example` then retires it).
    """
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
        h = example_hash(question, "", team)
        existing = db.execute("SELECT id FROM examples WHERE content_hash = ?", [h]).fetchone()
        disputes = existing[0] if existing else None
        # The question's own hash belongs to the disputed example until the correction is approved; until then
        # the correction holds a hash of its own (unique per interaction).
        own_hash = h if disputes is None else f"{h}:correction:{interaction_id}"
        cur = db.execute(
            """INSERT INTO examples (question, input, answer, status, source, interaction_id, rejected_answer,
               content_hash, disputes_example_id, team, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)""",
            [question, "", corrected_answer, "pending", source, interaction_id, rejected_answer, own_hash, disputes,
             team, stamp, stamp],
        )
        return cur.lastrowid


def get_example(db: sqlite_utils.Database, example_id: int) -> Example:
    rows = list(db["examples"].rows_where("id = ?", [example_id]))
    if not rows:
        raise StoreError(f"no example with id {example_id}")
    return _row(rows[0])


def list_examples(
    db: sqlite_utils.Database, *, status: str | None = None, source: str | None = None, search: str | None = None,
    limit: int | None = None, offset: int = 0, team: str | None = None,
) -> list[Example]:
    """Examples, filtered; `team`: only that team's (store.teams.SHARED: the shared ones); None: every team's."""
    where, args = [], []
    if team:
        condition, team_args = team_filter(team)
        where.append(condition)
        args += team_args
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
    question: str | None = None, note: str | None = None, sensitive_ok: bool = False,
) -> Example:
    """Approve (optionally with an edited answer / question) or reject an example.

    Approving text that holds secrets or identity numbers needs `sensitive_ok` (the curator confirmed it; recorded
    for training start). Approving a correction that disputes an example with the same question retires that
    example (rejected, "replaced by #N"): the correction becomes the question's one approved answer.
    """
    if decision not in ("approved", "rejected", "pending"):
        raise StoreError(f"decision must be approved, rejected or pending, not {decision!r}")
    if answer is not None and not answer.strip():
        raise StoreError("the edited answer is empty")
    with write_transaction(db):
        current = get_example(db, example_id)
        new_question = question.strip() if question else current.question
        new_answer = answer.strip() if answer is not None else current.answer
        stamp = now()
        updates = {
            "status": decision,
            "reviewer": reviewer,
            "reviewed_at": stamp,
            "updated_at": stamp,
            "answer": new_answer,
            "question": new_question,
        }
        canonical = example_hash(new_question, current.input, current.team)
        if new_question != current.question or decision == "approved":
            updates["content_hash"] = canonical
        if decision == "approved":
            check_example_text(new_question, new_answer, current.input, what=f"example #{example_id}")
            found = blocking_findings(new_question, new_answer, current.input)
            if found and not sensitive_ok:
                raise StoreError(f"example #{example_id} contains {describe(found)}: redact it, or confirm that it "
                                 "may train (playground: “approve anyway”; command line: --allow-sensitive)")
            if found:
                updates["sensitive_confirmed"] = confirmation_hash(new_question, current.input, new_answer)
            if current.disputes_example_id is not None:
                _retire_disputed(db, example_id, canonical, reviewer=reviewer, stamp=stamp)
        if note is not None:
            updates["note"] = note
        try:
            db["examples"].update(example_id, updates)
        except Exception as exc:  # the edited question collides with another example
            if "UNIQUE" in str(exc):
                raise StoreError(f"another example already asks {new_question!r}; merge instead") from None
            raise
    return get_example(db, example_id)


def _retire_disputed(db: sqlite_utils.Database, example_id: int, canonical: str, *, reviewer: str, stamp: str) -> None:
    """The example that holds the question's hash steps aside for the approved correction `example_id`."""
    holder = db.execute("SELECT id FROM examples WHERE content_hash = ? AND id != ?", [canonical, example_id]).fetchone()
    if holder is None:
        return
    db.execute(
        """UPDATE examples SET status = 'rejected', content_hash = ?, note = ?, reviewer = ?, reviewed_at = ?,
           updated_at = ? WHERE id = ?""",
        [f"{canonical}:replaced-by:{example_id}", f"replaced by #{example_id}", reviewer, stamp, stamp, holder[0]],
    )


def set_example_team(db: sqlite_utils.Database, example_id: int, team: str | None) -> Example:
    """Move an example to `team` (it must exist) or make it shared (None). Refused when the target already has an
    example with the same question: merge them instead."""
    with write_transaction(db):
        team = require_team(db, team)
        current = get_example(db, example_id)
        if current.team == team:
            return current
        updates = {"team": team, "updated_at": now()}
        if current.disputes_example_id is None or current.status == "approved":  # a pending correction keeps its own
            updates["content_hash"] = example_hash(current.question, current.input, team)
            holder = db.execute("SELECT id FROM examples WHERE content_hash = ? AND id != ?",
                                [updates["content_hash"], example_id]).fetchone()
            if holder:
                whose = f"team {team!r}" if team else "the shared set"
                raise StoreError(f"{whose} already has an example asking {current.question!r} (#{holder[0]}); "
                                 "merge instead")
        db["examples"].update(example_id, updates)
    return get_example(db, example_id)


def disputed_example(db: sqlite_utils.Database, example: Example) -> Example | None:
    """The example a pending correction disputes (approved, usually), or None for an ordinary example."""
    if example.disputes_example_id is None:
        return None
    return get_example(db, example.disputes_example_id)


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
        a = answer if answer is not None else cur.answer
        check_example_text(q, a, i, what=f"example #{example_id}")
        updates = {"question": q, "input": i, "answer": a, "updated_at": now()}
        if (q, i) != (cur.question, cur.input):  # a pending correction keeps its own hash until approved
            updates["content_hash"] = example_hash(q, i, cur.team)
        db["examples"].update(example_id, updates)
    return get_example(db, example_id)


def training_examples(db: sqlite_utils.Database, *, team: str | None = None
                      ) -> tuple[list[Example], list[tuple[Example, str]]]:
    """(the approved examples that may train the adapter of `team` (the shared ones and the team's; None: the
    shared adapter, shared ones only), [(approved example left out, why)]).

    Left out: flagged text (secrets, identity or payment numbers) that nobody confirmed since it was last edited —
    approved before the scan existed, or through a path that did not scan, or caught by a better detector since.
    """
    keep, withheld = [], []
    visible, args = visible_to(team)
    for ex in [_row(r) for r in db.query(f"SELECT * FROM examples WHERE status = 'approved' AND {visible} ORDER BY id",
                                         args)]:
        reason = withheld_reason(ex)
        if reason:
            withheld.append((ex, reason))
        else:
            keep.append(ex)
    return keep, withheld


def approved_snapshot(db: sqlite_utils.Database, *, team: str | None = None) -> tuple[list[Example], str]:
    """The approved examples that may train the adapter of `team` (`training_examples`), in a stable order, and a
    hash that changes whenever any of them does."""
    examples, _ = training_examples(db, team=team)
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
