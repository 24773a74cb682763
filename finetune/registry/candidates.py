"""Candidates: training a new adapter version on the approved examples and evaluating it (and re-evaluating a
registered one) against the active adapter, on the same held-out split.

    result = train_candidate(db, home=home, config=TrainConfig(base="tiny"))
    if result.verdict.passed:
        promote(db, result.adapter.version, actor="U123")  # finetune.registry.promotion

A candidate is trained on a snapshot of the approved examples, minus a held-out split chosen by question
hash (so a question is held out for every version alike). The candidate and the active adapter (or the
base model when none is active) are evaluated on the same held-out examples, the gate compares them, and
the adapter folder is moved into `$KBLOOP_HOME/adapters/<version>/` in one rename: until then it lives
in a `.tmp-…` folder beside it, which nothing reads and which the next run deletes if its writer died.
The gate that compares them is finetune.evaluation.gate; the folders, finetune.registry.folders.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import sqlite_utils

from finetune.evaluation.gate import GateConfig, GateVerdict, compare_with_active, comparison_table, gate
from finetune.evaluation.metrics import EvalConfig, evaluate
from finetune.registry.folders import (
    META_FILE,
    adapter_folder_problem,
    adapters_dir,
    check_registrable,
    clean_stale_temp,
    pick_version,
    read_metadata,
    temp_dir,
    vllm_problems,
)
from finetune.training.continuation import (
    StartPlan,
    plan_start,
    replay_rounds,
    sizing_for,
    steps_per_round,
    trained_record,
)
from store import StoreError
from store import adapters as adapter_rows
from store.examples import approved_snapshot, training_examples
from store.files import publish_dir, write_json_atomic
from store.teams import require_team
from store.text import now

# A continued run stops once it has learnt every new answer and keeps this share of the answers its
# starting adapter reproduced (the gate requires 95%; on 9 earlier answers this means all of them).
CONTINUE_RETAIN = 0.98


@dataclass
class _EvalSet:
    heldout: list
    train: list
    dataset_hash: str
    dataset_size: int
    k_passages: int
    withheld: str = ""  # which approved examples were left out for holding secrets or personal data, and why
    team: str | None = None  # whose adapter: the shared and this team's examples (store.teams); None: shared only


def passages_of(adapter: adapter_rows.Adapter) -> int:
    """Retrieved passages per prompt the adapter was trained with (3 for adapters that predate the record)."""
    k = adapter.params.get("k_passages")
    return 3 if k is None else int(k)


def training_split(db: sqlite_utils.Database, *, k_passages: int, team: str | None = None) -> _EvalSet:
    """The approved examples' snapshot split for training (finetune.training.data.split_for_training) and built into
    prompts with `k_passages` retrieved passages. Rank 0 and every helper rank of a job train on its `train`.
    `team`: the snapshot of that team's adapter, the shared and the team's examples, prompts as its questions get
    them (store.teams); None: the shared adapter's, shared rows only."""
    from finetune.training.data import build_training_examples, split_for_training

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
    return _EvalSet(heldout=heldout, train=train, dataset_hash=digest, dataset_size=len(examples),
                    k_passages=k_passages, withheld=withheld, team=team)


_eval_set = training_split  # the name older callers use


def evaluate_model(base_path: str, *, adapter_dir: Path | None, eval_set: _EvalSet,
                   eval_config: EvalConfig | None = None, base_general_loss: float | None = None,
                   on_progress: Callable[[str], None] | None = None, preference=None) -> dict:
    """Load base (+ adapter, or a full fine-tune folder) as the engine would and evaluate it. `preference`:
    (desirable, undesirable) voted answers whose likelihoods a preference run is judged on."""
    from finetune.model.loading import load_model_for_inference

    # A full fine-tune's folder is a whole model: load_model_for_inference tells the two apart.
    model, tokenizer = load_model_for_inference(base_path, adapter_path=adapter_dir)
    try:
        return evaluate(model, tokenizer, heldout=eval_set.heldout, train=eval_set.train, config=eval_config,
                        base_general_loss=base_general_loss, on_progress=on_progress, preference=preference)
    finally:
        del model, tokenizer
        gc.collect()


def _base_general_loss(base_path: str) -> float | None:
    """The forgetting probe's reference for a full fine-tune (a PEFT model measures it with its adapter off)."""
    from finetune.evaluation.metrics import general_text_loss, load_general_text
    from finetune.model.loading import load_model_for_inference

    model, tokenizer = load_model_for_inference(base_path)
    try:
        cfg = EvalConfig()
        return general_text_loss(model, tokenizer, load_general_text(), max_tokens=cfg.forgetting_tokens,
                                 window=cfg.forgetting_window, batch_size=cfg.loss_batch_size)
    finally:
        del model, tokenizer
        gc.collect()


def _evaluate_registered(db, home: Path, adapter: adapter_rows.Adapter | None, base_name: str, eval_set: _EvalSet,
                         eval_config: EvalConfig | None, on_progress, preference=None) -> dict:
    """Metrics of a registered adapter (or of the base when `adapter` is None) on `eval_set`."""
    from finetune.model.loading import resolve_base

    if adapter is None:
        return evaluate_model(resolve_base(base_name, home=home, db=db), adapter_dir=None,
                              eval_set=eval_set, eval_config=eval_config, on_progress=on_progress,
                              preference=preference)
    problem = adapter_folder_problem(adapter)
    if problem:
        raise StoreError(problem)
    if passages_of(adapter) != eval_set.k_passages:  # each model is asked the way it was trained
        eval_set = training_split(db, k_passages=passages_of(adapter), team=eval_set.team)
    base_path = resolve_base(adapter.base_model, home=home, db=db)
    general = _base_general_loss(base_path) if adapter.method == "full" else None
    return evaluate_model(base_path, adapter_dir=Path(adapter.path), eval_set=eval_set,
                          eval_config=eval_config, base_general_loss=general, on_progress=on_progress,
                          preference=preference)



# --------------------------------------------------------------------------------------------------
# Training a candidate


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



def _comparison_record(verdict: GateVerdict, against_metrics: dict) -> dict:
    """What the store keeps of a comparison: enough to re-run the gate at promotion time."""
    return {"against": verdict.against, "against_metrics": _flat(against_metrics), "passed": verdict.passed,
            "reasons": verdict.reasons, "compared_at": now()}


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("gate", "heldout_samples", "reproduced_keys")}



def plan_continuation(db: sqlite_utils.Database, config, *, tiny: bool, active: adapter_rows.Adapter | None,
                      train: list) -> StartPlan:
    """Where a run of `config` on the training split `train` starts (finetune.training.continuation.plan_start):
    `config.start_from` "active" (the default), "base" or a version."""
    from finetune.training.config import SEED_DEFAULTS, TINY_DEFAULTS

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
                      folder_problem=adapter_folder_problem(previous) if previous is not None else None)


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
    from finetune.training.config import SEED_DEFAULTS, TINY_DEFAULTS
    from finetune.training.trainer import train_adapter

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
    from finetune.model.loading import is_tiny_base, resolve_base
    from finetune.training.config import prompt_passages
    from finetune.training.trainer import train_adapter

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
        from finetune.training.preference import preference_data

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
            from finetune.training.preference import train_preference

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
        general = _base_general_loss(base_path) if method == "full" else None
        metrics = evaluate_model(base_path, adapter_dir=tmp, eval_set=eval_set,
                                 eval_config=eval_config, base_general_loss=general, preference=voted)
        against_label = active.version if active else "base"
        phase(f"evaluating {against_label} on the same held-out set")
        try:
            against = _evaluate_registered(db, home, active, config.base, eval_set, eval_config, None,
                                           preference=voted)
            compare_with_active(metrics, against)
            verdict = gate(metrics, against, config=gate_config, candidate_label=version, active_label=against_label)
        except Exception as exc:  # a broken active adapter must not cost the new candidate
            against = {}
            verdict = GateVerdict(False, [f"{against_label} could not be evaluated ({exc}); "
                                          "only a forced promotion is possible"],
                                  comparison_table(metrics, {}, candidate_label=version,
                                                   active_label=against_label), against_label)
        metrics["gate"] = _comparison_record(verdict, against)
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



# --------------------------------------------------------------------------------------------------
# Re-evaluation


def evaluate_version(db: sqlite_utils.Database, version: str, *, home: Path, eval_config: EvalConfig | None = None,
                     gate_config: GateConfig | None = None,
                     on_phase: Callable[[str], None] | None = None) -> tuple[dict, GateVerdict]:
    """Re-run the evaluation of `version` and of the active adapter (the base when `version` is the active
    one, or none is) on the current held-out split; store both in the store and the metadata file."""
    home = Path(home)
    phase = on_phase or (lambda _p: None)
    adapter = adapter_rows.get_adapter(db, version)
    problem = adapter_folder_problem(adapter)
    if problem:
        raise StoreError(problem)
    eval_set = training_split(db, k_passages=passages_of(adapter), team=adapter.team)
    active = adapter_rows.serving_adapter(db, adapter.team)  # what answers its team's questions now
    against = active if active is not None and active.version != version else None
    label = against.version if against else "base"
    voted = None
    objective = (adapter.params or {}).get("objective", "sft")
    if objective in ("kto", "dpo"):  # judged again on the votes as they are now
        from finetune.training.preference import preference_data

        try:
            data = preference_data(db, objective, k_passages=passages_of(adapter), team=adapter.team)
            voted = (data.desirable, data.undesirable)
        except StoreError as exc:  # the votes it learnt from are gone: judged on the held-out set alone
            phase(f"not measuring the voted answers: {exc}")
    phase(f"evaluating {version}")
    metrics = _evaluate_registered(db, home, adapter, adapter.base_model, eval_set, eval_config, None, voted)
    phase(f"evaluating {label}")
    against_metrics = _evaluate_registered(db, home, against, adapter.base_model, eval_set, eval_config, None, voted)
    compare_with_active(metrics, against_metrics)
    reproduced = metrics.pop("reproduced_keys", None)
    verdict = gate(metrics, against_metrics, config=gate_config, candidate_label=version, active_label=label)
    metrics["gate"] = _comparison_record(verdict, against_metrics)
    adapter_rows.update_metrics(db, version, metrics)
    meta_path = Path(adapter.path) / META_FILE
    meta = read_metadata(Path(adapter.path))
    meta.update({"metrics": metrics, "dataset_hash_evaluated": eval_set.dataset_hash, "reproduced_keys": reproduced,
                 "heldout_questions": [ex.question for ex in eval_set.heldout], "evaluated": now()})
    write_json_atomic(meta_path, meta)
    return metrics, verdict
