"""Commands: train, recommend, sweep."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from kbloop.cli.app import app, ctx, fail
from store.teams import require_team

# Printed before training (the defaults) or while it ran (where it started): not repeated after it.
_DEFAULT_NOTES = ("defaults (the LoRA guide's recipe)", "tiny-base default", "base is `tiny`", "rank auto", "continuing from",
                  "training from the base")
RANK_HELP = "LoRA rank: a number, or `auto` (the LoRA guide's table applied to the data; see `kbloop recommend`)."


def _rank(value: str | None):
    if value is None:
        return None
    if value.strip().lower() == "auto":
        return "auto"
    try:
        rank = int(value)
    except ValueError:
        fail(f"--rank: expected a number or `auto`, not {value!r}")
    if rank < 1:
        fail(f"--rank: must be at least 1, not {rank}")
    return rank


def _start_from(value: str | None) -> str | None:
    """--from: `active`, `base` or an adapter version (checked against the registry when training starts)."""
    if value is None:
        return None
    value = value.strip()
    if value.lower() in ("active", "base"):
        return value.lower()
    from store.adapters import VERSION_RE

    if not VERSION_RE.match(value):
        fail(f"--from: expected `active`, `base` or an adapter version such as v3, not {value!r}")
    return value


def config_from_options(*, base, method, rank, alpha, dropout, targets, epochs, lr, batch, grad_accum, max_length, seed,
            version, passages, start_from=None, objective="sft"):
    from finetune.training.config import METHODS, OBJECTIVES, TrainConfig, parse_targets

    if method is not None and method not in METHODS:
        fail(f"--method: expected one of {', '.join(METHODS)}, not {method!r}")
    if objective not in OBJECTIVES:
        fail(f"--objective: expected one of {', '.join(OBJECTIVES)}, not {objective!r}")
    return TrainConfig(
        base=base, method=method, rank=_rank(rank), alpha=alpha, dropout=dropout, targets=parse_targets(targets),
        epochs=epochs, learning_rate=lr, batch_size=batch, grad_accum=grad_accum, max_length=max_length,
        seed=seed, version=version, k_passages=passages, start_from=_start_from(start_from), objective=objective,
    )


class _Progress:
    """A rich progress bar fed by training's on_step, which also logs each step's loss to the store."""

    def __init__(self, db, *, run: str, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.db, self.run = db, run
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("epoch {task.fields[epoch]}"), TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task(description, total=None, loss="-", epoch="-")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def on_step(self, info) -> None:
        from store.jobs import log_train_step

        self.progress.update(self.task, total=info.total_steps, completed=info.step,
                             loss=f"{info.loss:.4f}" if info.loss is not None else "-", epoch=f"{info.epoch:.2f}")
        log_train_step(self.db, run=self.run, step=info.step, loss=info.loss, epoch=info.epoch,
                       learning_rate=info.learning_rate, job_id=None)

    def phase(self, text: str) -> None:
        # soft_wrap: a phase is one line whatever the terminal's width, so that logs and scripts can grep it
        self.progress.console.print(f"… {text}", soft_wrap=True, markup=False, highlight=False)


@app.command()
def train(
    base: Annotated[Optional[str], typer.Option(help="HF model id, local model folder, or `tiny` (default: KBLOOP_BASE_MODEL).")] = None,
    method: Annotated[Optional[str], typer.Option(help="qlora (4-bit base, default), lora, or full (tiny: full).")] = None,
    rank: Annotated[Optional[str], typer.Option(help=RANK_HELP)] = None,
    alpha: Annotated[Optional[int], typer.Option(help="LoRA alpha (default 32).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="LoRA dropout (default 0.1; tiny: 0).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="`all-linear` (default) or module names, e.g. q_proj,v_proj.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs (default 3; tiny: 20, it memorises from scratch).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default 2e-4; tiny: 1e-3).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Examples per step and device (default 4; tiny: 8).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps (default 4).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Max tokens per example; longer prompts lose passages first.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    version: Annotated[Optional[str], typer.Option("--version", "--output-version", help="Version name to register (default: next vN).")] = None,
    passages: Annotated[Optional[int], typer.Option(help="Retrieved KB passages per training prompt; the engine asks the adapter with as many (default 3; tiny: 0).")] = None,
    start_from: Annotated[Optional[str], typer.Option("--from", help="Start from `active` (default: continue the active adapter on the new and changed examples when base and method match, else from the base, saying why), `base` (from scratch), or a version V.")] = None,
    objective: Annotated[str, typer.Option(help="sft (default): the approved examples; kto: continue the active adapter on the 👍 / 👎 votes (a correction's answer counts as 👍); dpo: continue it on (approved correction, the answer it replaced) pairs. See docs/training.md.")] = "sft",
    data: Annotated[Optional[Path], typer.Option(help="Train on this file (JSONL/CSV as `kbloop data import` reads) instead of the store; writes to --out, registers nothing.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="With --data: the folder to write the adapter to (must not exist).")] = None,
    team: Annotated[Optional[str], typer.Option(help="Train this team's adapter (kbloop teams): on the shared and the team's examples, continuing and judged against what answers the team now (its active adapter, else the shared one); registered for the team.")] = None,
) -> None:
    """Train an adapter on the approved examples, evaluate it against the active one, register it as a candidate.

    Defaults follow the LoRA guide's recipe (QLoRA r=8, alpha 32, dropout 0.1, all linear projections, lr 2e-4,
    3 epochs, batch 4 x 4, warmup 10%); the `tiny` base gets its own (it has random weights and memorises:
    at least 400 steps, stopping once every training answer is reproduced). The defaults used are printed.
    By default the run continues the active adapter (new and changed examples plus a replay of earlier ones);
    where it starts, and why, is printed. Promote the result with `kbloop promote VERSION`.
    """
    c = ctx()
    base = base or c.settings.base_model
    config = config_from_options(base=base, method=method, rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                     epochs=epochs, lr=lr, batch=batch, grad_accum=grad_accum, max_length=max_length, seed=seed,
                     version=version, passages=passages, start_from=start_from, objective=objective)
    if data is not None:
        if team is not None:
            fail("--team trains on the store's examples of the team; --data trains on a file (nothing registered)")
        if objective != "sft":
            fail("--objective kto and dpo train on the store's votes; --data trains on a file's examples (sft)")
        if start_from is not None:
            fail("--from goes with the store's examples; --data trains a new adapter from the base")
        _train_on_file(c, config, data, out)
        return
    if out is not None:
        fail("--out goes with --data; adapters trained on the store's examples go to KBLOOP_HOME/adapters/")
    from finetune.registry.candidates import train_candidate
    from finetune.registry.folders import next_free_version
    from store.examples import approved_snapshot

    require_team(c.db, team)
    examples, _ = approved_snapshot(c.db, team=team)
    if not examples:
        fail("no approved examples: import some with `kbloop data import FILE` or approve pending ones with "
             "`kbloop review`")
    # The version the run registers as, known up front so that its steps are logged under it.
    run = config.version or next_free_version(c.db, c.settings.kbloop_home)
    config = replace(config, version=run)
    if team is not None:
        typer.echo(f"Team {team}: {len(examples)} approved examples (shared and the team's).")
    if objective == "sft":
        _echo_defaults(config, examples)
    else:
        typer.echo(f"Training {run} on base {config.base}: {objective} on the votes, continuing "
                   f"{config.start_from or 'the active adapter'}.")
    started = time.monotonic()
    with _Progress(c.db, run=run, description=f"Training {run}") as progress:
        result = train_candidate(c.db, home=c.settings.kbloop_home, config=config, on_step=progress.on_step,
                                 on_phase=progress.phase, team=team)
    a = result.adapter
    typer.echo(f"Registered {a.version} as a candidate{f' for team {team}' if team else ''} ({a.method}, {a.dataset_size} examples, "
               f"{time.monotonic() - started:.0f} s): {a.path}")
    from finetune.registry.folders import read_metadata

    for note in (read_metadata(Path(a.path)).get("training") or {}).get("notes", []):
        if not note.startswith(_DEFAULT_NOTES):  # those were printed before training
            typer.echo(f"  {note}")
    typer.echo(result.verdict.table)
    if result.verdict.passed:
        typer.echo(f"gate: PASS ({'; '.join(result.verdict.reasons)}). Promote with `kbloop promote {a.version}`.")
    else:
        typer.echo(f"gate: FAIL ({'; '.join(result.verdict.reasons)}). `kbloop promote {a.version} --force` "
                   "overrides.")


def _echo_defaults(config, examples, *, label: str | None = None) -> None:
    """Say which defaults apply (before the long part), as the trainer will resolve them; `label` names the
    run when it is not a registered version (`file:qa.jsonl`)."""
    from finetune.model.loading import names_tiny
    from finetune.training.config import resolve_config
    from finetune.training.recommend import profile_examples

    tiny = names_tiny(config.base)
    try:
        resolved, notes = resolve_config(config, tiny=tiny, n_examples=len(examples),
                                         profile=profile_examples(examples) if config.rank == "auto" else None)
    except Exception as exc:  # the same check runs in training, with the held-out split removed
        fail(str(exc))
    typer.echo(f"Training {label or config.version} on base {config.base}: {resolved.method}, r={resolved.rank}, "
               f"alpha={resolved.alpha}, lr={resolved.learning_rate}, epochs={resolved.epochs:g}, "
               f"batch {resolved.batch_size} x {resolved.grad_accum}, max length {resolved.max_length}, "
               f"{resolved.k_passages} passages per prompt.")
    for note in notes:
        typer.echo(f"  {note}")


def _train_on_file(c, config, data: Path, out: Path | None) -> None:
    """Train on a file: split, train into a temporary folder, evaluate, rename into --out. Nothing registered."""
    import shutil
    import tempfile

    from finetune.model.loading import is_tiny_base, resolve_base
    from finetune.training.config import prompt_passages
    from finetune.training.data import build_training_examples, split_for_training
    from finetune.training.trainer import train_adapter
    from store.files import publish_dir
    from store.formats import ImportFileError, read_examples_file, scan_imported

    if out is None:
        fail("--data needs --out FOLDER: an adapter trained on a file is written there, not registered")
    if out.exists():
        fail(f"{out}: already exists; choose a new folder (nothing was written)")
    imported = read_examples_file(data)
    flagged, _contacts = scan_imported(data, imported)  # the same scan as every other path into training
    if flagged:
        raise ImportFileError(flagged + [f"{data}: not trained: {len(flagged)} row(s) hold secrets or personal data; "
                                         "redact them first"])
    examples = imported.examples
    base_path = resolve_base(config.base, home=c.settings.kbloop_home, db=c.db)
    config = replace(config, k_passages=prompt_passages(config, tiny=is_tiny_base(base_path)))
    train_set, heldout = split_for_training(build_training_examples(c.db, examples, k=config.k_passages))
    run = config.version or f"file:{data.name}"
    _echo_defaults(config, train_set, label=run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _Progress(c.db, run=run, description=f"Training on {data.name}") as progress:
            outcome = train_adapter(replace(config, base=base_path), train_set, tmp, on_step=progress.on_step)
        for note in outcome.notes:
            typer.echo(f"  {note}")
        if heldout:
            from finetune.evaluation.metrics import evaluate, metrics_table
            from finetune.model.loading import load_model_for_inference

            typer.echo(f"… evaluating on {len(heldout)} held-out examples")
            model, tokenizer = load_model_for_inference(base_path, adapter_path=tmp)
            metrics = evaluate(model, tokenizer, heldout=heldout, train=train_set)
            typer.echo(metrics_table(metrics, title=f"{data.name}: {len(heldout)} held-out examples"))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    typer.echo(f"Adapter written to {out} ({outcome.steps} steps, {outcome.runtime_s:.0f} s, final loss "
               f"{outcome.final_loss:.4f}); not registered (trained on {data}, not the store's examples).")


@app.command()
def recommend(
    data: Annotated[Optional[Path], typer.Option(help="Profile this file instead of the store's approved examples.")] = None,
) -> None:
    """Apply the LoRA guide's decision framework (LoRA or full fine-tuning, which rank) to the data; print why."""
    from finetune.training.recommend import recommend as recommend_for

    c = ctx()
    if data is not None:
        from store.formats import read_examples_file

        examples, source = read_examples_file(data).examples, str(data)
    else:
        from store.examples import approved_snapshot

        examples, _ = approved_snapshot(c.db)
        source = "the approved examples"
    if not examples:
        fail(f"no examples in {source}: nothing to recommend for")
    rec = recommend_for(examples)
    typer.echo(f"{len(examples)} examples from {source}.")
    typer.echo(rec.text())
    flag = "--method full" if rec.method == "full" else f"--rank {rec.rank} --alpha {rec.alpha}"
    typer.echo(f"Train with: kbloop train {flag}   (or --rank auto)")


@app.command()
def sweep(
    ranks: Annotated[str, typer.Option(help="Comma-separated LoRA ranks to try, e.g. 4,8,16,32.")] = "4,8,16,32",
    base: Annotated[Optional[str], typer.Option(help="HF model id, local model folder, or `tiny`.")] = None,
    method: Annotated[Optional[str], typer.Option(
        help="qlora or lora (default: the base's; the `tiny` base needs --method lora, see above).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs per run.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Examples per step.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Max tokens per example.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
) -> None:
    """The LoRA guide's grid search over rank: train and evaluate one candidate per rank, keep the best by
    evaluation.

    Alpha scales with the rank (the default alpha/rank ratio) and every run starts from the base, so the runs
    differ only in capacity. Every run is registered as a candidate; the best (lowest held-out answer loss, then
    exact match) is named for `kbloop promote`. The `tiny` base trains with full fine-tuning by default (its
    weights are random), which has no rank: on tiny the sweep needs --method lora.
    """
    from finetune.model.loading import names_tiny
    from finetune.registry.candidates import train_candidate
    from finetune.registry.folders import next_free_version
    from finetune.training.config import SEED_DEFAULTS, TINY_DEFAULTS

    try:
        grid = sorted({int(r) for r in ranks.split(",") if r.strip()})
    except ValueError:
        fail(f"--ranks: expected numbers separated by commas, e.g. 4,8,16,32; got {ranks!r}")
    if not grid or grid[0] < 1:
        fail(f"--ranks: expected positive numbers, got {ranks!r}")
    if method == "full":
        fail("--method full has no rank to sweep")
    c = ctx()
    base = base or c.settings.base_model
    tiny = names_tiny(base)
    defaults = TINY_DEFAULTS if tiny else SEED_DEFAULTS
    if (method or defaults["method"]) == "full":  # the rank would be ignored: N equal runs, not a sweep
        fail("the `tiny` base trains with full fine-tuning by default (random weights), which has no rank to sweep; "
             "pass --method lora to compare LoRA ranks on tiny, or sweep a pretrained base (--base)")
    ratio = defaults["alpha"] / defaults["rank"]
    rows = []
    for rank in grid:
        # From the base every time: a run that continued the active adapter would not compare with the others.
        config = config_from_options(base=base, method=method, rank=str(rank), alpha=max(1, round(ratio * rank)), dropout=None,
                         targets=None, epochs=epochs, lr=lr, batch=batch, grad_accum=grad_accum,
                         max_length=max_length, seed=seed, version=None, passages=None, start_from="base")
        run = next_free_version(c.db, c.settings.kbloop_home)
        config = replace(config, version=run)
        typer.echo(f"— rank {rank} (alpha {config.alpha}) as {run}")
        started = time.monotonic()
        with _Progress(c.db, run=run, description=f"r={rank}") as progress:
            result = train_candidate(c.db, home=c.settings.kbloop_home, config=config, on_step=progress.on_step,
                                     on_phase=progress.phase)
        rows.append((rank, result.adapter, time.monotonic() - started))
    typer.echo(_sweep_table(rows))
    best = min(rows, key=lambda r: _sweep_key(r[1].metrics))
    typer.echo(f"Best: rank {best[0]} ({best[1].version}). Promote it with `kbloop promote {best[1].version}`.")


def _sweep_key(metrics: dict):
    loss = metrics.get("heldout_loss")
    return (loss if loss is not None else float("inf"), -(metrics.get("heldout_exact_match") or 0.0))


def _sweep_table(rows) -> str:
    from finetune.evaluation.metrics import format_value, text_table

    best = min(rows, key=lambda r: _sweep_key(r[1].metrics))[1].version
    table = [("rank", "version", "held-out loss", "exact", "F1", "reproduced", "stops", "seconds", "")]
    for rank, a, seconds in rows:
        m = a.metrics
        table.append((str(rank), a.version, format_value("heldout_loss", m.get("heldout_loss")),
                      format_value("heldout_exact_match", m.get("heldout_exact_match")),
                      format_value("heldout_token_f1", m.get("heldout_token_f1")),
                      format_value("train_reproduced", m.get("train_reproduced")),
                      format_value("stop_rate", m.get("stop_rate")), f"{seconds:.0f}",
                      "best" if a.version == best else ""))
    return text_table(table)
