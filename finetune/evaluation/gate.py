"""The promotion gate: is a candidate no worse than the active adapter (or the base)? Pure: metrics in,
a verdict out; no store, no model, no files (finetune.registry.promotion applies it).

The candidate passes when, on the held-out set, against the active adapter (or the base):
- its answer-token loss is at most the active's x (1 + `loss_rel_tolerance`),
- its exact match and token F1 are at most `score_tolerance` (absolute) below the active's,
- its stop rate (generations ending with the end-of-turn token) is at most `stop_tolerance` below;
  a score or stop-rate drop fails only with evidence: paired over the same questions, the answers the
  candidate got worse outnumber those it got better by more than chance explains (one-sided sign test,
  p < `evidence_p`); on 12 held-out questions, 1 or 2 answers lost and none won is not evidence, 5 of 5 is;
- it still reproduces at least `min_retained` (95%) of the training answers the active adapter reproduces
  exactly, when the active reproduces at least `retention_min_answers` of them (a continued run must not
  forget; a from-scratch run must not lose what the active knew);
and the held-out set is not empty. A preference candidate (kto, dpo: its metrics carry the voted answers'
log-likelihoods, measured for it and the active adapter on the same votes) must also have made the 👎'd
answers less likely (mean log-likelihood per answer token strictly lower) and the 👍'd ones no less likely
(at most `preference_tolerance` lower). Training reproduction and the forgetting probe (general-text loss against
the base, and against the active adapter: `forgetting_vs_active`) are reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.evaluation.metrics import PREFERENCE_KEYS, format_value, metric_kind, metric_label, text_table


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
    # A preference candidate's 👍'd answers may lose at most this much mean log-likelihood per token (nats).
    preference_tolerance: float = 0.0


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str]
    table: str  # candidate vs active with deltas, aligned text (Slack puts it in a code block)
    against: str = "base"  # the version compared with, or "base"


# (metric key, direction): +1 = higher is better, -1 = lower is better, 0 = reported only. Labels and formats
# are finetune.evaluation.metrics.METRIC_LABELS.
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
                _judge_drop(_SCORE_DROP, c.get("paired"), a.get("paired"), field, config=config, failures=failures,
                            notes=notes, label=label, c=100 * cv, a=100 * av, active=active_label,
                            tol=100 * config.score_tolerance)
        retained, n_before = c.get("retained_vs_active"), c.get("n_active_reproduced") or 0
        if retained is not None and n_before >= config.retention_min_answers and retained < config.min_retained:
            failures.append(f"reproduces {100 * retained:.1f}% of the {n_before} training answers {active_label} "
                            f"reproduces (at least {100 * config.min_retained:.0f}% must be kept)")
        cs, as_ = c.get("stop_rate"), a.get("stop_rate")
        if cs is not None and as_ is not None and cs < as_ - config.stop_tolerance:
            _judge_drop(_STOP_DROP, _stops(c), _stops(a), "stopped", config=config, failures=failures, notes=notes,
                        c=100 * cs, a=100 * as_, active=active_label)
    failures += preference_failures(c, a, config=config, active_label=active_label)
    table = comparison_table(c, a, candidate_label=candidate_label, active_label=active_label)
    if failures:
        return GateVerdict(False, failures, table, active_label)
    kept = (f"; keeps {100 * c['retained_vs_active']:.1f}% of the {c['n_active_reproduced']} answers "
            f"{active_label} reproduces" if c.get("retained_vs_active") is not None else "")
    return GateVerdict(True, [f"no worse than {active_label} on held-out loss, exact match, token F1 and stop rate "
                              f"({c.get('n_heldout')} held-out examples){kept}", *notes], table, active_label)


@dataclass(frozen=True)
class _DropWording:
    """How the gate words a drop past its tolerance (str.format templates; `c`, `a`: the candidate's and the
    active's percentages, `active`: its label; `worse`, `better`, `p`: the paired sign test)."""

    failed: str  # with {evidence}: the sign test's counts, or "" when there are no per-question records
    evidence: str
    within: str  # the note when the drop is within chance


_SCORE_DROP = _DropWording(
    failed="held-out {label} {c:.1f}% is below {active}'s {a:.1f}% (more than {tol:.0f} points lower{evidence})",
    evidence="; {worse} answers worse, {better} better, p={p:.3f}",
    within="held-out {label} {c:.1f}% vs {active}'s {a:.1f}%: {worse} answers worse, {better} better, "
           "within chance (p={p:.2f})",
)
_STOP_DROP = _DropWording(
    failed="stops at the end of its turn in {c:.1f}% of answers, {active} in {a:.1f}%{evidence}",
    evidence=" ({worse} fewer answers stop, {better} more, p={p:.3f})",
    within="stops in {c:.1f}% of answers vs {active}'s {a:.1f}%: {worse} fewer stop, {better} more, "
           "within chance (p={p:.2f})",
)


def _judge_drop(wording: _DropWording, candidate_paired: dict | None, active_paired: dict | None, field: str, *,
                config: GateConfig, failures: list[str], notes: list[str], **values) -> None:
    """The one rule for a score or stop-rate drop past its tolerance: it fails the gate unless the paired sign test
    over the same questions puts it within chance (p at least `evidence_p`), and is then only noted; without
    per-question records (p None) the tolerance alone decides."""
    worse, better, p = paired_sign_test(candidate_paired, active_paired, field)
    if p is None or p < config.evidence_p:
        evidence = wording.evidence.format(worse=worse, better=better, p=p) if p is not None else ""
        failures.append(wording.failed.format(evidence=evidence, **values))
    else:
        notes.append(wording.within.format(worse=worse, better=better, p=p, **values))


def preference_failures(candidate: dict, active: dict, *, config: GateConfig,
                        active_label: str = "active") -> list[str]:
    """Why a preference candidate did not move the voted answers the right way (empty when it did, or when the
    candidate is not one: its metrics carry no `pref_undesirable_loglik`)."""
    c_bad, c_good = candidate.get("pref_undesirable_loglik"), candidate.get("pref_desirable_loglik")
    if c_bad is None and c_good is None:
        return []
    a_bad, a_good = active.get("pref_undesirable_loglik"), active.get("pref_desirable_loglik")
    failures = []
    if c_bad is None or a_bad is None:
        failures.append(f"the likelihood of the 👎'd answers could not be compared with {active_label}'s")
    elif not c_bad < a_bad:
        failures.append(f"the 👎'd answers did not become less likely: log-likelihood per token {c_bad:.3f} vs "
                        f"{active_label}'s {a_bad:.3f}")
    if c_good is not None and a_good is not None and c_good < a_good - config.preference_tolerance:
        failures.append(f"the 👍'd answers became less likely: log-likelihood per token {c_good:.3f} vs "
                        f"{active_label}'s {a_good:.3f}")
    return failures


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
    for key in PREFERENCE_KEYS:
        cv, av = candidate.get(key), active.get(key)
        if cv is None and av is None:
            continue
        delta, mark = ("", "")
        if cv is not None and av is not None:
            delta = f"{cv - av:+.3f}"
            direction = +1 if key == "pref_desirable_loglik" else -1
            mark = "" if abs(cv - av) <= 1e-9 else ("better" if (cv - av) * direction > 0 else "worse")
        rows.append((metric_label(key), format_value(key, cv), format_value(key, av), delta, mark))
    rows.append(("held-out examples", str(candidate.get("n_heldout", 0)), str(active.get("n_heldout", 0)), "", ""))
    return text_table(rows, align="lrrrl")



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

