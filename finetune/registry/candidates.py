"""Candidates: training a new adapter version on the approved examples and evaluating it against the active
adapter, on the same held-out split.

    result = train_candidate(db, home=home, config=TrainConfig(base="tiny"))
    if result.verdict.passed:
        promote(db, result.adapter.version, actor="U123")  # finetune.registry.promotion

A candidate is trained on a snapshot of the approved examples, minus a held-out split chosen by question
hash (so a question is held out for every version alike). The candidate and the active adapter (or the
base model when none is active) are evaluated on the same held-out examples, the gate compares them, and
the adapter folder is moved into `$KBLOOP_HOME/adapters/<version>/` in one rename: until then it lives
in a `.tmp-…` folder beside it, which nothing reads and which the next run deletes if its writer died.
The data is finetune.registry.split; where the run starts, finetune.registry.continuing; the evaluation,
finetune.registry.evaluating; the gate that compares them, finetune.evaluation.gate; the folders,
finetune.registry.folders.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import sqlite_utils

from finetune.evaluation.gate import GateConfig, GateVerdict, compare_with_active, comparison_table, gate
from finetune.evaluation.metrics import EvalConfig
from finetune.model.loading import is_tiny_base, resolve_base
from finetune.registry.continuing import plan_continuation, preference_start, train_continued
from finetune.registry.evaluating import base_general_loss, comparison_record, evaluate_model, evaluate_registered
from finetune.registry.folders import (
    META_FILE,
    adapters_dir,
    check_registrable,
    clean_stale_temp,
    pick_version,
    read_metadata,
    temp_dir,
    vllm_problems,
)
from finetune.registry.split import training_split
from finetune.training.config import prompt_passages
from finetune.training.continuation import StartPlan, trained_record
from finetune.training.preference import preference_data, train_preference
from finetune.training.trainer import train_adapter
from store import StoreError
from store import adapters as adapter_rows
from store.adapters import passages_of
from store.files import publish_dir, write_json_atomic
from store.teams import require_team
from store.text import now


@dataclass(frozen=True)
class CandidateResult:
    adapter: adapter_rows.Adapter
    verdict: GateVerdict
    active: adapter_rows.Adapter | None


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def train_candidate(
    db: sqlite_utils.Database, *, home: Path, config, job_id: int | None = None,
    on_step: Callable | None = None, should_stop: Callable[[], bool] | None = None,
    on_phase: Callable[[str], None] | None = None, eval_config: EvalConfig | None = None,
    gate_config: GateConfig | None = None, team: str | None = None,
) -> CandidateResult:
    """Snapshot -> split -> train (temp folder) -> evaluate candidate and active -> metadata -> rename ->
    register as candidate. Never promotes. `on_phase(text)` hears "training", "evaluating …", "saving".

    `team` (store.teams): a candidate for that team, trained on the shared and the team's examples; it continues,
    and is judged against, what answers the team's questions now: its active adapter, else the shared one."""
    home = Path(home)
    phase = on_phase or (lambda _p: None)
    clean_stale_temp(home)
    check_registrable(config)
    phase("preparing data")
    team = require_team(db, team)
    active = adapter_rows.serving_adapter(db, team)
    objective = getattr(config, "objective", "sft") or "sft"
    start = preference = None
    if objective != "sft":  # what it continues and what it learns from, checked before anything is loaded
        start = preference_start(db, config, active=active)
        if config.k_passages is None:
            config = replace(config, k_passages=passages_of(start))  # asked as the adapter it continues is asked
        preference = preference_data(db, objective, k_passages=config.k_passages, team=team)
    base_path = resolve_base(config.base, home=home, db=db)
    tiny = is_tiny_base(base_path)
    config = replace(config, k_passages=prompt_passages(config, tiny=tiny))
    eval_set = training_split(db, k_passages=config.k_passages, team=team)
    if eval_set.withheld:
        phase(f"preparing data: left out approved examples holding secrets or personal data that no curator "
              f"confirmed: {eval_set.withheld}")
    version = pick_version(db, home, getattr(config, "version", None))
    if preference is not None:
        phase(f"preparing data: {objective} on {preference.describe()}")
        plan = StartPlan(start, f"continuing from {start.version}: {objective} on the votes")
    else:
        plan = plan_continuation(db, config, tiny=tiny, active=active, train=eval_set.train)
    phase(plan.reason)
    voted = (preference.desirable, preference.undesirable) if preference is not None else None

    tmp = temp_dir(home, version)
    try:
        phase("training")
        run_config = replace(config, base=base_path)
        if preference is not None:
            outcome = train_preference(run_config, preference, tmp, init_from=Path(start.path), method=start.method,
                                       on_step=on_step, should_stop=should_stop)
        elif plan.previous is None:
            outcome = train_adapter(run_config, eval_set.train, tmp, on_step=on_step, should_stop=should_stop)
        else:
            outcome = train_continued(run_config, plan, tmp, tiny=tiny, on_step=on_step, should_stop=should_stop)
            if not outcome.stopped_early:
                # The budget ended before the new answers were learnt with the earlier ones kept: such a
                # candidate would fail the gate's retention check, so this run trains from the base instead.
                plan = StartPlan(None, f"training from the base: continuing {plan.previous.version} did not keep "
                                       f"its answers within the budget ({outcome.notes[-1]})")
                phase(plan.reason)
                attempt = [f"continued attempt: {n}" for n in outcome.notes]
                shutil.rmtree(tmp, ignore_errors=True)
                tmp = temp_dir(home, version)
                outcome = train_adapter(run_config, eval_set.train, tmp, on_step=on_step, should_stop=should_stop)
                outcome.notes[:0] = attempt
        outcome.notes.insert(0, plan.reason)
        for leftover in tmp.glob("checkpoint-*"):  # resumable state, not part of the adapter
            shutil.rmtree(leftover, ignore_errors=True)
        used = getattr(outcome, "config", None) or run_config
        method = used.method or "lora"
        if method != "full":
            problems = vllm_problems(tmp)
            if problems:
                raise StoreError(f"the trained adapter cannot be registered: {'; '.join(problems)}")

        phase(f"evaluating {version}")
        general = base_general_loss(base_path) if method == "full" else None
        metrics = evaluate_model(base_path, adapter_dir=tmp, eval_set=eval_set,
                                 eval_config=eval_config, base_general_loss=general, preference=voted)
        against_label = active.version if active else "base"
        phase(f"evaluating {against_label} on the same held-out set")
        try:
            against = evaluate_registered(db, home, active, config.base, eval_set, eval_config, None,
                                           preference=voted)
            compare_with_active(metrics, against)
            verdict = gate(metrics, against, config=gate_config, candidate_label=version, active_label=against_label)
        except Exception as exc:  # a broken active adapter must not cost the new candidate
            against = {}
            verdict = GateVerdict(False, [f"{against_label} could not be evaluated ({exc}); "
                                          "only a forced promotion is possible"],
                                  comparison_table(metrics, {}, candidate_label=version,
                                                   active_label=against_label), against_label)
        metrics["gate"] = comparison_record(verdict, against)
        reproduced = metrics.pop("reproduced_keys", None)

        phase("saving")
        params = used.as_params() if hasattr(used, "as_params") else _jsonable(used)
        params["base"] = config.base
        trained = trained_record(eval_set.train)
        if preference is not None:
            # The adapter it continued decides its shape (rank, alpha, targets); the run's own settings on top.
            params = {**(start.params or {}), **{k: v for k, v in params.items() if v is not None}}
            # It learnt no approved example: a later SFT run continuing it compares with what `start` learnt.
            trained = read_metadata(Path(start.path)).get("trained")
        params["objective"] = objective
        meta = {
            "version": version, "base": config.base, "base_path": base_path, "method": method, "params": params,
            "dataset_hash": eval_set.dataset_hash, "dataset_size": eval_set.dataset_size,
            "n_train": len(eval_set.train), "n_heldout": len(eval_set.heldout),
            "heldout_questions": [ex.question for ex in eval_set.heldout],
            "metrics": metrics, "training": _jsonable({k: v for k, v in vars(outcome).items() if k not in ("config", "out_dir")}),
            "job_id": job_id, "created": now(), "team": team,
            # What continued training compares with next time (finetune.training.continuation).
            "trained": trained, "reproduced_keys": reproduced, "objective": objective,
            "preference_data": preference.describe() if preference is not None else None,
            "continued_from": plan.previous.version if plan.previous else None, "start": plan.reason,
        }
        write_json_atomic(tmp / META_FILE, meta)
        final = adapters_dir(home) / version
        publish_dir(tmp, final)  # flushed, then one rename: the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        adapter = adapter_rows.register_adapter(
            db, version=version, path=str(final), base_model=config.base, method=method, params=params,
            dataset_hash=eval_set.dataset_hash, dataset_size=eval_set.dataset_size, metrics=metrics, job_id=job_id,
            team=team,
        )
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # a folder no row points to would only confuse
        raise
    return CandidateResult(adapter=adapter, verdict=verdict, active=active)
