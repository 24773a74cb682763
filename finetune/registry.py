"""The adapter registry: training a candidate, the promotion gate, promote and rollback.

    result = train_candidate(db, home=home, config=TrainConfig(base="tiny"))
    if result.verdict.passed:
        promote(db, result.adapter.version, actor="U123")

A candidate is trained on a snapshot of the approved examples, minus a held-out split chosen by question
hash (so a question is held out for every version alike). The candidate and the active adapter (or the
base model when none is active) are evaluated on the same held-out examples, the gate compares them, and
the adapter folder is moved into `$KBLOOP_HOME/adapters/<version>/` in one rename: until then it lives
in a `.tmp-…` folder beside it, which nothing reads and which the next run deletes if its writer died.

Adapter folders are PEFT format, loadable by `PeftModel.from_pretrained` and by vLLM: LoRA on the
attention and MLP projections only, no `modules_to_save`, no DoRA, no bias, rank at most 64 (`MAX_RANK`).
Beside the weights: the tokenizer and `kbloop_adapter.json` (version, base, method, params, dataset
hash and size, metrics, the gate's comparison, created).

The gate (`gate`, `GateConfig`): the candidate passes when, on the held-out set, against the active
adapter (or the base):
- its answer-token loss is at most the active's x (1 + `loss_rel_tolerance`),
- its exact match and token F1 are at most `score_tolerance` (absolute) below the active's,
- its stop rate (generations ending with the end-of-turn token) is at most `stop_tolerance` below;
  a score or stop-rate drop fails only with evidence: paired over the same questions, the answers the
  candidate got worse outnumber those it got better by more than chance explains (one-sided sign test,
  p < `evidence_p`); on 12 held-out questions, 1 or 2 answers lost and none won is not evidence, 5 of 5 is;
- it still reproduces at least `min_retained` (95%) of the training answers the active adapter reproduces
  exactly, when the active reproduces at least `retention_min_answers` of them (a continued run must not
  forget; a from-scratch run must not lose what the active knew);
and the held-out set is not empty. Training reproduction and the forgetting probe (general-text loss against
the base, and against the active adapter: `forgetting_vs_active`) are reported beside it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import sqlite_utils

from finetune.continuation import StartPlan, plan_start, replay_rounds, sizing_for, steps_per_round, trained_record
from finetune.evaluation import EvalConfig, evaluate, format_value, metric_kind, metric_label, text_table
from finetune.processes import pid_alive
from store import ConfigError, StoreError
from store import adapters as adapter_rows
from store.audit import record_audit
from store.examples import approved_snapshot, training_examples
from store.files import publish_dir, write_json_atomic
from store.text import now

META_FILE = "kbloop_adapter.json"
TMP_PREFIX = ".tmp-"
# vLLM serves LoRA on these projections (Qwen2 / Llama naming) and nothing else without extra flags.
VLLM_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
MAX_RANK = 64
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A continued run stops once it has learnt every new answer and keeps this share of the answers its
# starting adapter reproduced (the gate requires 95%; on 9 earlier answers this means all of them).
CONTINUE_RETAIN = 0.98


# --------------------------------------------------------------------------------------------------
# The gate


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    loss_rel_tolerance: float = 0.02  # candidate loss may exceed the active's by 2 %
    score_tolerance: float = 0.02  # exact match / token F1 may be 2 points lower (absolute, 0..1)
    stop_tolerance: float = 0.0  # the stop rate may not drop at all
    # Of the training answers the active adapter reproduces exactly, the candidate must keep this share, once the
    # active reproduces at least `retention_min_answers` (fewer say little: a real base reproduces few exactly).
    min_retained: float = 0.95
    retention_min_answers: int = 10
    # A drop beyond the tolerances fails only when the paired sign test says it is not chance (p below this).
    evidence_p: float = 0.05


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str]
    table: str  # candidate vs active with deltas, aligned text (Slack puts it in a code block)
    against: str = "base"  # the version compared with, or "base"


# (metric key, direction): +1 = higher is better, -1 = lower is better, 0 = reported only. Labels and formats
# are finetune.evaluation.METRIC_LABELS.
_TABLE_ROWS = (
    ("heldout_loss", -1),
    ("heldout_exact_match", +1),
    ("heldout_token_f1", +1),
    ("stop_rate", +1),
    ("train_reproduced", 0),
    ("train_reproduced_exact", 0),
    ("retained_vs_active", 0),
    ("forgetting_adapter_loss", 0),
    ("forgetting_delta", 0),
)


def gate(candidate_metrics: dict, active_metrics: dict, *, config: GateConfig | None = None,
         candidate_label: str = "candidate", active_label: str = "active") -> GateVerdict:
    """Is the candidate no worse than the active adapter (or base) on the held-out set? See module docstring."""
    config = config or GateConfig()
    c, a = candidate_metrics or {}, active_metrics or {}
    failures: list[str] = []
    notes: list[str] = []  # drops within chance: said, not failed
    if not c.get("n_heldout"):
        failures.append("no held-out examples: nothing shows the candidate is no worse "
                        "(approve more examples, or force the promotion)")
    else:
        cl, al = c.get("heldout_loss"), a.get("heldout_loss")
        if cl is None:
            failures.append("the candidate's held-out loss could not be measured")
        elif al is not None and cl > al * (1 + config.loss_rel_tolerance):
            failures.append(f"held-out loss {cl:.3f} is higher than {active_label}'s {al:.3f} "
                            f"(more than {100 * config.loss_rel_tolerance:.0f}% worse)")
        for key, field, label in (("heldout_exact_match", "em", "exact match"), ("heldout_token_f1", "f1", "token F1")):
            cv, av = c.get(key), a.get(key)
            if cv is None:
                failures.append(f"the candidate's held-out {label} could not be measured")
            elif av is not None and cv < av - config.score_tolerance:
                worse, better, p = paired_sign_test(c.get("paired"), a.get("paired"), field)
                if p is None or p < config.evidence_p:
                    failures.append(f"held-out {label} {100 * cv:.1f}% is below {active_label}'s {100 * av:.1f}% "
                                    f"(more than {100 * config.score_tolerance:.0f} points lower"
                                    + (f"; {worse} answers worse, {better} better, p={p:.3f})" if p is not None else ")"))
                else:
                    notes.append(f"held-out {label} {100 * cv:.1f}% vs {active_label}'s {100 * av:.1f}%: {worse} "
                                 f"answers worse, {better} better, within chance (p={p:.2f})")
        retained, n_before = c.get("retained_vs_active"), c.get("n_active_reproduced") or 0
        if retained is not None and n_before >= config.retention_min_answers and retained < config.min_retained:
            failures.append(f"reproduces {100 * retained:.1f}% of the {n_before} training answers {active_label} "
                            f"reproduces (at least {100 * config.min_retained:.0f}% must be kept)")
        cs, as_ = c.get("stop_rate"), a.get("stop_rate")
        if cs is not None and as_ is not None and cs < as_ - config.stop_tolerance:
            worse, better, p = paired_sign_test(_stops(c), _stops(a), "stopped")
            if p is None or p < config.evidence_p:
                failures.append(f"stops at the end of its turn in {100 * cs:.1f}% of answers, "
                                f"{active_label} in {100 * as_:.1f}%"
                                + (f" ({worse} fewer answers stop, {better} more, p={p:.3f})" if p is not None else ""))
            else:
                notes.append(f"stops in {100 * cs:.1f}% of answers vs {active_label}'s {100 * as_:.1f}%: {worse} "
                             f"fewer stop, {better} more, within chance (p={p:.2f})")
    table = comparison_table(c, a, candidate_label=candidate_label, active_label=active_label)
    if failures:
        return GateVerdict(False, failures, table, active_label)
    kept = (f"; keeps {100 * c['retained_vs_active']:.1f}% of the {c['n_active_reproduced']} answers "
            f"{active_label} reproduces" if c.get("retained_vs_active") is not None else "")
    return GateVerdict(True, [f"no worse than {active_label} on held-out loss, exact match, token F1 and stop rate "
                              f"({c.get('n_heldout')} held-out examples){kept}", *notes], table, active_label)


def paired_sign_test(candidate: dict | None, active: dict | None, field: str) -> tuple[int, int, float | None]:
    """(answers worse, answers better, one-sided sign-test p of that many or more worse by chance) over the
    questions both were asked; p is None when either side has no per-question record (older metadata), and
    the gate then goes by the tolerances alone."""
    if not candidate or not active:
        return 0, 0, None
    worse = better = 0
    for question, mine in candidate.items():
        theirs = active.get(question)
        if theirs is None:
            continue
        cv, av = float(mine[field]), float(theirs[field])
        worse += cv < av
        better += cv > av
    n = worse + better
    p = sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n if n else 1.0
    return worse, better, p


def _stops(metrics: dict) -> dict | None:
    """Per question, whether the answer stopped: held-out and sampled training questions alike."""
    if metrics.get("paired") is None:
        return None
    stops = {q: {"stopped": r["stopped"]} for q, r in metrics["paired"].items()}
    stops.update({q: {"stopped": v} for q, v in (metrics.get("paired_stops") or {}).items()})
    return stops


def comparison_table(candidate: dict, active: dict, *, candidate_label: str = "candidate",
                     active_label: str = "active") -> str:
    """Aligned text: metric, candidate, active, delta, and for gated metrics whether it is better or worse."""
    header = ("metric", candidate_label, active_label, "delta", "")
    rows = [header]
    for key, direction in _TABLE_ROWS:
        cv, av = candidate.get(key), active.get(key)
        delta, mark = "", ""
        if cv is not None and av is not None:
            d = cv - av
            delta = f"{100 * d:+.1f}" if metric_kind(key) == "pct" else f"{d:+.3f}"
            if direction and abs(d) > 1e-9:
                mark = "better" if d * direction > 0 else "worse"
        rows.append((metric_label(key), format_value(key, cv), format_value(key, av), delta, mark))
    rows.append(("held-out examples", str(candidate.get("n_heldout", 0)), str(active.get("n_heldout", 0)), "", ""))
    return text_table(rows, align="lrrrl")


def _comparison_record(verdict: GateVerdict, against_metrics: dict) -> dict:
    """What the store keeps of a comparison: enough to re-run the gate at promotion time."""
    return {"against": verdict.against, "against_metrics": _flat(against_metrics), "passed": verdict.passed,
            "reasons": verdict.reasons, "compared_at": now()}


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("gate", "heldout_samples", "reproduced_keys")}


def compare_with_active(candidate: dict, active: dict) -> None:
    """Add to the candidate's metrics what it kept of the active adapter (or base): the share of the training
    answers the active reproduces exactly that the candidate still reproduces, and the general-text loss
    delta between the two (the forgetting probe against the previous adapter, not only the base)."""
    before, after = active.get("reproduced_keys"), candidate.get("reproduced_keys")
    if before is not None and after is not None:
        kept = set(after)
        candidate["n_active_reproduced"] = len(before)
        candidate["retained_vs_active"] = (sum(k in kept for k in before) / len(before)) if before else None
    ca, aa = candidate.get("forgetting_adapter_loss"), active.get("forgetting_adapter_loss")
    candidate["forgetting_vs_active"] = round(ca - aa, 6) if ca is not None and aa is not None else None


def stored_verdict(db: sqlite_utils.Database, adapter: adapter_rows.Adapter, *,
                   config: GateConfig | None = None) -> GateVerdict:
    """The gate, recomputed from the adapter's stored comparison; fails when that comparison is stale
    (another adapter became active since it was made)."""
    current = adapter_rows.active_adapter(db)
    current_label = current.version if current else "base"
    comparison = adapter.metrics.get("gate")
    if not comparison:
        return GateVerdict(False, [f"{adapter.version} has not been compared with {current_label}; "
                                   f"run `kbloop eval {adapter.version}`"], "", current_label)
    verdict = gate(adapter.metrics, comparison["against_metrics"], config=config,
                   candidate_label=adapter.version, active_label=comparison["against"])
    if comparison["against"] != current_label:
        return GateVerdict(False, [f"{adapter.version} was compared with {comparison['against']}, but "
                                   f"{current_label} is active now; run `kbloop eval {adapter.version}` "
                                   "to compare again"] + (verdict.reasons if not verdict.passed else []),
                           verdict.table, comparison["against"])
    return verdict


# --------------------------------------------------------------------------------------------------
# Folders


def adapters_dir(home: Path) -> Path:
    return Path(home) / "adapters"


def clean_stale_temp(home: Path) -> list[Path]:
    """Delete `.tmp-*` folders whose writer is gone (a crash or a full disk mid-write). Returns them."""
    removed = []
    root = adapters_dir(home)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
            continue
        parts = entry.name[len(TMP_PREFIX):].split("-")
        pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
        if pid is not None and (pid == os.getpid() or pid_alive(pid)):
            continue  # its writer is still running
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _temp_dir(home: Path, label: str) -> Path:
    root = adapters_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{TMP_PREFIX}{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def read_metadata(adapter_dir: Path) -> dict:
    try:
        return json.loads((Path(adapter_dir) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def vllm_problems(adapter_dir: Path, *, max_rank: int = MAX_RANK) -> list[str]:
    """Why vLLM (or plain PEFT) could not load this adapter folder; empty when it can."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        return [f"{adapter_dir}: no adapter_config.json"]
    if not (adapter_dir / ADAPTER_WEIGHTS).exists():
        return [f"{adapter_dir}: no {ADAPTER_WEIGHTS}"]
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (vLLM loads only LoRA weights)")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        problems.append(f"target_modules is a pattern ({targets!r}), not a list of module names")
    else:
        extra = sorted(set(targets) - VLLM_TARGETS)
        if extra:
            problems.append(f"target modules {extra} are not attention/MLP projections vLLM serves")
    rank = cfg.get("r") or 0
    if rank > max_rank:
        problems.append(f"rank {rank} is above {max_rank}")
    if cfg.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (vLLM expects bias='none')")
    return problems


def adapter_folder_problem(adapter: adapter_rows.Adapter) -> str | None:
    """None when the registered folder looks loadable, else a one-line reason."""
    path = Path(adapter.path)
    if not path.is_dir():
        return f"adapter {adapter.version}'s folder {path} is missing"
    if adapter.method == "full":
        return None if (path / "config.json").exists() else f"{path}: no config.json (full model expected)"
    if not (path / "adapter_config.json").exists() or not (path / ADAPTER_WEIGHTS).exists():
        return f"{path}: incomplete adapter folder (adapter_config.json / {ADAPTER_WEIGHTS} missing)"
    return None


# --------------------------------------------------------------------------------------------------
# Evaluating registered or freshly trained models


@dataclass
class _EvalSet:
    heldout: list
    train: list
    dataset_hash: str
    dataset_size: int
    k_passages: int
    withheld: str = ""  # which approved examples were left out for holding secrets or personal data, and why


def passages_of(adapter: adapter_rows.Adapter) -> int:
    """Retrieved passages per prompt the adapter was trained with (3 for adapters that predate the record)."""
    k = adapter.params.get("k_passages")
    return 3 if k is None else int(k)


def training_split(db: sqlite_utils.Database, *, k_passages: int) -> _EvalSet:
    """The approved examples' snapshot split for training (finetune.data.split_for_training) and built into
    prompts with `k_passages` retrieved passages. Rank 0 and every helper rank of a job train on its `train`."""
    from finetune.data import build_training_examples, split_for_training

    examples, digest = approved_snapshot(db)  # without the approved examples the scan flags (store.sensitive)
    withheld = "; ".join(f"#{ex.id} {why}" for ex, why in training_examples(db)[1])
    if not examples:
        raise StoreError("no approved examples: import some with `kbloop data import FILE` "
                         "or approve pending ones with `kbloop review`"
                         + (f" (left out as flagged: {withheld})" if withheld else ""))
    # Approved corrections always train; the held-out set is drawn from the rest (split_for_training).
    train, heldout = split_for_training(examples)
    train = build_training_examples(db, train, k=k_passages)
    heldout = build_training_examples(db, heldout, k=k_passages)
    return _EvalSet(heldout=heldout, train=train, dataset_hash=digest, dataset_size=len(examples),
                    k_passages=k_passages, withheld=withheld)


_eval_set = training_split  # the name older callers use


def evaluate_model(base_path: str, *, adapter_dir: Path | None, eval_set: _EvalSet,
                   eval_config: EvalConfig | None = None, base_general_loss: float | None = None,
                   on_progress: Callable[[str], None] | None = None) -> dict:
    """Load base (+ adapter, or a full fine-tune folder) as the engine would and evaluate it."""
    from finetune.models import load_model_for_inference

    # A full fine-tune's folder is a whole model: load_model_for_inference tells the two apart.
    model, tokenizer = load_model_for_inference(base_path, adapter_path=adapter_dir)
    try:
        return evaluate(model, tokenizer, heldout=eval_set.heldout, train=eval_set.train, config=eval_config,
                        base_general_loss=base_general_loss, on_progress=on_progress)
    finally:
        del model, tokenizer
        gc.collect()


def _base_general_loss(base_path: str) -> float | None:
    """The forgetting probe's reference for a full fine-tune (a PEFT model measures it with its adapter off)."""
    from finetune.evaluation import general_text_loss, load_general_text
    from finetune.models import load_model_for_inference

    model, tokenizer = load_model_for_inference(base_path)
    try:
        cfg = EvalConfig()
        return general_text_loss(model, tokenizer, load_general_text(), max_tokens=cfg.forgetting_tokens,
                                 window=cfg.forgetting_window, batch_size=cfg.loss_batch_size)
    finally:
        del model, tokenizer
        gc.collect()


def _evaluate_registered(db, home: Path, adapter: adapter_rows.Adapter | None, base_name: str, eval_set: _EvalSet,
                         eval_config: EvalConfig | None, on_progress) -> dict:
    """Metrics of a registered adapter (or of the base when `adapter` is None) on `eval_set`."""
    from finetune.models import resolve_base

    if adapter is None:
        return evaluate_model(resolve_base(base_name, home=home, db=db), adapter_dir=None,
                              eval_set=eval_set, eval_config=eval_config, on_progress=on_progress)
    problem = adapter_folder_problem(adapter)
    if problem:
        raise StoreError(problem)
    if passages_of(adapter) != eval_set.k_passages:  # each model is asked the way it was trained
        eval_set = training_split(db, k_passages=passages_of(adapter))
    base_path = resolve_base(adapter.base_model, home=home, db=db)
    general = _base_general_loss(base_path) if adapter.method == "full" else None
    return evaluate_model(base_path, adapter_dir=Path(adapter.path), eval_set=eval_set,
                          eval_config=eval_config, base_general_loss=general, on_progress=on_progress)


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


def _pick_version(db: sqlite_utils.Database, home: Path, requested: str | None) -> str:
    if requested is not None:
        if not VERSION_RE.match(requested):
            raise StoreError(f"adapter version {requested!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        known = {a.version for a in adapter_rows.list_adapters(db)}
        if requested in known or (adapters_dir(home) / requested).exists():
            raise StoreError(f"adapter version {requested!r} already exists; choose another")
        return requested
    return next_free_version(db, home)


def next_free_version(db: sqlite_utils.Database, home: Path) -> str:
    """The version the next run registers as when none is asked for: v1, v2, … (store.adapters.next_version),
    past any folder left by a crash between rename and registration, which keeps its number."""
    version = adapter_rows.next_version(db)
    while (adapters_dir(home) / version).exists():
        version = f"v{int(version[1:]) + 1}"
    return version


def check_registrable(config) -> None:
    """Refuse, before any training, what the registry could not register: adapters vLLM cannot serve."""
    rank = config.rank
    if isinstance(rank, int) and rank > MAX_RANK:
        raise ConfigError(f"rank {rank} is above {MAX_RANK}, the largest the registry accepts "
                         "(vLLM's LoRA serving limit); choose a smaller rank or --method full")
    targets = config.targets
    if isinstance(targets, (tuple, list)):
        extra = sorted(set(targets) - VLLM_TARGETS)
        if extra:
            raise ConfigError(f"target modules {', '.join(extra)} cannot be served by vLLM; "
                             f"use some of {', '.join(sorted(VLLM_TARGETS))} or all-linear")


def plan_continuation(db: sqlite_utils.Database, config, *, tiny: bool, active: adapter_rows.Adapter | None,
                      train: list) -> StartPlan:
    """Where a run of `config` on the training split `train` starts (finetune.continuation.plan_start):
    `config.start_from` "active" (the default), "base" or a version."""
    from finetune.config import SEED_DEFAULTS, TINY_DEFAULTS

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


def train_continued(config, plan: StartPlan, out_dir: Path, *, tiny: bool, on_step, should_stop):
    """Train from `plan.previous`'s weights on the new examples and replayed samples of the earlier ones
    (finetune.continuation), stopping once the new answers are learnt and the earlier ones kept."""
    from finetune.config import SEED_DEFAULTS, TINY_DEFAULTS
    from finetune.training import train_adapter

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
    gate_config: GateConfig | None = None,
) -> CandidateResult:
    """Snapshot -> split -> train (temp folder) -> evaluate candidate and active -> metadata -> rename ->
    register as candidate. Never promotes. `on_phase(text)` hears "training", "evaluating …", "saving"."""
    from finetune.config import prompt_passages
    from finetune.models import is_tiny_base, resolve_base
    from finetune.training import train_adapter

    home = Path(home)
    phase = on_phase or (lambda _p: None)
    clean_stale_temp(home)
    check_registrable(config)
    phase("preparing data")
    base_path = resolve_base(config.base, home=home, db=db)
    tiny = is_tiny_base(base_path)
    config = replace(config, k_passages=prompt_passages(config, tiny=tiny))
    eval_set = training_split(db, k_passages=config.k_passages)
    if eval_set.withheld:
        phase(f"preparing data: left out approved examples holding secrets or personal data that no curator "
              f"confirmed: {eval_set.withheld}")
    version = _pick_version(db, home, getattr(config, "version", None))
    active = adapter_rows.active_adapter(db)
    plan = plan_continuation(db, config, tiny=tiny, active=active, train=eval_set.train)
    phase(plan.reason)

    tmp = _temp_dir(home, version)
    try:
        phase("training")
        run_config = replace(config, base=base_path)
        if plan.previous is None:
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
                tmp = _temp_dir(home, version)
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
                                 eval_config=eval_config, base_general_loss=general)
        against_label = active.version if active else "base"
        phase(f"evaluating {against_label} on the same held-out set")
        try:
            against = _evaluate_registered(db, home, active, config.base, eval_set, eval_config, None)
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
        meta = {
            "version": version, "base": config.base, "base_path": base_path, "method": method, "params": params,
            "dataset_hash": eval_set.dataset_hash, "dataset_size": eval_set.dataset_size,
            "n_train": len(eval_set.train), "n_heldout": len(eval_set.heldout),
            "heldout_questions": [ex.question for ex in eval_set.heldout],
            "metrics": metrics, "training": _jsonable({k: v for k, v in vars(outcome).items() if k not in ("config", "out_dir")}),
            "job_id": job_id, "created": now(),
            # What continued training compares with next time (finetune.continuation).
            "trained": trained_record(eval_set.train), "reproduced_keys": reproduced,
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
        )
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # a folder no row points to would only confuse
        raise
    return CandidateResult(adapter=adapter, verdict=verdict, active=active)


# --------------------------------------------------------------------------------------------------
# Re-evaluation, promotion, rollback


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
    eval_set = training_split(db, k_passages=passages_of(adapter))
    active = adapter_rows.active_adapter(db)
    against = active if active is not None and active.version != version else None
    label = against.version if against else "base"
    phase(f"evaluating {version}")
    metrics = _evaluate_registered(db, home, adapter, adapter.base_model, eval_set, eval_config, None)
    phase(f"evaluating {label}")
    against_metrics = _evaluate_registered(db, home, against, adapter.base_model, eval_set, eval_config, None)
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


def promote(db: sqlite_utils.Database, version: str, *, actor: str, force: bool = False,
            gate_config: GateConfig | None = None) -> GateVerdict:
    """Make `version` the active adapter if the gate passes (or `force`, for admins). Recorded in audit_log."""
    adapter = adapter_rows.get_adapter(db, version)
    if adapter.status == "active":
        raise StoreError(f"{version} is already the active adapter")
    problem = adapter_folder_problem(adapter)
    if problem:
        record_audit(db, actor=actor, action="promote", allowed=False, target=version, detail={"reasons": [problem]})
        raise StoreError(f"cannot promote {version}: {problem}")
    previous = adapter_rows.active_adapter(db)
    verdict = stored_verdict(db, adapter, config=gate_config)
    if adapter.status == "retired" and not force:
        record_audit(db, actor=actor, action="promote", allowed=False, target=version,
                     detail={"reasons": [f"{version} is retired"]})
        raise StoreError(f"{version} is retired (it was active before, or was replaced); "
                         "use `kbloop rollback` to go back, or promote it with --force")
    if not verdict.passed and not force:
        record_audit(db, actor=actor, action="promote", allowed=False, target=version,
                     detail={"reasons": verdict.reasons, "forced": False})
        raise StoreError(f"{version} not promoted: " + "; ".join(verdict.reasons)
                         + " (an admin can force it with --force)")
    adapter_rows.activate_adapter(db, version)
    record_audit(db, actor=actor, action="promote", allowed=True, target=version,
                 detail={"forced": bool(force and not verdict.passed), "gate_passed": verdict.passed,
                         "reasons": verdict.reasons, "previous": previous.version if previous else None})
    return verdict


def rollback(db: sqlite_utils.Database, *, actor: str) -> tuple[adapter_rows.Adapter, adapter_rows.Adapter | None]:
    """Retire the active adapter and go back to the previous one (None: the base). Recorded in audit_log."""
    try:
        current, previous = adapter_rows.rollback_adapter(db)
    except StoreError as exc:
        record_audit(db, actor=actor, action="rollback", allowed=False, detail={"reason": str(exc)})
        raise
    record_audit(db, actor=actor, action="rollback", allowed=True, target=previous.version if previous else "base",
                 detail={"from": current.version, "to": previous.version if previous else None})
    return current, previous


def dataset_unchanged(db: sqlite_utils.Database) -> bool:
    """True when the approved examples are exactly those the active adapter was trained on."""
    active = adapter_rows.active_adapter(db)
    if active is None:
        return False
    _, digest = approved_snapshot(db)
    return digest == active.dataset_hash


__all__ = [
    "CandidateResult", "GateConfig", "GateVerdict", "MAX_RANK", "META_FILE", "clean_stale_temp",
    "comparison_table", "dataset_unchanged", "evaluate_version", "gate", "promote", "rollback",
    "stored_verdict", "train_candidate", "vllm_problems",
]
