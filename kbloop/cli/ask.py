"""Command: ask — answer a question from the command line with the engine the bot uses."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from kbloop.cli.app import app, ctx, fail
from store.teams import parse_channels, team_for_channel


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question, in quotes.")],
    adapter: Annotated[str, typer.Option(help="Which adapter answers: active (default), base, or a version like v3.")] = "active",
    model_only: Annotated[bool, typer.Option("--model-only", help="Answer with the model alone: no verified (curator-approved) answer, no approved answers in the prompt; answers even when nothing in the knowledge base backs it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as one JSON object.")] = False,
    k: Annotated[int, typer.Option("--k", min=1, max=20, help="Knowledge-base passages put into the prompt.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Longest answer, in tokens.")] = 256,
    time_limit: Annotated[float, typer.Option(min=1.0, help="Stop generating after this many seconds.")] = 60.0,
    record: Annotated[bool, typer.Option(help="Record the question and answer in the store (for feedback and review).")] = True,
    load_timeout: Annotated[float, typer.Option(min=1.0, help="Give up if the model has not loaded after this many seconds.")] = 900.0,
    channel: Annotated[Optional[str], typer.Option(
        help="Ask as if in this Slack channel: a team's channel gets the team's documents, approved answers and "
             "adapter (kbloop teams), any other only shared ones.")] = None,
) -> None:
    """Answer QUESTION from the knowledge base, with the base model and the active adapter (as the bot would).

    A question that matches an approved example (the same question, a paraphrase, the other language) gets
    the curator's approved answer at once, marked as such (`--model-only` asks the model instead).
    Prints the answer, its sources, the adapter that answered, the latency and the interaction id under
    which it was recorded. Without --channel the question belongs to no team: shared documents and answers only.
    """
    from finetune.serving.engine import ACTIVE, BASE, EngineConfig, check_adapter_for
    from kbloop.answering import engine_for

    if not question.strip():
        fail("the question is empty: pass it in quotes, e.g. kbloop ask \"How do I set up the VPN?\"")
    c = ctx()
    db = c.db  # one clear line when the workspace does not exist
    if channel is not None:
        found = parse_channels(channel)
        if len(found) != 1:
            fail(f"--channel takes one Slack channel id, not {channel!r}")
        channel = found[0]
    team = team_for_channel(db, channel)
    if adapter not in (ACTIVE, BASE):
        check_adapter_for(db, adapter, team)  # unknown version (StoreError lists the known ones), or another team's
    config = EngineConfig(k=k, max_new_tokens=max_new_tokens, time_limit_s=time_limit)
    engine = engine_for(c.settings, config)
    try:
        # A verified answer needs no model: only load one when the question has none.
        result = None
        if adapter == ACTIVE and not model_only:
            result = engine.verified_answer(question, source="cli", record=record, team=team, channel_id=channel)
        if result is None:
            engine.start()
            from rich.console import Console

            with Console(stderr=True).status(f"Loading {c.settings.base_model}…", spinner="dots"):
                engine.wait_ready(load_timeout)
            if engine.error:
                fail(f"could not load the model {c.settings.base_model!r} (KBLOOP_BASE_MODEL): {engine.error}")
            if not engine.ready:
                fail(f"the model {c.settings.base_model!r} did not load within {load_timeout:.0f}s (--load-timeout)")
            result = engine.answer(question, source="cli", adapter=adapter, record=record, model_only=model_only,
                                   channel_id=channel, team=team)
    finally:
        engine.close()
    if as_json:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return
    typer.echo(result.text)
    if result.sources:
        typer.echo("\nSources:")
        for s in result.sources:
            typer.echo(f"  - {s.title} ({s.doc_path})")
    footer = [result.verified_line or f"adapter: {result.adapter_version or 'base'}", f"{result.latency_ms} ms"]
    if team:
        footer.insert(0, f"team: {team}")
    if result.interaction_id is not None:
        footer.append(f"interaction #{result.interaction_id}")
    typer.echo("\n" + " · ".join(footer))
    if result.notice:
        typer.echo(f"note: {result.notice}", err=True)
