"""The adapter registry from the command line: eval, adapters, promote, rollback, export."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Optional

import typer

from kbloop.cli.app import app, ctx, fail
from store.adapters import get_adapter
from store.teams import require_team


def _actor() -> str:
    # Whoever can run the CLI on the server is an admin; the audit log says who it was.
    return f"cli:{getpass.getuser()}"


def _phase(text: str) -> None:
    typer.echo(f"… {text}", err=True)


@app.command("eval")
def eval_command(
    version: Annotated[str, typer.Argument(help="Adapter version, e.g. v3 (see `kbloop adapters`).")],
    train_sample: Annotated[int, typer.Option(min=0, help="Training examples checked for exact reproduction.")] = 32,
) -> None:
    """Re-run the evaluation of adapter VERSION and of the active adapter on the held-out split; print the table."""
    from finetune.evaluation.metrics import EvalConfig, metrics_table
    from finetune.registry.evaluating import evaluate_version

    c = ctx()
    metrics, verdict = evaluate_version(c.db, version, home=c.settings.kbloop_home, on_phase=_phase,
                                        eval_config=EvalConfig(train_sample=train_sample))
    typer.echo(metrics_table(metrics, title=f"{version} on {metrics['n_heldout']} held-out examples"))
    typer.echo("")
    typer.echo(verdict.table)
    typer.echo("")
    typer.echo(("gate: PASS - " if verdict.passed else "gate: FAIL - ") + "; ".join(verdict.reasons))


@app.command("adapters")
def adapters_command() -> None:
    """List adapter versions with their team, status and key held-out metrics (each team's active one, and the shared
    active one, marked *). Team "-": the shared adapter, which answers teams without an active adapter of their own."""
    from finetune.evaluation.metrics import format_value, text_table
    from finetune.registry.folders import adapter_objective
    from store.adapters import list_adapters

    rows = list_adapters(ctx().db)
    if not rows:
        typer.echo("No adapters yet. Train one with `kbloop train`.")
        return
    table = [("", "version", "team", "status", "method", "objective", "base", "examples", "loss", "exact", "F1", "stops", "gate",
              "created")]
    for a in rows:
        m, g = a.metrics, a.metrics.get("gate") or {}
        gate_text = ("pass" if g.get("passed") else "fail") + f" vs {g['against']}" if g else "-"
        table.append((
            "*" if a.status == "active" else "", a.version, a.team or "-", a.status, a.method, adapter_objective(a), a.base_model,
            str(a.dataset_size or 0), format_value("heldout_loss", m.get("heldout_loss")),
            format_value("heldout_exact_match", m.get("heldout_exact_match")),
            format_value("heldout_token_f1", m.get("heldout_token_f1")),
            format_value("stop_rate", m.get("stop_rate")), gate_text, a.created_at[:16].replace("T", " "),
        ))
    typer.echo(text_table(table))


@app.command("promote")
def promote_command(
    version: Annotated[str, typer.Argument(help="Adapter version to make active.")],
    force: Annotated[bool, typer.Option("--force", help="Promote even if the gate fails (recorded in the audit log).")] = False,
) -> None:
    """Make VERSION the active adapter of its team (or the shared one, for a shared adapter) if it is no worse than
    the adapter that answers that team now on the held-out set."""
    from finetune.registry.promotion import promote

    db = ctx().db
    verdict = promote(db, version, actor=_actor(), force=force)
    team = get_adapter(db, version).team
    whose = f"team {team}'s active adapter" if team else "the active adapter"
    if verdict.table:
        typer.echo(verdict.table)
    if verdict.passed:
        typer.echo(f"{version} is now {whose}.")
    else:
        typer.echo(f"{version} is now {whose} (forced; gate: {'; '.join(verdict.reasons)}).")


@app.command("rollback")
def rollback_command(
    team: Annotated[Optional[str], typer.Option(help="Roll back this team's active adapter (default: the shared one).")] = None,
) -> None:
    """Retire the active adapter and go back to the one active before it (or the base model). With --team, the team's:
    back to its previous adapter, or to the shared one when it had none before."""
    from finetune.registry.promotion import rollback

    db = ctx().db
    require_team(db, team)
    current, previous = rollback(db, actor=_actor(), team=team)
    to = previous.version if previous else ("the shared adapter" if team else "the base model (no adapter)")
    typer.echo(f"Rolled back {f'team {team} ' if team else ''}from {current.version} to {to}.")


@app.command("export")
def export_command(
    version: Annotated[str, typer.Argument(help="Adapter version to export.")],
    merged: Annotated[Optional[Path], typer.Option("--merged", help="Folder to write the merged model to (must not exist).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 (default), bfloat16 or float16.")] = "float32",
) -> None:
    """Write base + adapter VERSION merged into one full model folder (safetensors + tokenizer)."""
    from finetune.registry.export import export_merged

    if merged is None:
        fail("--merged OUT is required: the folder to write the merged model to")
    c = ctx()
    get_adapter(c.db, version)  # an unknown version fails here, naming the known ones
    if merged.exists():
        fail(f"{merged}: already exists; choose a new folder (nothing was written)")
    _phase(f"merging {version} into its base (full precision)")
    out = export_merged(c.db, version, merged, home=c.settings.kbloop_home, dtype=dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    typer.echo(f"Merged model written to {out} ({size / 2**20:.1f} MiB).")
