"""Teams (`teams`): a name and the Slack channels whose questions are the team's (issue 20).

Examples, KB passages, interactions and adapters carry a nullable `team` (the team's name). NULL is shared: every
team's questions see shared rows, a question from no team's channel sees shared rows only, and nothing outside a
team ever sees the team's rows. `visible_to(team)` is that rule as SQL, for every query that serves or trains.

Removing a team removes the team and its channels, nothing else: its examples, passages, interactions and adapters
keep its name, so they stay private (no question routes to a team that does not exist) and come back when a team
of that name is added again. Making them shared instead would publish a team's private documents to everyone;
deleting them would lose curated work to a typo. `remove_team` says how many rows it left in place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import sqlite_utils

from store.db import StoreError, write_transaction
from store.text import now

# Lower-case letters, digits, "-" and "_": a name that reads the same in `team=NAME`, a folder and a Slack command.
TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
# Slack conversation ids: C… (public), G… (private / group), D… (direct message); upper-case letters and digits.
CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{1,30}$")
# In a filter (the review queue, the examples list): the rows of no team. Not a valid team name.
SHARED = "-"
# The tables whose rows may belong to a team.
TEAM_TABLES = ("examples", "kb_docs", "interactions", "adapters")


@dataclass(frozen=True)
class Team:
    name: str
    channels: tuple[str, ...]
    created_at: str


def _team(row: dict) -> Team:
    return Team(row["name"], tuple(json.loads(row["channels"] or "[]")), row["created_at"])


def check_team_name(name: str) -> str:
    if not TEAM_NAME.match(name or ""):
        raise StoreError(f"team name {name!r} is not valid: use 1-40 lower-case letters, digits, '-' or '_', "
                         "starting with a letter or digit")
    return name


def parse_channels(text: str) -> tuple[str, ...]:
    """`C1,C2` -> ("C1", "C2"): Slack channel ids, comma separated, each once; an empty text is no channel."""
    channels = [c.strip() for c in (text or "").split(",") if c.strip()]
    bad = [c for c in channels if not CHANNEL_ID.match(c)]
    if bad:
        raise StoreError(f"not a Slack channel id: {', '.join(map(repr, bad))} (expected ids like C0123ABCD, "
                         "as Slack shows them under the channel's details, not #names)")
    return tuple(dict.fromkeys(channels))


def add_team(db: sqlite_utils.Database, name: str, channels: tuple[str, ...] | list[str] = ()) -> Team:
    """Add a team with its channels. A channel belongs to one team at most."""
    check_team_name(name)
    channels = tuple(dict.fromkeys(channels))
    with write_transaction(db):
        if db.execute("SELECT 1 FROM teams WHERE name = ?", [name]).fetchone():
            raise StoreError(f"team {name!r} already exists")
        owners = channel_owners(db)
        taken = [f"{c} (team {owners[c]!r})" for c in channels if c in owners]
        if taken:
            raise StoreError(f"channel already belongs to another team: {', '.join(taken)}")
        db["teams"].insert({"name": name, "channels": json.dumps(list(channels)), "created_at": now()})
    return get_team(db, name)


def list_teams(db: sqlite_utils.Database) -> list[Team]:
    return [_team(r) for r in db.query("SELECT * FROM teams ORDER BY name")]


def get_team(db: sqlite_utils.Database, name: str) -> Team:
    rows = list(db["teams"].rows_where("name = ?", [name]))
    if not rows:
        known = ", ".join(t.name for t in list_teams(db)) or "none yet; add one with `kbloop teams add`"
        raise StoreError(f"no team {name!r} (teams: {known})")
    return _team(rows[0])


def require_team(db: sqlite_utils.Database, name: str | None) -> str | None:
    """`name` when such a team exists (None stays None: shared); else StoreError naming it."""
    if name is None:
        return None
    return get_team(db, name).name


def team_row_counts(db: sqlite_utils.Database, name: str) -> dict[str, int]:
    """How many rows of each table belong to team `name` (whether or not the team still exists)."""
    return {t: int(db.execute(f"SELECT COUNT(*) FROM {t} WHERE team = ?", [name]).fetchone()[0]) for t in TEAM_TABLES}


def remove_team(db: sqlite_utils.Database, name: str) -> dict[str, int]:
    """Remove the team and its channels; its rows stay under its name, private (module docstring). Returns their
    counts per table."""
    with write_transaction(db):
        get_team(db, name)
        db.execute("DELETE FROM teams WHERE name = ?", [name])
        return team_row_counts(db, name)


def channel_owners(db: sqlite_utils.Database) -> dict[str, str]:
    """channel id -> the team it belongs to."""
    return {c: t.name for t in list_teams(db) for c in t.channels}


def team_for_channel(db: sqlite_utils.Database, channel_id: str | None) -> str | None:
    """The team whose channel this is, or None (a shared channel, a DM, no channel)."""
    if not channel_id:
        return None
    row = db.execute("SELECT teams.name FROM teams, json_each(teams.channels) WHERE json_each.value = ?",
                     [channel_id]).fetchone()
    return row[0] if row else None


def team_filter(team: str, column: str = "team") -> tuple[str, list]:
    """(SQL condition, its parameters) for a curator's filter: exactly `team`'s rows, or SHARED: those of no team."""
    if team == SHARED:
        return f"{column} IS NULL", []
    return f"{column} = ?", [team]


def visible_to(team: str | None, column: str = "team") -> tuple[str, list]:
    """(SQL condition, its parameters): the rows a question of `team` may see, its own and the shared ones."""
    if team is None:
        return f"{column} IS NULL", []
    return f"({column} IS NULL OR {column} = ?)", [team]
