"""Which model answers a question: the adapter a caller asks for, a team's active adapter, who may use which.

A caller asks for "active" (the store's active adapter when the question is admitted to a batch), "base" or a
named version. A team's question asks for `adapter_key("active", team)`, "active@<team>": its team's active
adapter, else the shared one (team names cannot hold "@": store.teams.TEAM_NAME). `resolve_version` turns
what was asked into a version, on the generation thread, when the request is admitted (hot-swap).
"""

from __future__ import annotations

from store import StoreError
from store.adapters import get_adapter, serving_adapter

BASE = "base"
ACTIVE = "active"
TEAM_ACTIVE = ACTIVE + "@"


def adapter_key(adapter: str, team: str | None) -> str:
    """What a request asks the backend for: "active" of a team becomes TEAM_ACTIVE + team; anything else as is."""
    return TEAM_ACTIVE + team if adapter == ACTIVE and team else adapter


def check_adapter_for(db, version: str, team: str | None) -> None:
    """StoreError unless adapter `version` may answer a question of `team`: a shared adapter answers anyone's, a
    team's adapter (trained on the team's examples) only its team's questions."""
    owner = get_adapter(db, version).team
    if owner is not None and owner != team:
        raise StoreError(f"{version} is team {owner!r}'s adapter: it answers only that team's questions "
                         f"(ask from one of its channels{'' if team is None else f', not as team {team!r}'})")


def resolve_version(db, adapter: str) -> str | None:
    """The adapter version a request asks for: "active" -> the store's shared active one, TEAM_ACTIVE + team ->
    the team's active one, else the shared one (None = base)."""
    if adapter == BASE:
        return None
    if adapter == ACTIVE or adapter.startswith(TEAM_ACTIVE):
        team = adapter.removeprefix(TEAM_ACTIVE) if adapter != ACTIVE else None
        active = serving_adapter(db, team)
        return active.version if active else None
    return adapter
