"""Where a training run starts: from the base, or continuing an earlier adapter.

`plan_continuation` decides for a supervised run (finetune.training.continuation.plan_start: `--from active`, the
default, `base` or a version); `train_continued` trains from the earlier adapter's weights on the new examples
and replayed earlier ones; `preference_start` names the adapter a preference run (kto, dpo) continues. Rank 0
(finetune.registry.candidates) and every helper rank of a job (finetune.jobs.child) start the same way.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import sqlite_utils

from finetune.registry.folders import adapter_folder_problem, read_metadata
from finetune.training.config import SEED_DEFAULTS, TINY_DEFAULTS
from finetune.training.continuation import StartPlan, plan_start, replay_rounds, sizing_for, steps_per_round
from finetune.training.trainer import train_adapter
from store import StoreError
from store import adapters as adapter_rows

# A continued run stops once it has learnt every new answer and keeps this share of the answers its
# starting adapter reproduced (the gate requires 95%; on 9 earlier answers this means all of them).
CONTINUE_RETAIN = 0.98
# On `tiny` the defaults memorise every answer, and a continued run is sized to keep what its adapter
# reproduces: an adapter that reproduces under half of its answers (an --epochs budget too short) is not
# continued. Real bases are not held to it: exact reproduction is not what they are trained for.
CONTINUE_MIN_REPRODUCED_TINY = 0.5


def plan_continuation(db: sqlite_utils.Database, config, *, tiny: bool, active: adapter_rows.Adapter | None,
                      train: list) -> StartPlan:
    """Where a run of `config` on the training split `train` starts (finetune.training.continuation.plan_start):
    `config.start_from` "active" (the default), "base" or a version."""
    requested = config.start_from or "active"
    if requested == "base":
        previous = None
    elif requested == "active":
        previous = active
    else:
        previous = adapter_rows.get_adapter(db, requested)  # an unknown version is the user's error: say so
    trained = read_metadata(Path(previous.path)).get("trained") if previous is not None else None
    method = config.method or (TINY_DEFAULTS if tiny else SEED_DEFAULTS)["method"]
    return plan_start(requested=requested, config=config, method=method, k_passages=config.k_passages,
                      active=active, previous=previous, trained=trained, train=train,
                      folder_problem=adapter_folder_problem(previous) if previous is not None else None,
                      min_reproduced=CONTINUE_MIN_REPRODUCED_TINY if tiny else None)


def preference_start(db: sqlite_utils.Database, config, *, active: adapter_rows.Adapter | None) -> adapter_rows.Adapter:
    """The adapter a preference run (kto, dpo) continues: the active one, or `config.start_from`'s version.
    StoreError when there is none: the votes say which answers are better, not what the knowledge base says, so
    they refine an adapter trained on the approved examples (`kbloop train` first)."""
    requested = config.start_from or "active"
    objective = config.objective
    if requested == "base":
        raise StoreError(f"--objective {objective} continues an adapter; train one on the approved examples first "
                         "(`kbloop train`), or pass --from V")
    previous = active if requested == "active" else adapter_rows.get_adapter(db, requested)
    if previous is None:
        raise StoreError(f"--objective {objective} continues the active adapter and none is active: train one on the "
                         "approved examples (`kbloop train`) and promote it, or pass --from V")
    if previous.base_model != config.base:
        raise StoreError(f"{previous.version} was trained on {previous.base_model}, not {config.base}: "
                         f"--objective {objective} continues an adapter on its own base")
    problem = adapter_folder_problem(previous)
    if problem:
        raise StoreError(problem)
    return previous


def train_continued(config, plan: StartPlan, out_dir: Path, *, tiny: bool, on_step, should_stop):
    """Train from `plan.previous`'s weights on the new examples and replayed samples of the earlier ones
    (finetune.training.continuation), stopping once the new answers are learnt and the earlier ones kept."""
    defaults = TINY_DEFAULTS if tiny else SEED_DEFAULTS
    prev = plan.previous.params or {}

    def pick(name):  # the user's setting, else what the previous adapter was trained with, else the default
        value = getattr(config, name)
        if value is None:
            value = prev.get(name, defaults.get(name))
        return tuple(value) if isinstance(value, list) else value

    sizing = sizing_for(tiny=tiny, learning_rate=pick("learning_rate"))
    run = replace(
        config, method=plan.previous.method, rank=pick("rank"), alpha=pick("alpha"), dropout=pick("dropout"),
        targets=pick("targets"), batch_size=pick("batch_size"), grad_accum=pick("grad_accum"),
        max_length=pick("max_length"), gradient_checkpointing=pick("gradient_checkpointing"),
        learning_rate=config.learning_rate or sizing.learning_rate,
        # One pass over the rounds; the rounds are the budget. A constant rate (the run stops at a check, not
        # at the end of a schedule), warmed up over a tenth of the budget: a fresh Adam state would otherwise
        # move every weight of a converged model by about the learning rate in the first steps.
        epochs=1.0, min_steps=0, warmup=0.1, lr_scheduler="constant_with_warmup",
        stop_reproduced=config.stop_reproduced or CONTINUE_RETAIN,
    )
    data, round_size = replay_rounds(plan.new, plan.old, sizing=sizing, seed=config.seed)
    general = sizing.general_windows * sizing.max_rounds
    round_size += sizing.general_windows
    outcome = train_adapter(
        run, data, out_dir, on_step=on_step, should_stop=should_stop, init_from=Path(plan.previous.path),
        check_examples=plan.old, new_examples=plan.new, general_items=general, in_order=True,
        check_every_steps=steps_per_round(round_size, run.batch_size * run.grad_accum),
    )
    outcome.notes.insert(0, f"continued run: {sizing.max_rounds} rounds at most, each {len(plan.new)} new x "
                            f"{sizing.new_repeats} + {round_size - len(plan.new) * sizing.new_repeats - sizing.general_windows} "
                            f"replayed" + (f" + {sizing.general_windows} general-text windows" if general else "")
                            + f", lr {run.learning_rate:g} constant after a warmup")
    return outcome
