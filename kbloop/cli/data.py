"""Workspace, knowledge base, training data, curation queue and database commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from kbloop.cli.app import app, ctx, fail
from kbloop.settings import ENV_EXAMPLE
from store.teams import SHARED, require_team
from store.text import count

kb_app = typer.Typer(help="The knowledge base the bot answers from.", no_args_is_help=True)
data_app = typer.Typer(help="Training examples: import, export, statistics.", no_args_is_help=True)
review_app = typer.Typer(help="The curation queue: pending examples from 👎 corrections and the playground.",
                         invoke_without_command=True)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")
app.add_typer(data_app, name="data")
app.add_typer(review_app, name="review")
app.add_typer(db_app, name="db")


@app.command()
def init() -> None:
    """Create KBLOOP_HOME, the database (migrations applied) and a commented .env.example."""
    from store import open_db

    settings = ctx().settings
    settings.kbloop_home.mkdir(parents=True, exist_ok=True)
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    existed = settings.db_path.exists()
    open_db(settings.db_path)
    example = settings.kbloop_home / ".env.example"
    example.write_text(ENV_EXAMPLE, encoding="utf-8")
    verb = "up to date" if existed else "created"
    typer.echo(f"Workspace {settings.kbloop_home} ready; database {settings.db_path} {verb}.")
    typer.echo(f"Settings template: {example} (copy it to ./.env and edit).")


@kb_app.command("import")
def kb_import(
    paths: Annotated[list[Path], typer.Argument(help="Markdown, text, HTML, Word (.docx) or PDF files, or folders (recursive).")],
    embed: Annotated[bool, typer.Option(help="Compute semantic-search embeddings now (else on first answer).")] = True,
    allow_sensitive: Annotated[bool, typer.Option(
        "--allow-sensitive", help="Import documents although they hold secrets or personal data.")] = False,
    team: Annotated[Optional[str], typer.Option(
        help="The documents belong to this team (kbloop teams): only its questions see them. Default: shared.")] = None,
    prune: Annotated[bool, typer.Option(
        "--prune", help="What is imported is the whole knowledge base (of --team, or the shared one): documents "
                        "it does not include, deleted or renamed since, are removed (each is named).")] = False,
) -> None:
    """Import knowledge-base documents as searchable passages. Re-importing a changed file replaces it; a file
    deleted from the folder stays in the knowledge base until `kbloop kb remove` or an import with --prune.

    Folders are read recursively; links that lead out of a folder are not followed (each is named), and files of other
    types are skipped (counted by type). A PDF is read for its text layer: a scan without one is refused. Documents holding
    secrets or identity or payment numbers are refused (FILE:LINE for each) unless --allow-sensitive.
    """
    from store.documents import import_documents
    from store.kb import kb_stats

    c = ctx()
    result = import_documents(c.db, paths, allow_sensitive=allow_sensitive, team=team, prune=prune)
    for line in result.skipped + result.notices:
        typer.echo(line, err=True)
    for doc_path in result.removed:
        typer.echo(f"removed {doc_path}: not in this import (--prune)", err=True)
    read, changed = result.read, result.changed
    if embed:
        _embed_passages(c)
    stats = kb_stats(c.db)
    typer.echo(f"{count(read, 'document')} read{f' for team {team}' if team else ''}, {changed} new or changed, "
               f"{read - changed} unchanged; "
               f"knowledge base: {count(stats['documents'], 'document')}, {count(stats['passages'], 'passage')}.")



def _embed_passages(c) -> None:
    """Embed the passages the current embedder has not (new ones, or all after KBLOOP_EMBEDDING_MODEL changed),
    with a progress bar: a whole KB on two CPU cores takes minutes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from finetune.serving.kb_index import embed_missing_passages, index_model_name
    from store.kb import passages_missing_embedding

    model = index_model_name()  # the embedder's name (+ its latent-term layout)
    todo = len(passages_missing_embedding(c.db, model))
    if not todo:
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as progress:
        task = progress.add_task(f"Embedding passages ({model})", total=todo)
        embed_missing_passages(c.db, progress=lambda done, total: progress.update(task, completed=done, total=total))
    typer.echo(f"{todo} passages embedded with {model}.", err=True)


@kb_app.command("list")
def kb_list(
    team: Annotated[Optional[str], typer.Option(help="This team's documents. Default: the shared ones.")] = None,
    every_team: Annotated[bool, typer.Option("--all", help="Shared documents and every team's.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list of objects.")] = False,
) -> None:
    """The documents in the knowledge base: path, title, passages, team, when they were last changed."""
    from store.kb import list_documents

    if team is not None and every_team:
        fail("--team and --all: give one of them")
    c = ctx()
    docs = list_documents(c.db, team=require_team(c.db, team), every_team=every_team)
    if as_json:
        typer.echo(json.dumps([d.to_dict() for d in docs], ensure_ascii=False, indent=1))
        return
    if not docs:
        typer.echo("No documents" + (f" for team {team}" if team else "") + ". Add some with `kbloop kb import PATH`.")
        return
    for d in docs:
        owner = f"  [team {d.team}]" if d.team else ""
        typer.echo(f"{d.doc_path}  {d.title}  ({d.passages} passage{'s' if d.passages != 1 else ''}, "
                   f"updated {d.updated_at[:16].replace('T', ' ')}){owner}")


@kb_app.command("remove")
def kb_remove(
    doc_paths: Annotated[list[str], typer.Argument(help="Document paths as `kbloop kb list` shows them.")],
    team: Annotated[Optional[str], typer.Option(help="Remove this team's documents. Default: shared ones.")] = None,
) -> None:
    """Remove documents from the knowledge base: the bot no longer retrieves or cites them. An unknown path
    removes nothing."""
    from store.kb import delete_documents, list_documents

    c = ctx()
    team = require_team(c.db, team)
    known = {d.doc_path for d in list_documents(c.db, team=team)}
    missing = [p for p in doc_paths if p not in known]
    if missing:
        where = f"team {team}'s documents" if team else "the shared documents"
        fail(f"not in {where}: {', '.join(missing)}; nothing removed (see `kbloop kb list`)")
    removed = delete_documents(c.db, dict.fromkeys(doc_paths), team=team)
    typer.echo(f"Removed {len(set(doc_paths))} document(s), {removed} passage(s).")


@kb_app.command("search")
def kb_search(
    question: Annotated[str, typer.Argument(help="The question, in any language the KB is written in.")],
    k: Annotated[int, typer.Option("--k", min=1, help="How many passages to show.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list (empty when the KB does not cover it).")] = False,
    team: Annotated[Optional[str], typer.Option(
        help="Search as a question of this team would: the shared and the team's documents. Default: shared only.")] = None,
) -> None:
    """The passages the bot would retrieve for a question, best first, with the evidence behind each rank
    (BM25, similarity, relevance, word coverage, latent terms, fused score), or nothing when the KB does not cover it."""
    from finetune.serving.retrieval import not_covered_line, retrieve_scored, weak_match_line

    if not question.strip():
        fail("the question is empty")
    c = ctx()
    require_team(c.db, team)
    _embed_passages(c)  # a changed KBLOOP_EMBEDDING_MODEL re-embeds here, visibly, not inside the search
    results = retrieve_scored(c.db, question, k=k, team=team)
    if as_json:
        typer.echo(json.dumps([s.to_dict(rank) for rank, s in enumerate(results, 1)], ensure_ascii=False, indent=2))
        return
    if not results:
        typer.echo(not_covered_line(question))
        return
    for rank, s in enumerate(results, 1):
        typer.echo(f"{rank}. {s.passage.title}  [{s.passage.doc_path} #{s.passage.chunk_index}]  "
                   f"score {s.score:.3f}{'' if s.matches else ' (below the match score)'}")
        typer.echo("   " + ", ".join(f"{name} {value}" for name, value in s.evidence().items() if value is not None))
        typer.echo(f"   {_one_line(s.passage.content, 100)}")
    if weak := weak_match_line(results):
        typer.echo(weak)


@data_app.command("import")
def data_import(
    file: Annotated[Path, typer.Argument(help="JSONL, one JSON array of records, CSV or Excel (.xlsx, first sheet): instruction/input/output, question/answer, messages or conversations (ShareGPT).")],
    status: Annotated[str, typer.Option(help="approved (default) or pending (send through review).")] = "approved",
    question_field: Annotated[Optional[str], typer.Option(help="Read the question from this field.")] = None,
    answer_field: Annotated[Optional[str], typer.Option(help="Read the answer from this field.")] = None,
    team: Annotated[Optional[str], typer.Option(
        help="The examples belong to this team (kbloop teams): they answer and train only its questions. "
             "Default: shared.")] = None,
) -> None:
    """Import QA pairs as training examples and say how the file was read. A file with any bad line is refused whole.

    instruction/input/output is read in the layout the file uses: Alpaca's (the instruction is the question) or the
    LoRA guide's (one preamble as the instruction on every row, the question in `input`). Every row is scanned for
    secrets and personal data: as approved, a file with flagged rows is refused whole (FILE:LINE for each); with
    --status pending, they wait in review with the flag shown. A question may hold 4,000 characters, an answer or
    its input 20,000.
    """
    from store.formats import import_examples

    if status not in ("approved", "pending"):
        fail(f"--status must be approved or pending, not {status!r}")
    c = ctx()
    result = import_examples(c.db, file, status=status, reviewer="import", question_field=question_field,
                             answer_field=answer_field, team=team)
    typer.echo(result.summary(str(file), team))
    for line in result.other_answers:
        typer.echo(line, err=True)
    if result.held:
        typer.echo(f"{len(result.held)} row(s) hold secrets or personal data; review them before approving:", err=True)
        for line in result.held:
            typer.echo(line, err=True)
    for line in result.notices:
        typer.echo(line, err=True)


@data_app.command("export")
def data_export(
    format: Annotated[str, typer.Option("--format", help="sft | messages | dpo | kto")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL file.")],
    team: Annotated[Optional[str], typer.Option(
        help="What trains this team's adapter: the shared and the team's rows. Default: shared rows only.")] = None,
    as_trained: Annotated[bool, typer.Option(
        "--as-trained", help="sft and messages: each example as `kbloop train` prompts it (kbloop's system prompt, "
        "the passages retrieved for its question, approved answers to related ones, a follow-up's earlier turns), "
        "to train elsewhere an adapter that kbloop serves.")] = False,
    passages: Annotated[Optional[int], typer.Option(
        help="With --as-trained: passages per prompt. Default: `kbloop train`'s for the workspace's base.")] = None,
) -> None:
    """Write training data as JSONL for TRL / LLaMA-Factory: the examples `kbloop train` (with the same --team)
    trains on, as question and answer, or with --as-trained as the prompts it trains with. A team's rows are
    exported only with --team."""
    from store.export import EXPORT_FORMATS, write_export, write_jsonl

    if format not in EXPORT_FORMATS:
        fail(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    if passages is not None and not as_trained:
        fail("--passages goes with --as-trained: the plain export has no prompts")
    if passages is not None and passages < 0:
        fail(f"--passages must be 0 or more, not {passages}")
    c = ctx()
    if as_trained:
        from finetune.model.loading import names_tiny
        from finetune.training.config import TrainConfig, prompt_passages
        from finetune.training.data import as_trained_records

        base = c.settings.base_model
        k = prompt_passages(TrainConfig(base=base, k_passages=passages), tiny=names_tiny(base))
        records, left_out = as_trained_records(c.db, format, k=k, team=require_team(c.db, team))
        write_jsonl(out, records)
        n = len(records)
        typer.echo(f"{n} {format} records written to {out}, as trained with {count(k, 'passage')} per prompt.")
    else:
        n, left_out = write_export(c.db, format, out, team=team)
        typer.echo(f"{n} {format} records written to {out}.")
    if left_out:
        typer.echo(f"{left_out} record(s) left out: they hold secrets or personal data that no curator confirmed "
                   "(see `kbloop review --status approved` and the playground's review).", err=True)


@data_app.command("stats")
def data_stats(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Counts of examples by status and source, feedback by vote, knowledge-base size."""
    from store.examples import example_stats
    from store.interactions import feedback_stats
    from store.kb import kb_stats

    c = ctx()
    stats = {"examples": example_stats(c.db), "feedback": feedback_stats(c.db), "knowledge_base": kb_stats(c.db)}
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    ex, fb, kb = stats["examples"], stats["feedback"], stats["knowledge_base"]
    typer.echo(f"Knowledge base: {kb['documents']} documents, {kb['passages']} passages")
    typer.echo("Examples by status: " + ", ".join(f"{k} {v}" for k, v in ex["by_status"].items()))
    typer.echo("Examples by source: " + ", ".join(f"{k} {v}" for k, v in ex["by_source"].items()))
    typer.echo(f"Answers: {fb['interactions']}; votes 👍 {fb['up']} / 👎 {fb['down']}; corrections {fb['corrections']}")


@review_app.callback()
def review_list(
    typer_ctx: typer.Context,
    status: Annotated[str, typer.Option(help="pending | approved | rejected")] = "pending",
    limit: Annotated[int, typer.Option(help="How many to show.")] = 50,
    team: Annotated[Optional[str], typer.Option(help="Only this team's examples (`-`: the shared ones).")] = None,
) -> None:
    """List examples waiting for review (or with another status)."""
    if typer_ctx.invoked_subcommand is not None:
        return
    from store.examples import list_examples

    if status not in ("pending", "approved", "rejected"):
        fail(f"--status must be pending, approved or rejected, not {status!r}")
    if team not in (None, SHARED):
        require_team(ctx().db, team)
    items = list_examples(ctx().db, status=status, limit=limit, team=team)
    if not items:
        typer.echo(f"No {status} examples.")
        return
    from store.examples import disputed_example
    from store.sensitive import describe, find_sensitive_in

    db = ctx().db
    for ex in items:
        origin = f" (answer #{ex.interaction_id})" if ex.interaction_id else ""
        origin += f", team {ex.team}" if ex.team else ""
        typer.echo(f"#{ex.id} [{ex.source}{origin}] Q: {_one_line(ex.question)}")
        disputed = disputed_example(db, ex)
        if disputed is not None:
            typer.echo(f"    disputes #{disputed.id} ({disputed.status}): {_one_line(disputed.answer)}")
        if ex.rejected_answer:
            typer.echo(f"    was: {_one_line(ex.rejected_answer)}")
        typer.echo(f"    A:   {_one_line(ex.answer)}")
        found = find_sensitive_in(ex.question, ex.input, ex.answer)
        if found:
            typer.echo(f"    ⚠ contains {describe(found)}")


def _one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _reviewer() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@review_app.command("approve")
def review_approve(
    example_id: Annotated[int, typer.Argument(help="Example id (see `kbloop review`).")],
    answer: Annotated[Optional[str], typer.Option(help="Replace the answer before approving.")] = None,
    allow_sensitive: Annotated[bool, typer.Option(
        "--allow-sensitive", help="Approve although the text holds secrets or personal data (recorded).")] = False,
) -> None:
    """Approve an example, optionally with an edited answer. Text holding secrets or personal data is refused unless
    --allow-sensitive. Approving a correction that disputes an approved example replaces that example."""
    from store.examples import get_example, review_example
    from store.sensitive import describe, find_sensitive_in

    c = ctx()
    current = get_example(c.db, example_id)
    text = answer.strip() if answer is not None else current.answer
    found = find_sensitive_in(current.question, current.input, text)
    if found and not allow_sensitive:
        fail(f"#{example_id} not approved: it contains {describe(found)}; edit it with --answer, or pass "
             "--allow-sensitive to approve it anyway")
    ex = review_example(c.db, example_id, decision="approved", reviewer=_reviewer(), answer=answer,
                        sensitive_ok=allow_sensitive)
    replaced = f" (replaces #{current.disputes_example_id})" if current.disputes_example_id else ""
    typer.echo(f"#{ex.id} approved{replaced}: {_one_line(ex.answer)}")


@review_app.command("reject")
def review_reject(example_id: Annotated[int, typer.Argument(help="Example id.")]) -> None:
    """Reject an example: it is never trained on."""
    from store.examples import review_example

    ex = review_example(ctx().db, example_id, decision="rejected", reviewer=_reviewer())
    typer.echo(f"#{ex.id} rejected.")


@db_app.command("backup")
def db_backup(out: Annotated[Path, typer.Argument(help="Where to write the copy (must not exist).")]) -> None:
    """A consistent copy of the database, safe while the bot and workers are running."""
    from store import backup_db

    path = backup_db(ctx().db, out)
    typer.echo(f"Backup written to {path} ({path.stat().st_size // 1024} KiB).")
