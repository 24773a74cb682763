"""Approved examples as searchable knowledge (verified answers): what matching reads, and the embeddings of
approved questions (`example_embeddings`), keyed by the model that made them and the text they were made from.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils

from store.db import write_transaction
from store.text import content_hash


@dataclass(frozen=True)
class ApprovedExample:
    id: int
    question: str
    answer: str
    reviewer: str | None
    reviewed_at: str | None
    source: str
    team: str | None = None  # None: shared; a team's serves only that team's questions (store.teams)


def matching_text_hash(question: str) -> str:
    """The hash an embedding is valid for: an edited question needs a new one."""
    return content_hash(question)


def approved_state(db: sqlite_utils.Database) -> tuple:
    """Changes whenever an approval, an edit or a rejection changes the approved set (cheap: one query)."""
    return tuple(db.execute(
        "SELECT COUNT(*), MAX(updated_at), TOTAL(id) FROM examples WHERE status = 'approved'").fetchone())


def approved_examples(db: sqlite_utils.Database) -> list[ApprovedExample]:
    """Every approved example, of every team: the matcher keeps them all in one index and filters by team per
    question (finetune.serving.verified)."""
    return [ApprovedExample(*row) for row in db.execute(
        "SELECT id, question, answer, reviewer, reviewed_at, source, team FROM examples WHERE status = 'approved' "
        "ORDER BY id")]


def example_embeddings(db: sqlite_utils.Database, model: str) -> dict[int, tuple[str, bytes]]:
    """example id -> (text hash, float32 vector bytes), for embeddings made by `model`."""
    return {row[0]: (row[1], row[2]) for row in db.execute(
        "SELECT example_id, text_hash, vector FROM example_embeddings WHERE model = ?", [model])}


def set_example_embeddings(db: sqlite_utils.Database, model: str, vectors: dict[int, tuple[str, bytes]]) -> None:
    with write_transaction(db):
        for example_id, (text_hash, blob) in vectors.items():
            db.execute(
                """INSERT INTO example_embeddings (example_id, model, text_hash, vector) VALUES (?,?,?,?)
                   ON CONFLICT(example_id) DO UPDATE SET model = excluded.model, text_hash = excluded.text_hash,
                   vector = excluded.vector""",
                [example_id, model, text_hash, blob],
            )
