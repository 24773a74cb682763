"""Continued training: where a retraining run starts, and what it trains.

    plan = plan_start(requested="active", config=config, method="full", k_passages=0, active=active,
                      previous=active, trained=read_metadata(active_dir)["trained"], train=train)
    if plan.previous:                      # continue from plan.previous's weights
        data, round_size = replay_rounds(plan.new, plan.old, sizing=sizing_for(tiny=True, learning_rate=1e-3),
                                         seed=42)

(finetune.registry.continuing.plan_continuation and train_continued do this for a registered run.)

A retrain after one new approved answer should not start over: it starts from the previous adapter's
weights (LoRA / QLoRA: the adapter, trainable, with its rank and targets; full: the previous model folder)
and trains the examples that are new or changed since that adapter, plus a replay sample of the earlier
ones, drawn afresh each round, so that the earlier answers are rehearsed without reading them all again
(on real bases, a few windows of general text too, against forgetting what the base knew). It stops at the
first round where every new answer and (nearly) every answer the previous adapter reproduced are reproduced
exactly (finetune.training.reproduction.reproduced_examples).

What changed is decided by content: each adapter's metadata lists the hashes (`example_key`) of the
examples it was trained on. A continued run is refused, and the run starts from the base with the reason
said, when the previous adapter was trained on another base, method, passage count, rank, alpha or targets,
when it predates the hashes, or when a question it learnt is no longer approved (a continued run cannot
unlearn it).

Assumptions: the held-out split is by question hash (finetune.training.data.split_heldout), so an example stays on
its side from one run to the next; a changed answer to the same question is "new" (its old answer is
overwritten by training the new one on the same prompt).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from finetune.training.data import TrainingExample


def example_key(ex) -> str:
    """The content hash of a training example: question, context and answer."""
    return _hash(ex.question, ex.input or "", ex.answer)


def question_key(ex) -> str:
    """The hash of what is asked (question and context): an edited answer keeps it."""
    return _hash(ex.question, ex.input or "")


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(p.strip() for p in parts).encode("utf-8")).hexdigest()[:16]


def trained_record(train: Sequence[TrainingExample]) -> list[list[str]]:
    """What an adapter's metadata keeps of its training set: [example_key, question_key] per example."""
    return [[example_key(ex), question_key(ex)] for ex in train]


@dataclass(frozen=True)
class Sizing:
    """How a continued run is sized (see `sizing_for`)."""

    new_repeats: int  # each new example appears this many times per round
    replay_per_round: int  # earlier examples rehearsed per round, drawn afresh
    max_rounds: int  # the budget; the run stops earlier once the answers are reproduced
    learning_rate: float
    general_windows: int = 0  # windows of general text per round (real bases)


def sizing_for(*, tiny: bool, learning_rate: float) -> Sizing:
    """A round is two optimiser steps of batch 8 on `tiny`: a quarter new examples, the rest replayed.

    A fresh Adam state moves every weight by about the learning rate in its first steps, whatever that
    weight's gradient, and a memorised model loses answers to that. Measured on `tiny` from a 330-pair
    adapter, 1 new answer, 4 copies + 12 replayed per round in mixed rounds read in order, warmed up over
    10 steps (a standalone sweep, docs/benchmarks.md): at 0.1x the first training's rate the new answer was
    learnt after 32 steps with 97.7% of 301 earlier answers kept; at 0.05x after 48 steps with 99.3% kept.
    So `tiny` continues at 0.05x. Real bases keep their rate (a LoRA update starts at zero and is low-rank)
    and rehearse general text as well.
    """
    if tiny:
        return Sizing(new_repeats=4, replay_per_round=12, max_rounds=60, learning_rate=0.05 * learning_rate)
    return Sizing(new_repeats=2, replay_per_round=14, max_rounds=20, learning_rate=learning_rate, general_windows=2)


@dataclass(frozen=True)
class StartPlan:
    """Where the run starts: `previous` (an adapter row) to continue from, or None for the base."""

    previous: object | None
    reason: str
    new: list[TrainingExample] = field(default_factory=list)  # new or changed since `previous`
    old: list[TrainingExample] = field(default_factory=list)  # trained by `previous`, unchanged


def _mismatch(previous, config, *, method: str, k_passages: int) -> str | None:
    """Why `config` cannot continue `previous`, or None."""
    params = previous.params or {}
    if params.get("base", previous.base_model) != config.base:
        return f"{previous.version} was trained on base {params.get('base', previous.base_model)}, this run uses {config.base}"
    if previous.method != method:
        return f"{previous.version} was trained with {previous.method}, this run uses {method}"
    prev_k = params.get("k_passages")
    if prev_k is not None and int(prev_k) != k_passages:
        return f"{previous.version} was trained with {prev_k} passages per prompt, this run uses {k_passages}"
    if method != "full":
        for name in ("rank", "alpha", "targets"):
            asked = getattr(config, name)
            if asked is None or asked == "auto":
                continue
            had = params.get(name)
            if isinstance(had, list):
                had = tuple(had)
            if had is not None and asked != had:
                return f"{previous.version} has {name} {had}, this run asks for {asked}"
    return None


def plan_start(*, requested: str | None, config, method: str, k_passages: int, active, previous,
               trained: Sequence[Sequence[str]] | None, train: Sequence[TrainingExample],
               folder_problem: str | None = None, min_reproduced: float | None = None) -> StartPlan:
    """Decide where the run starts.

    `requested` is "active" (None means that), "base" or a version, whose row the caller looked up as
    `previous` (the active adapter for "active"); `trained` is its metadata's `trained_record` (None when it
    has none); `train` the training split of the current approved examples. `min_reproduced`: the share of its
    training answers `previous` must reproduce (its `train_reproduced_exact`) to be continued; None: any.
    """
    if (requested or "active") == "base":
        return StartPlan(None, "training from the base (--from base)")
    if previous is None:
        return StartPlan(None, "training from the base: no adapter is active yet")
    is_active = active is not None and active.version == previous.version
    label = previous.version + (" (active)" if is_active else "")
    why = _mismatch(previous, config, method=method, k_passages=k_passages) or folder_problem
    if why is None and trained is None:
        why = f"{previous.version} does not record which examples it was trained on (it predates continued training)"
    reproduced = (getattr(previous, "metrics", None) or {}).get("train_reproduced_exact")
    if why is None and min_reproduced is not None and reproduced is not None and reproduced < min_reproduced:
        # A continued run keeps what the adapter knows; this one knows too little to be worth keeping, and the
        # attempt would spend its whole budget before the registry trains from the base anyway.
        why = f"{previous.version} reproduces {reproduced:.0%} of its training answers, too few to continue from"
    if why is None:
        known = {key for key, _ in trained}
        new = [ex for ex in train if example_key(ex) not in known]
        old = [ex for ex in train if example_key(ex) in known]
        current = {example_key(ex) for ex in train}
        # An edited answer is a removed key and a new one under the same question: training the new answer on
        # the same prompt overwrites the old. A question that is gone altogether cannot be unlearnt this way.
        asked_again = {question_key(ex) for ex in new}
        gone = {q for key, q in trained if key not in current and q not in asked_again}
        if gone:
            why = (f"{len(gone)} question{'s' if len(gone) != 1 else ''} that {previous.version} learnt "
                   f"{'are' if len(gone) != 1 else 'is'} no longer approved; continuing would keep answering "
                   f"{'them' if len(gone) != 1 else 'it'}")
        else:
            return StartPlan(previous, f"continuing from {label}: {len(new)} new or changed example"
                             f"{'s' if len(new) != 1 else ''}, {len(old)} earlier ones replayed in samples",
                             new=new, old=old)
    return StartPlan(None, f"training from the base, not continuing {label}: {why}")


def replay_rounds(new: Sequence[TrainingExample], old: Sequence[TrainingExample], *, sizing: Sizing,
                  seed: int, general: Sequence[TrainingExample] = ()) -> tuple[list[TrainingExample], int]:
    """The continued run's data, to be read in order: `sizing.max_rounds` rounds, each the new examples
    (repeated), a fresh replay sample of the old ones and, on real bases, general-text items, mixed within
    the round so that every batch rehearses earlier answers beside the new ones. Returns (examples, round size)."""
    rng = random.Random(seed)
    replay = min(len(old), max(sizing.replay_per_round, 4 * len(new)))
    out: list[TrainingExample] = []
    for _ in range(sizing.max_rounds):
        round_ = list(new) * sizing.new_repeats + rng.sample(list(old), replay)
        if general:
            round_ += rng.sample(list(general), min(len(general), sizing.general_windows))
        rng.shuffle(round_)
        out += round_
    round_size = len(new) * sizing.new_repeats + replay + (min(len(general), sizing.general_windows) if general else 0)
    return out, round_size


def steps_per_round(round_size: int, batch: int) -> int:
    return max(1, math.ceil(round_size / batch))
