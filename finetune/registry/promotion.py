"""Promotion and rollback: make a candidate the active adapter when the gate passes (or an admin forces it),
go back to the previous one; each decision recorded in audit_log.
"""

from __future__ import annotations

import sqlite_utils

from finetune.evaluation.gate import GateConfig, GateVerdict, gate
from finetune.registry.folders import adapter_folder_problem
from store import StoreError
from store import adapters as adapter_rows
from store.audit import record_audit
from store.examples import approved_snapshot


def stored_verdict(db: sqlite_utils.Database, adapter: adapter_rows.Adapter, *,
                   config: GateConfig | None = None) -> GateVerdict:
    """The gate, recomputed from the adapter's stored comparison; fails when that comparison is stale
    (another adapter became the one that answers its team's questions since it was made)."""
    current = adapter_rows.serving_adapter(db, adapter.team)
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



def promote(db: sqlite_utils.Database, version: str, *, actor: str, force: bool = False,
            gate_config: GateConfig | None = None) -> GateVerdict:
    """Make `version` the active adapter of its team (store.adapters; the shared one for a shared adapter) if the
    gate passes (or `force`, for admins). Recorded in audit_log."""
    adapter = adapter_rows.get_adapter(db, version)
    if adapter.status == "active":
        raise StoreError(f"{version} is already the active adapter")
    problem = adapter_folder_problem(adapter)
    if problem:
        record_audit(db, actor=actor, action="promote", allowed=False, target=version, detail={"reasons": [problem]})
        raise StoreError(f"cannot promote {version}: {problem}")
    previous = adapter_rows.active_adapter(db, adapter.team)
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
                         "reasons": verdict.reasons, "previous": previous.version if previous else None,
                 **({"team": adapter.team} if adapter.team else {})})
    return verdict


def rollback(db: sqlite_utils.Database, *, actor: str,
             team: str | None = None) -> tuple[adapter_rows.Adapter, adapter_rows.Adapter | None]:
    """Retire the active adapter of `team` (None: the shared one) and go back to the team's previous one (None: none
    of its own; a team then gets the shared adapter, shared questions the base). Recorded in audit_log."""
    try:
        current, previous = adapter_rows.rollback_adapter(db, team)
    except StoreError as exc:
        record_audit(db, actor=actor, action="rollback", allowed=False,
                     detail={"reason": str(exc), **({"team": team} if team else {})})
        raise
    fallback = "shared" if team else "base"
    record_audit(db, actor=actor, action="rollback", allowed=True, target=previous.version if previous else fallback,
                 detail={"from": current.version, "to": previous.version if previous else None,
                         **({"team": team} if team else {})})
    return current, previous


def dataset_unchanged(db: sqlite_utils.Database, team: str | None = None) -> bool:
    """True when the approved examples of `team`'s adapter are exactly those its active adapter was trained on."""
    active = adapter_rows.active_adapter(db, team)
    if active is None:
        return False
    _, digest = approved_snapshot(db, team=team)
    return digest == active.dataset_hash

