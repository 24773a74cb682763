"""The prompt of one question as token ids: its passages, approved answers to related questions and the thread's
earlier turns (finetune.model.prompting builds the messages), trimmed to fit the context window.

What is cut when the prompt is too long, in order: the thread's oldest turns; then, when the question cannot be
told in a useful length (64 tokens, or all of it when shorter) beside the passages, passages from the end; then
the question itself, with a notice saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.model.prompting import (
    ApprovedAnswer,
    PromptPassage,
    Turn,
    approved_in_prompt,
    build_messages,
    history_within,
    render_prompt,
)
from store.interactions import thread_interactions


@dataclass
class PromptRequest:
    question: str
    passages: list  # store.kb.Passage, best first
    approved: list[ApprovedAnswer] = field(default_factory=list)  # answers to related questions
    history: list[Turn] = field(default_factory=list)  # the thread's earlier turns (follow-ups), oldest first


def thread_history(db, *, channel_id: str | None, thread_ts: str | None) -> list[Turn]:
    """kbloop's earlier answers in a Slack thread (store.interactions), oldest first: what a follow-up is
    asked after. None outside a thread."""
    if not channel_id or not thread_ts:
        return []
    return [Turn(i.question, i.answer) for i in thread_interactions(db, channel_id=channel_id, thread_ts=thread_ts)]


def fit_prompt(tok, req: PromptRequest, k: int, budget: int) -> tuple[list[int], str | None]:
    """The token ids of the prompt with the best `k` passages, at most `budget` tokens where it can be; and a
    notice when something the reader would miss (passages, part of the question) was cut."""
    passages = [PromptPassage(p.title, p.content) for p in req.passages[:k]]
    approved = req.approved[:approved_in_prompt(k)]
    question = req.question
    history = history_within(req.history, tok)

    def ids_of(q: str, ps) -> list[int]:
        messages = build_messages(q, passages=ps, approved=approved, history=history)
        return tok(render_prompt(tok, messages), add_special_tokens=False).input_ids

    ids = ids_of(question, passages)
    while len(ids) > budget and history:  # the oldest earlier turn goes first
        history = history[1:]
        ids = ids_of(question, passages)
    if len(ids) <= budget:
        return ids, None
    q_ids = tok(question, add_special_tokens=False).input_ids
    # Keep the passages if the question can still be told in a useful length; else drop them from the end.
    while True:
        room = budget - len(ids_of("", passages))
        if room >= min(64, len(q_ids)) or not passages:
            break
        passages = passages[:-1]
    room = max(1, room)
    trimmed = tok.decode(q_ids[:room], skip_special_tokens=True) if len(q_ids) > room else question
    notice = (f"trimmed: the question was cut to {min(room, len(q_ids))} of {len(q_ids)} tokens "
              "to fit the model's context")
    if len(passages) < len(req.passages[:k]):
        notice += f"; {len(req.passages[:k]) - len(passages)} passage(s) left out"
    return ids_of(trimmed, passages), notice
