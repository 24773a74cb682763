"""Chat tab handlers: ask the engine, compare base / active / a candidate side by side, vote on answers.

The engine is passed in (one loaded model per process, shared with the bot in `kbloop serve`): any
finetune.serving.protocol.AnswerEngine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import sqlite_utils

from finetune.registry.folders import adapter_objective
from finetune.serving.protocol import AnswerEngine
from playground.auth import Viewer
from playground.review import Outcome
from store import StoreError
from store.adapters import active_adapter, list_adapters
from store.interactions import record_vote

BASE, ACTIVE = "base", "active"
NO_ENGINE = "No answer engine runs in this process (start the playground with `kbloop playground` or `kbloop serve`)."


@dataclass(frozen=True)
class ChatAnswer:
    adapter: str  # what was asked for: "base" | "active" | a version
    label: str  # what answered, for the column header
    text: str
    sources: list[dict]
    interaction_id: int | None
    latency_ms: int
    notice: str | None


def adapter_choices(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """(label, value) pairs for the compare dropdowns: active, base, then every registered version."""
    active = active_adapter(db)
    choices = [(f"active ({active.version})" if active else "active (none: base model)", ACTIVE), ("base model", BASE)]

    # An adapter trained on the votes says so (kto, dpo): comparing it with the one it continued is the point.
    choices += [(f"{a.version} ({a.status}{'' if adapter_objective(a) == 'sft' else ', ' + adapter_objective(a)}"
                 f"{f', team {a.team}' if a.team else ''})", a.version) for a in reversed(list_adapters(db))]
    return choices


def default_candidate(db: sqlite_utils.Database) -> str | None:
    """The newest candidate adapter, the natural third column of a comparison."""
    candidates = [a for a in list_adapters(db) if a.status == "candidate"]
    return candidates[-1].version if candidates else None


def ask(engine: AnswerEngine | None, viewer: Viewer, question: str, adapters: list[str], *, team: str | None = None) -> list[ChatAnswer]:
    """Answer `question` with each adapter (concurrently: the engine batches them). Each answer is recorded
    as an interaction with source "playground", so it can be voted on and reviewed like a Slack answer.
    `team`: ask as that team's channels would (store.teams): the shared and the team's documents and approved
    answers, "active" being the team's adapter (else the shared one); None: as no team, shared rows only."""
    question = (question or "").strip()
    adapters = [a for a in dict.fromkeys(a for a in adapters if a)]
    if not question:
        return [ChatAnswer(a, a, "Type a question first.", [], None, 0, "empty") for a in adapters]
    if engine is None:
        return [ChatAnswer(a, a, NO_ENGINE, [], None, 0, "no_engine") for a in adapters]

    def one(adapter: str) -> ChatAnswer:
        try:
            ans = engine.answer(question, source="playground", user_id=viewer.name, adapter=adapter, team=team)
        except StoreError as exc:
            return ChatAnswer(adapter, adapter, f"Could not answer with {adapter}: {exc}", [], None, 0, "error")
        label = "approved answer" if ans.verified else ans.adapter_version or "base model"
        if adapter == ACTIVE:
            label = f"active: {label}"
        sources = [{"title": s.title, "doc_path": s.doc_path} for s in ans.sources]
        notice = ans.verified_line or ans.notice
        return ChatAnswer(adapter, label, ans.text, sources, ans.interaction_id, ans.latency_ms, notice)

    with ThreadPoolExecutor(max_workers=max(1, len(adapters))) as pool:
        return list(pool.map(one, adapters))


def answer_markdown(ans: ChatAnswer | None) -> str:
    if ans is None:
        return ""
    parts = [f"**{ans.label}** · {ans.latency_ms} ms" + (f" · _{ans.notice}_" if ans.notice else ""), "", ans.text]
    if ans.sources:
        parts += ["", "Sources: " + "; ".join(f"{s['title']} (`{s['doc_path']}`)" for s in ans.sources)]
    return "\n".join(parts)


def vote(db: sqlite_utils.Database, viewer: Viewer, interaction_id: int | None, value: int,
         correction: str | None = None) -> Outcome:
    """A 👍 / 👎 on a playground answer, stored like Slack feedback (source "playground")."""
    if not interaction_id:
        return Outcome(False, "Nothing to vote on: ask a question first (answers that were not recorded cannot be voted on).")
    try:
        v = record_vote(db, interaction_id=int(interaction_id), user_id=viewer.name, vote=value,
                        correction=correction, source="playground")
    except StoreError as exc:
        return Outcome(False, f"Vote not recorded: {exc}")
    mark = "👍" if v.vote == 1 else "👎"
    extra = " with your correction (queued for review)" if v.correction and v.vote == -1 else ""
    return Outcome(True, f"{mark} recorded for answer #{interaction_id}{extra}.")
