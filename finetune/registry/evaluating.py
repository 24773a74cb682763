"""Evaluating adapters for the registry: a candidate or a registered version (or the base) loaded as the engine
loads it and measured on a held-out split (finetune.evaluation.metrics); `evaluate_version` measures a registered
version and the adapter answering its team's questions again, and stores the gate's new verdict.

    metrics, verdict = evaluate_version(db, "v3", home=home)
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from finetune.evaluation.gate import GateConfig, GateVerdict, compare_with_active, gate
from finetune.evaluation.metrics import EvalConfig, evaluate, general_text_loss
from finetune.model.loading import load_model_for_inference, resolve_base
from finetune.registry.folders import META_FILE, adapter_folder_problem, read_metadata
from finetune.registry.split import TrainingSplit, training_split
from finetune.training.general_text import load_general_text
from finetune.training.preference import preference_data
from store import StoreError
from store import adapters as adapter_rows
from store.adapters import passages_of
from store.files import write_json_atomic
from store.text import now


def evaluate_model(base_path: str, *, adapter_dir: Path | None, eval_set: TrainingSplit,
                   eval_config: EvalConfig | None = None, base_general_loss: float | None = None,
                   on_progress: Callable[[str], None] | None = None, preference=None) -> dict:
    """Load base (+ adapter, or a full fine-tune folder) as the engine would and evaluate it. `preference`:
    (desirable, undesirable) voted answers whose likelihoods a preference run is judged on."""
    # A full fine-tune's folder is a whole model: load_model_for_inference tells the two apart.
    model, tokenizer = load_model_for_inference(base_path, adapter_path=adapter_dir)
    try:
        return evaluate(model, tokenizer, heldout=eval_set.heldout, train=eval_set.train, config=eval_config,
                        base_general_loss=base_general_loss, on_progress=on_progress, preference=preference)
    finally:
        del model, tokenizer
        gc.collect()


def base_general_loss(base_path: str) -> float | None:
    """The forgetting probe's reference for a full fine-tune (a PEFT model measures it with its adapter off)."""
    model, tokenizer = load_model_for_inference(base_path)
    try:
        cfg = EvalConfig()
        return general_text_loss(model, tokenizer, load_general_text(), max_tokens=cfg.forgetting_tokens,
                                 window=cfg.forgetting_window, batch_size=cfg.loss_batch_size)
    finally:
        del model, tokenizer
        gc.collect()


def evaluate_registered(db, home: Path, adapter: adapter_rows.Adapter | None, base_name: str, eval_set: TrainingSplit,
                        eval_config: EvalConfig | None, on_progress, preference=None) -> dict:
    """Metrics of a registered adapter (or of the base when `adapter` is None) on `eval_set`."""
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
    general = base_general_loss(base_path) if adapter.method == "full" else None
    return evaluate_model(base_path, adapter_dir=Path(adapter.path), eval_set=eval_set,
                          eval_config=eval_config, base_general_loss=general, on_progress=on_progress,
                          preference=preference)


def comparison_record(verdict: GateVerdict, against_metrics: dict) -> dict:
    """What the store keeps of a comparison: enough to re-run the gate at promotion time."""
    return {"against": verdict.against, "against_metrics": _flat(against_metrics), "passed": verdict.passed,
            "reasons": verdict.reasons, "compared_at": now()}


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("gate", "heldout_samples", "reproduced_keys")}


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
        try:
            data = preference_data(db, objective, k_passages=passages_of(adapter), team=adapter.team)
            voted = (data.desirable, data.undesirable)
        except StoreError as exc:  # the votes it learnt from are gone: judged on the held-out set alone
            phase(f"not measuring the voted answers: {exc}")
    phase(f"evaluating {version}")
    metrics = evaluate_registered(db, home, adapter, adapter.base_model, eval_set, eval_config, None, voted)
    phase(f"evaluating {label}")
    against_metrics = evaluate_registered(db, home, against, adapter.base_model, eval_set, eval_config, None, voted)
    compare_with_active(metrics, against_metrics)
    reproduced = metrics.pop("reproduced_keys", None)
    verdict = gate(metrics, against_metrics, config=gate_config, candidate_label=version, active_label=label)
    metrics["gate"] = comparison_record(verdict, against_metrics)
    adapter_rows.update_metrics(db, version, metrics)
    meta_path = Path(adapter.path) / META_FILE
    meta = read_metadata(Path(adapter.path))
    meta.update({"metrics": metrics, "dataset_hash_evaluated": eval_set.dataset_hash, "reproduced_keys": reproduced,
                 "heldout_questions": [ex.question for ex in eval_set.heldout], "evaluated": now()})
    write_json_atomic(meta_path, meta)
    return metrics, verdict
