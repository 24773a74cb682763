"""What the votes and the approved corrections teach: answers labelled by employees' votes (`voted_answers`, KTO
data) and approved corrections paired with the answers they replaced (`correction_pairs`, DPO data). The same
selections feed `kbloop data export --format kto|dpo` and `kbloop train --objective kto|dpo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils

from store.examples import blocking_findings, confirmation_hash
from store.teams import visible_to


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
