"""The data a candidate is trained and judged on: the approved examples' snapshot, split into training and held-out
examples (finetune.training.data.split_for_training) and built into prompts with retrieved passages.

    split = training_split(db, k_passages=3, team=None)

Rank 0 of a job (finetune.registry.candidates) and every helper rank (finetune.jobs.child) train on its `train`.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils

from finetune.training.data import build_training_examples, split_for_training
from store import StoreError
from store.examples import approved_snapshot, training_examples


@dataclass
class TrainingSplit:
    heldout: list
    train: list
    dataset_hash: str
    dataset_size: int
    k_passages: int
    withheld: str = ""  # which approved examples were left out for holding secrets or personal data, and why
    team: str | None = None  # whose adapter: the shared and this team's examples (store.teams); None: shared only


def training_split(db: sqlite_utils.Database, *, k_passages: int, team: str | None = None) -> TrainingSplit:
    """The approved examples' snapshot split for training (finetune.training.data.split_for_training) and built into
    prompts with `k_passages` retrieved passages. Rank 0 and every helper rank of a job train on its `train`.
    `team`: the snapshot of that team's adapter, the shared and the team's examples, prompts as its questions get
    them (store.teams); None: the shared adapter's, shared rows only."""
    # Without the approved examples the scan flags (store.sensitive).
    examples, digest = approved_snapshot(db, team=team)
    withheld = "; ".join(f"#{ex.id} {why}" for ex, why in training_examples(db, team=team)[1])
    if not examples:
        raise StoreError("no approved examples: import some with `kbloop data import FILE` "
                         "or approve pending ones with `kbloop review`"
                         + (f" (left out as flagged: {withheld})" if withheld else ""))
    # Approved corrections always train; the held-out set is drawn from the rest (split_for_training).
    train, heldout = split_for_training(examples)
    train = build_training_examples(db, train, k=k_passages, team=team)
    heldout = build_training_examples(db, heldout, k=k_passages, team=team)
    return TrainingSplit(heldout=heldout, train=train, dataset_hash=digest, dataset_size=len(examples),
                         k_passages=k_passages, withheld=withheld, team=team)
