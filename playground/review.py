"""Review tab handlers: the queue of voted answers and pending examples, and the curator's decisions.

Pure functions over a database connection and a Viewer; the Gradio layer (review_tab.py) only wires them up.
Queue items are keyed "i:<interaction id>" (an answer with votes / corrections) or "e:<example id>" (a
pending example with no answer behind it, e.g. imported with --status pending).

Nothing is approved by accident: a decision names the status the curator saw and is refused if someone
else decided meanwhile; a text holding secrets or personal data, or an unchanged answer that got 👎
without a correction, needs the explicit "approve anyway" confirmation (or a redaction).

A correction of a question that already has an approved example disputes it: the item carries both answers
(`ReviewItem.disputed`); approving the correction replaces the approved example, `keep_approved` keeps it.

Texts from Slack (questions, answers, corrections) are shown through `safe_markdown`: a correction holding
`![](https://tracker/pixel.gif)` must not make the curator's browser tell an outsider when the item was opened.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import sqlite_utils

from playground.auth import Viewer
from playground.duplicates import Candidate, Match, near_duplicates
from playground.safety import Finding, describe, find_sensitive, redact
from store import StoreError
from store.examples import (
    disputed_example,
    example_questions,
    get_example,
    list_examples,
    merge_example,
    review_example,
    update_example,
)
from store.review import approve_interaction, record_interaction_review, review_counts, review_item, review_items

TO_REVIEW = ("unreviewed", "pending")


@dataclass(frozen=True, kw_only=True)
class QueueFilter:
    vote: str = "all"  # all | up | down
    status: str = "to_review"  # to_review | unreviewed | pending | approved | rejected | merged | all
    channel: str = ""
    since: str = ""  # YYYY-MM-DD
    until: str = ""
    text: str = ""
    team: str = ""  # "": every team's; store.teams.SHARED: those of no team; else that team's


@dataclass(frozen=True)
class DisputedExample:
    """The example a correction disputes: the curated answer it would replace."""

    id: int
    question: str
    answer: str
    status: str
    reviewer: str | None


@dataclass(frozen=True, kw_only=True)
class ReviewItem:
    key: str
    interaction_id: int | None
    example_id: int | None
    question: str
    answer: str  # what the bot said ("" for an example with no answer behind it)
    proposed_answer: str  # what approving stores unless edited: the correction, else the answer
    sources: list[dict]
    up: int
    down: int
    corrections: list[str]
    status: str
    reviewer: str | None
    channel: str | None
    user: str | None
    adapter_version: str | None
    created_at: str
    team: str | None = None  # the team it belongs to (asked in its channel, or imported for it); None: shared
    flags: list[Finding] = field(default_factory=list)
    duplicates: list[Match] = field(default_factory=list)
    disputed: DisputedExample | None = None  # the approved answer this correction would replace


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str
    example_id: int | None = None


def _parse_key(key: str) -> tuple[str, int]:
    kind, _, num = (key or "").partition(":")
    if kind not in ("i", "e") or not num.isdigit():
        raise StoreError(f"no queue item {key!r}; pick one from the queue")
    return kind, int(num)


def _date(value: str, what: str) -> str:
    value = (value or "").strip()
    if value and not (len(value) == 10 and value[4] == "-" and value[7] == "-" and value.replace("-", "").isdigit()):
        raise StoreError(f"{what} must be a date like 2025-06-30, not {value!r}")
    return value


def queue(db: sqlite_utils.Database, flt: QueueFilter, *, limit: int = 200) -> list[dict]:
    """The queue rows matching `flt`: voted answers (👎 and unreviewed first), then pending examples."""
    since, until = _date(flt.since, "from date"), _date(flt.until, "to date")
    rows = []
    for r in review_items(db, vote=flt.vote, status=flt.status, channel_id=flt.channel or None, since=since or None,
                          until=until or None, search=flt.text.strip() or None, limit=limit, team=flt.team or None):
        rows.append({"key": f"i:{r['id']}", "up": r["up"], "down": r["down"], "status": r["status"],
                     "question": r["question"], "corrected": bool(r["corrections"]), "channel": r["channel_id"] or "",
                     "created_at": r["created_at"], "reviewer": r["reviewer"] or "", "team": r["team"] or ""})
    # Pending examples with no answer behind them: no votes or channel, so only without those filters.
    if flt.vote in ("", "all") and not flt.channel and flt.status in ("to_review", "pending", "all", ""):
        for ex in list_examples(db, status="pending", search=flt.text.strip() or None, team=flt.team or None):
            if ex.interaction_id is not None:
                continue
            if (since and ex.created_at[:10] < since) or (until and ex.created_at[:10] > until):
                continue
            rows.append({"key": f"e:{ex.id}", "up": 0, "down": 0, "status": "pending", "question": ex.question,
                         "corrected": False, "channel": "", "created_at": ex.created_at, "reviewer": "",
                         "team": ex.team or ""})
    return rows[:limit]


def counts(db: sqlite_utils.Database) -> dict:
    c = review_counts(db)
    c["pending_examples"] = sum(1 for ex in list_examples(db, status="pending") if ex.interaction_id is None)
    c["left"] += c["pending_examples"]
    return c


def counts_line(db: sqlite_utils.Database) -> str:
    c = counts(db)
    return (f"**{c['left']} left to review** ({c['unreviewed']} unreviewed, {c['pending'] + c['pending_examples']} "
            f"pending corrections) · {c['approved']} approved · {c['rejected']} rejected · {c['merged']} merged")


def open_item(db: sqlite_utils.Database, key: str) -> ReviewItem:
    """Everything a curator needs to decide one item: texts, votes, flags, near-duplicates."""
    kind, num = _parse_key(key)
    if kind == "i":
        r = review_item(db, num)
        proposed = r["example_answer"] if r["example_id"] and r["example_status"] == "pending" else (
            r["corrections"][-1] if r["corrections"] else r["answer"])
        item = dict(key=key, interaction_id=num, example_id=r["example_id"], question=r["question"], answer=r["answer"],
                    proposed_answer=proposed, sources=r["sources"], up=r["up"], down=r["down"],
                    corrections=r["corrections"], status=r["status"], reviewer=r["reviewer"], channel=r["channel_id"],
                    user=r["user_id"], adapter_version=r["adapter_version"], created_at=r["created_at"],
                    team=r["team"])
    else:
        ex = get_example(db, num)
        item = dict(key=key, interaction_id=ex.interaction_id, example_id=ex.id, question=ex.question,
                    answer=ex.rejected_answer or "", proposed_answer=ex.answer, sources=[], up=0, down=0,
                    corrections=[], status=ex.status, reviewer=ex.reviewer, channel=None, user=None,
                    adapter_version=None, created_at=ex.created_at, team=ex.team)
    flags = find_sensitive(item["proposed_answer"]) + [f for c in item["corrections"] for f in find_sensitive(c)]
    item["flags"] = list({(f.kind, f.text): f for f in flags}.values())
    if item["example_id"] is not None:
        old = disputed_example(db, get_example(db, item["example_id"]))
        if old is not None:
            item["disputed"] = DisputedExample(old.id, old.question, old.answer, old.status, old.reviewer)
    item["duplicates"] = duplicates_of(db, item["question"], own_example=item["example_id"],
                                       own_interaction=item["interaction_id"])
    return ReviewItem(**item)


def duplicates_of(db: sqlite_utils.Database, question: str, *, own_example: int | None = None,
                  own_interaction: int | None = None, limit: int = 5) -> list[Match]:
    """Questions already in the dataset, or waiting in the queue, that ask the same thing."""
    candidates = [Candidate("example", i, q, s) for i, q, s in example_questions(db) if i != own_example]
    candidates += [Candidate("queue", r["id"], r["question"], r["status"])
                   for r in review_items(db, status="to_review", limit=2000) if r["id"] != own_interaction]
    return near_duplicates(question, candidates, limit=limit)


def _check_unchanged(db, key: str, expected_status: str | None) -> ReviewItem:
    item = open_item(db, key)
    if expected_status and item.status != expected_status:
        by = f" by {item.reviewer}" if item.reviewer else ""
        raise StoreError(f"{key} changed since you opened it (now {item.status}{by}); reload it before deciding")
    return item


def _warnings(item: ReviewItem, answer: str, question: str) -> list[str]:
    found = find_sensitive(answer) + find_sensitive(question)
    warnings = []
    if found:
        warnings.append(f"it contains {describe(found)}: press Redact, or tick “approve anyway”")
    if item.down and not item.corrections and answer.strip() == item.answer.strip():
        warnings.append("this answer got 👎 and is unchanged: edit it, or tick “approve anyway”")
    return warnings


def approve(db: sqlite_utils.Database, viewer: Viewer, key: str, *, answer: str, question: str | None = None,
            confirm: bool = False, expected_status: str | None = None) -> Outcome:
    """Approve the item with `answer` (the proposed one, or the curator's edit) as a training example."""
    try:
        item = _check_unchanged(db, key, expected_status)
        answer = (answer or "").strip()
        question = (question or "").strip() or item.question
        if not answer:
            return Outcome(False, "the answer is empty: write the right answer before approving")
        warnings = _warnings(item, answer, question)
        if warnings and not confirm:
            return Outcome(False, "Not approved: " + "; ".join(warnings) + ".")
        edited = answer != item.proposed_answer.strip()
        new_q = question if question != item.question else None
        if item.example_id is not None:
            ex = review_example(db, item.example_id, decision="approved", reviewer=viewer.name, answer=answer,
                                question=new_q, sensitive_ok=confirm)
            example_id = ex.id
            if item.interaction_id is not None:
                record_interaction_review(db, item.interaction_id, decision="approved", reviewer=viewer.name,
                                          example_id=example_id)
        else:
            example_id = approve_interaction(db, item.interaction_id, reviewer=viewer.name, answer=answer,
                                             question=new_q, sensitive_ok=confirm)
    except StoreError as exc:
        return Outcome(False, f"Not approved: {exc}")
    how = "with your edit" if edited else "as proposed"
    replaced = ""
    if (item.disputed is not None and item.disputed.status == "approved"
            and get_example(db, item.disputed.id).status == "rejected"):
        replaced = f" It replaces example #{item.disputed.id}, which no longer trains or answers."
    return Outcome(True, f"Approved {key} {how} as example #{example_id}.{replaced}", example_id)


def keep_approved(db: sqlite_utils.Database, viewer: Viewer, key: str, *,
                  expected_status: str | None = None) -> Outcome:
    """Keep the approved answer a correction disputes: the correction is rejected, the approved example untouched."""
    try:
        item = _check_unchanged(db, key, expected_status)
        if item.disputed is None or item.example_id is None:
            return Outcome(False, f"Not kept: {key} does not dispute an approved example; approve or reject it")
        review_example(db, item.example_id, decision="rejected", reviewer=viewer.name,
                       note=f"kept example #{item.disputed.id}")
        if item.interaction_id is not None:
            record_interaction_review(db, item.interaction_id, decision="rejected", reviewer=viewer.name,
                                      example_id=item.example_id)
    except StoreError as exc:
        return Outcome(False, f"Not kept: {exc}")
    return Outcome(True, f"Kept example #{item.disputed.id}'s approved answer; the correction in {key} is rejected.",
                   item.disputed.id)


def reject(db: sqlite_utils.Database, viewer: Viewer, key: str, *, expected_status: str | None = None) -> Outcome:
    """Never train on this item."""
    try:
        item = _check_unchanged(db, key, expected_status)
        if item.example_id is not None and item.status in ("pending", "approved", "rejected"):
            review_example(db, item.example_id, decision="rejected", reviewer=viewer.name)
        if item.interaction_id is not None:
            record_interaction_review(db, item.interaction_id, decision="rejected", reviewer=viewer.name,
                                      example_id=item.example_id)
    except StoreError as exc:
        return Outcome(False, f"Not rejected: {exc}")
    return Outcome(True, f"Rejected {key}.")


def merge(db: sqlite_utils.Database, viewer: Viewer, key: str, into_id: int | str | None, *, answer: str | None = None,
          confirm: bool = False, expected_status: str | None = None) -> Outcome:
    """Fold the item into existing example `into_id`; with `answer`, that example takes it as its answer."""
    try:
        if into_id in (None, ""):
            return Outcome(False, "Not merged: pick the example to merge into")
        into_id = int(str(into_id).lstrip("#").split()[0])
        item = _check_unchanged(db, key, expected_status)
        target = get_example(db, into_id)
        if into_id == item.example_id:
            return Outcome(False, "Not merged: an item cannot be merged into itself")
        if target.status == "rejected":
            return Outcome(False, f"Not merged: example #{into_id} is rejected; pick an approved or pending one")
        answer = (answer or "").strip() or None
        if answer:
            found = find_sensitive(answer)
            if found and not confirm:
                return Outcome(False, f"Not merged: the answer contains {describe(found)}: press Redact, or tick "
                                      "“approve anyway”.")
        if item.example_id is not None and item.status in ("pending", "approved"):
            merge_example(db, item.example_id, into_id, reviewer=viewer.name, answer=answer)
        elif answer:
            update_example(db, into_id, answer=answer)
        if answer and confirm and target.status == "approved":  # record the confirmation for training start
            review_example(db, into_id, decision="approved", reviewer=viewer.name, sensitive_ok=True)
        if item.interaction_id is not None:
            record_interaction_review(db, item.interaction_id, decision="merged", reviewer=viewer.name,
                                      example_id=into_id)
    except (StoreError, ValueError) as exc:
        return Outcome(False, f"Not merged: {exc}")
    took = " and gave it this answer" if answer else ""
    return Outcome(True, f"Merged {key} into example #{into_id}{took}.", into_id)


def redact_answer(text: str) -> tuple[str, str]:
    """(redacted text, what was removed) for the Redact button."""
    found = find_sensitive(text or "")
    if not found:
        return text, "Nothing to redact."
    return redact(text), f"Redacted {describe(found)}."


_IMAGE = re.compile(r"!(?=\[)")


def safe_markdown(text: str | None) -> str:
    """`text` (from Slack, the model or a KB title) ready for a gr.Markdown without loading anything remote.

    Markdown images (`![](url)`, `![][ref]`) lose their `!` meaning, so they show as links a curator may choose to
    follow, and HTML is escaped, so `<img>`, `<picture>` or `style=background:url()` show as text.
    """
    escaped = html.escape(text or "", quote=False)
    return _IMAGE.sub("\\!", escaped)


@dataclass(frozen=True)
class ItemMarkdown:
    """The item panel's Markdown texts, every outside text passed through `safe_markdown`."""

    header: str
    bot_answer: str
    sources: str
    corrections: str
    flags: str
    duplicates: str


def item_markdown(item: ReviewItem) -> ItemMarkdown:
    """What the review panel shows for `item`, including, for a correction that disputes an approved example, both
    answers side by side and what each decision does."""
    esc = safe_markdown
    who = f" · asked by {esc(item.user)}" if item.user else ""
    where = f" in {esc(item.channel)}" if item.channel else ""
    by = f" · decided by {esc(item.reviewer)}" if item.reviewer and item.status not in TO_REVIEW else ""
    header = (f"### {item.key} · {item.status}{by}\n👍 {item.up} · 👎 {item.down}{who}{where} · "
              f"{item.created_at[:16].replace('T', ' ')}"
              + (f" · adapter {esc(item.adapter_version)}" if item.adapter_version else "")
              + (f" · team {esc(item.team)}" if item.team else ""))
    bot_answer = "**The bot's answer:** " + (esc(item.answer) if item.answer else "_none (an imported example)_")
    if item.disputed is not None:
        d = item.disputed
        curated = f"#{d.id}, {d.status}" + (f" by {esc(d.reviewer)}" if d.reviewer else "")

        def cell(text: str) -> str:
            return esc(text).replace("|", "\\|").replace("\n", "<br>")

        meanwhile = ("which keeps training and answering until you decide" if d.status == "approved"
                     else "which is not trained on")
        bot_answer += (
            f"\n\n**This correction disputes example #{d.id}**, {meanwhile}:\n\n"
            f"| example #{d.id}'s answer ({curated}) | the correction |\n|---|---|\n"
            f"| {cell(d.answer)} | {cell(item.proposed_answer)} |\n\n"
            f"Approve: the correction (or your edit of it) replaces #{d.id} · Reject: keep #{d.id}'s answer.")
    sources = ("Sources: " + "; ".join(f"{esc(s.get('title'))} (`{esc(s.get('doc_path'))}`)" for s in item.sources)
               if item.sources else "Sources: none")
    corrections = ("Corrections:\n" + "\n".join(f"- {esc(c)}" for c in item.corrections)
                   if item.corrections else "No corrections.")
    flags = ("⚠️ **Contains secrets or personal data:** " + "; ".join(f"{esc(f.kind)} ({esc(f.preview)})" for f in item.flags)
             + ". Press Redact, or tick “approve anyway”.") if item.flags else ""
    if item.down and not item.corrections:
        flags += ("\n\n" if flags else "") + "⚠️ This answer got 👎 and nobody wrote a correction: edit it before approving."
    dups = "\n".join(f"- {m.candidate.kind} #{m.candidate.id} ({m.candidate.status}, {m.score:.0%} alike): "
                     f"{esc(m.candidate.question)}" for m in item.duplicates) or "No near-duplicates."
    return ItemMarkdown(header, bot_answer, sources, corrections, flags, "Near-duplicates:\n" + dups)
