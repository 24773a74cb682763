"""Sizing a training run: its step budget, how extra items are spread through it, and the early stop.

A run lasts `epochs`, but at least `min_steps` optimiser steps (`run_budget`), and stops early at the first check
where `stop_reproduced` of the answers are reproduced exactly (`ReproductionStop`: one teacher-forced forward pass,
finetune.training.reproduction, no generation). Checks run at epoch ends (or every `check_every_steps`) once the
loss is low. finetune.training.trainer.train_adapter wires these into a run.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from finetune.training.config import TrainConfig
from finetune.training.data import TrainingExample
from finetune.training.reproduction import reproduced_examples


@dataclass(frozen=True)
class RunBudget:
    epochs: float
    steps: int
    note: str  # why the epochs differ from the config's, or ""


def run_budget(config: TrainConfig, n_encoded: int, *, world: int | None = None) -> RunBudget:
    """The run's length: `config.epochs`, raised to reach `config.min_steps` optimiser steps on small sets."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, math.ceil(n_encoded / (config.batch_size * config.grad_accum * world)))
    epochs = config.epochs
    note = ""
    if config.min_steps and per_epoch * epochs < config.min_steps:
        epochs = math.ceil(config.min_steps / per_epoch)
        note = (f"{n_encoded} examples make {per_epoch} step{'s' if per_epoch > 1 else ''} per epoch: "
                f"{config.epochs:g} epochs would be {math.ceil(per_epoch * config.epochs)} steps, fewer than the "
                f"minimum {config.min_steps}; training up to {epochs:g} epochs ({per_epoch * epochs} steps)")
    return RunBudget(epochs=float(epochs), steps=max(1, math.ceil(per_epoch * epochs)), note=note)


def spread(items: list, extra: list) -> list:
    """`items` with `extra` inserted at even intervals (in-order runs meet them throughout, not at the end)."""
    if not extra:
        return list(items)
    out, every = [], len(items) / len(extra)
    for i, item in enumerate(extra):
        out += items[round(i * every) : round((i + 1) * every)] + [item]
    return out


def unique_examples(examples: Sequence[TrainingExample]) -> list[TrainingExample]:
    seen, out = set(), []
    for ex in examples:
        key = (ex.question, ex.input, ex.answer)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


class ReproductionStop:
    """Trainer callback: at each epoch end (or every `every_steps`), once the loss is low, check which answers
    are reproduced; stop when all `new` ones and `target` of `check` are.

    The new examples (a continued run's) are checked first, alone: until they are learnt, the whole set
    need not be read.
    """

    LOSS_TO_CHECK = 0.5  # mean training loss since the last check; above it, answers cannot all be exact yet

    def __init__(self, model, head_weight, *, pad_id: int, target: float, check: list[dict], new: list[dict],
                 every_steps: int | None, retention: bool = False):
        from transformers import TrainerCallback

        self.model, self.head_weight, self.pad_id = model, head_weight, pad_id
        self.target, self.check, self.new, self.every_steps = target, check, new, every_steps
        self.last_share: float | None = None
        self.new_learnt: float | None = None  # share of the new answers reproduced at the final check
        self.checks = 0
        self.check_s = 0.0
        self.stopped = False
        self._losses: list[float] = []
        # Continuing: which check answers the starting weights reproduce; the share is of those kept.
        self.retention = retention
        self.baseline: list[bool] | None = None
        stop = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if stop.retention and stop.baseline is None:
                    stop.baseline = stop._hits(stop.check)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    stop._losses.append(float(logs["loss"]))

            def on_step_end(self, args, state, control, **kw):
                if stop.every_steps and state.global_step % stop.every_steps == 0 \
                        and state.global_step < state.max_steps:
                    stop._maybe_stop(control)

            def on_epoch_end(self, args, state, control, **kw):
                if not stop.every_steps and state.global_step < state.max_steps:
                    stop._maybe_stop(control)

        self.callback = Callback()

    def _maybe_stop(self, control) -> None:
        losses, self._losses = self._losses, []
        if not losses or sum(losses) / len(losses) > self.LOSS_TO_CHECK:
            return
        t0 = time.monotonic()
        self.checks += 1
        try:
            if self.new and not all(reproduced_examples(self.model, self.new, pad_id=self.pad_id,
                                                        head_weight=self.head_weight)):
                return
            self.last_share = self._share(self._hits(self.check))
            if self.last_share >= self.target:
                self.stopped = control.should_training_stop = True
        finally:
            self.check_s += time.monotonic() - t0

    def final_check(self) -> None:
        t0 = time.monotonic()
        self.last_share = self._share(self._hits(self.check))
        if self.new:
            self.new_learnt = sum(self._hits(self.new)) / len(self.new)
        self.checks += 1
        self.check_s += time.monotonic() - t0

    def _hits(self, encoded: list[dict]) -> list[bool]:
        return reproduced_examples(self.model, encoded, pad_id=self.pad_id, head_weight=self.head_weight)

    def _share(self, hits: list[bool]) -> float:
        if self.baseline is not None:
            kept = [h for h, b in zip(hits, self.baseline) if b]
            return sum(kept) / len(kept) if kept else 1.0
        return sum(hits) / len(hits) if hits else 1.0

    def summary(self, *, steps: int, budget: int) -> str:
        share = "n/a" if self.last_share is None else f"{100 * self.last_share:.1f}%"
        if self.baseline is not None:
            what = (f"{share} of the {sum(self.baseline)} earlier answers the starting weights reproduced "
                    f"still reproduced")
        else:
            what = f"{share} of the {len(self.check)} training answers reproduced exactly"
        if self.new:
            learnt = "all" if self.stopped else ("n/a" if self.new_learnt is None else f"{100 * self.new_learnt:.0f}%")
            what += f", {learnt} of the {len(self.new)} new ones learnt"
        how = f"target {100 * self.target:.0f}%; {self.checks} checks, {self.check_s:.0f} s"
        if self.stopped:
            return f"stopped at step {steps} of {budget}: {what} ({how})"
        return f"trained the whole budget ({steps} steps): at the end {what} ({how})"
