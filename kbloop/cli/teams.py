"""Commands: teams — list, add and remove teams, each with its Slack channels (issue 20; store.teams)."""

from __future__ import annotations

from typing import Annotated

import typer

from kbloop.cli.app import app, ctx
from store.adapters import active_adapter
from store.teams import add_team, list_teams, parse_channels, remove_team, team_row_counts
from store.text import count

teams_app = typer.Typer(
    help="Teams: each with its Slack channels, its examples and documents, and its own active adapter.",
    invoke_without_command=True)
app.add_typer(teams_app, name="teams")


@teams_app.callback()
def teams_list(typer_ctx: typer.Context) -> None:
    """List the teams: their channels, examples, passages and active adapter. Rows without a team are shared."""
    if typer_ctx.invoked_subcommand is not None:
        return
    db = ctx().db
    teams = list_teams(db)
    if not teams:
        typer.echo("No teams: every example, document and adapter is shared. Add one with "
                   "`kbloop teams add NAME --channels C1,C2`.")
        return
    for t in teams:
        counts = team_row_counts(db, t.name)
        active = active_adapter(db, t.name)
        typer.echo(f"{t.name}  channels: {', '.join(t.channels) or '(none)'}  examples: {counts['examples']}  "
                   f"passages: {counts['kb_docs']}  active adapter: {active.version if active else 'shared'}")


@teams_app.command("add")
def teams_add(
    name: Annotated[str, typer.Argument(help="The team's name: lower-case letters, digits, '-' or '_'.")],
    channels: Annotated[str, typer.Option(
        help="Slack channel ids whose questions are the team's, comma separated (C0123ABCD,C0456EFGH).")] = "",
) -> None:
    """Add a team. Questions asked in its channels (or in an assistant thread looking at one) are answered from the
    shared and the team's documents and approved answers only, with the team's active adapter when it has one."""
    team = add_team(ctx().db, name, parse_channels(channels))
    typer.echo(f"Team {team.name} added; channels: {', '.join(team.channels) or '(none)'}.")


@teams_app.command("remove")
def teams_remove(name: Annotated[str, typer.Argument(help="The team to remove.")]) -> None:
    """Remove a team and its channels. Its examples, documents, answers and adapters are neither deleted nor shared:
    they keep the team's name, unseen by every question, until a team of that name is added again."""
    kept = remove_team(ctx().db, name)
    typer.echo(f"Team {name} removed; its channels now get shared answers.")
    if any(kept.values()):
        typer.echo(f"Kept under the name {name!r}, private: {count(kept['examples'], 'example')}, "
                   f"{count(kept['kb_docs'], 'passage')}, {count(kept['interactions'], 'answer')}, "
                   f"{count(kept['adapters'], 'adapter')} (`kbloop teams add {name}` brings them back).")
