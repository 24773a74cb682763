"""Teams in the playground (issue 20; store.teams): the choices the tabs offer, and assigning an example to a team.

The chat and the search tabs ask "as team T" (the shared rows and T's; "no team": shared rows only), as a question
from one of T's Slack channels would be answered; the review tab filters by team and moves an example between a
team and the shared set.
"""

from __future__ import annotations

import sqlite_utils

from playground.auth import Viewer
from playground.review import Outcome
from store import StoreError
from store.audit import record_audit
from store.examples import get_example, set_example_team
from store.teams import SHARED, list_teams, require_team

NO_TEAM = ""  # the dropdowns' value for "no team": asks see shared rows only; a filter on it shows every team's
NO_TEAM_LABEL = "no team (shared only)"
ALL_TEAMS_LABEL = "all teams"
SHARED_LABEL = "shared (no team)"


def ask_choices(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """(label, value) for "ask as": no team, then each team with its channels."""
    return [(NO_TEAM_LABEL, NO_TEAM)] + [
        (f"{t.name} ({', '.join(t.channels)})" if t.channels else t.name, t.name) for t in list_teams(db)]


def filter_choices(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """(label, value) for a list's team filter: all, shared only, then each team."""
    return [(ALL_TEAMS_LABEL, NO_TEAM), (SHARED_LABEL, SHARED)] + [(t.name, t.name) for t in list_teams(db)]


def move_choices(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """(label, value) for "this example belongs to": the shared set, then each team."""
    return [(SHARED_LABEL, SHARED)] + [(t.name, t.name) for t in list_teams(db)]


def as_team(db: sqlite_utils.Database, value: str | None) -> str | None:
    """A dropdown's value as the engine's `team` (None: no team). StoreError naming a team that does not exist (the
    dropdowns take typed values: a team added after the page loaded; a removed team's rows stay unseen)."""
    return require_team(db, value or None)


def assign(db: sqlite_utils.Database, viewer: Viewer, example_id, team: str | None) -> Outcome:
    """Move example `example_id` to `team` (SHARED or empty: make it shared). Curators may; the store refuses a team
    that does not exist, or one that already has the question."""
    if not example_id:
        return Outcome(False, "Pick an example first.")
    target = None if team in (None, NO_TEAM, SHARED) else team
    try:
        before = get_example(db, int(example_id)).team
        ex = set_example_team(db, int(example_id), target)
    except StoreError as exc:
        return Outcome(False, f"Not moved: {exc}")
    # Who moved what where: a move to the shared set shows a team's text to every team.
    record_audit(db, actor=viewer.name, action="assign_team", allowed=True, target=f"example {ex.id}",
                 detail={"from": before, "to": ex.team})
    where = f"team {ex.team}" if ex.team else "the shared set (every team sees it)"
    return Outcome(True, f"Example #{ex.id} now belongs to {where}.", ex.id)
