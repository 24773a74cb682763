"""The one prompt builder, shared by training and answering.

What the model sees when it learns is what it sees when it answers: the same system prompt, the same
layout of retrieved passages, rendered by the tokenizer's own chat template (never a hard-coded one).

Follow-ups (issue 18): a question asked in a Slack thread where kbloop already answered carries the
thread's earlier turns (question, answer given) as earlier chat turns, the most recent that fit in
MAX_HISTORY_TOKENS (`history_within`); passages and approved answers go with the current question only.
Retrieval looks for `standalone_question`: a follow-up ("and for contractors?") is searched together with
the question it follows. The engine (serving) and finetune.training.data (a correction made on a follow-up) both
build such prompts with these functions, so train and serve see the same prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from store.text import CJK_CHAR

SYSTEM_PROMPT = (
    "You are the company's knowledge-base assistant. Answer the employee's question briefly and "
    "accurately, using the knowledge-base passages given with it. If they do not contain the answer, "
    "say that you could not find it instead of guessing. Answer in the language of the question."
)

# Passages are trimmed so that the prompt stays well inside small models' context windows.
MAX_PASSAGE_CHARS = 600
# Approved answers to related questions (finetune.serving.verified) that join the passages in a prompt.
MAX_APPROVED_IN_PROMPT = 2


@dataclass(frozen=True)
class PromptPassage:
    title: str
    content: str


@dataclass(frozen=True)
class ApprovedAnswer:
    """A curator-approved answer to a related question."""

    question: str
    answer: str


@dataclass(frozen=True)
class Turn:
    """An earlier question in the same thread and the answer kbloop gave to it."""

    question: str
    answer: str


# Earlier turns of a thread in a follow-up's prompt: whole turns, the most recent first, up to this many tokens.
MAX_HISTORY_TOKENS = 512

# What makes a question a follow-up for retrieval (standalone_question): it opens like one, refers back to
# something, or is too short to say what it is about on its own.
_FOLLOW_UP_OPENING = re.compile(r"^(and|or|but|also|so|then|what about|how about|what if|same for|even)\b",
                                re.IGNORECASE)
_REFERS_BACK = re.compile(r"\b(it|its|that|this|these|those|they|them|their|there|such|one|ones)\b", re.IGNORECASE)
_FOLLOW_UP_ZH = re.compile(r"^(那|那么|还有|和|而且|另外|如果)|它|这个|那个|这些|那些|他们")
_SHORT_WORDS = 5
_SHORT_CJK_CHARS = 8


def is_follow_up(question: str) -> bool:
    q = question.strip()
    if CJK_CHAR.search(q):
        return bool(_FOLLOW_UP_ZH.search(q)) or len(q) <= _SHORT_CJK_CHARS
    return bool(_FOLLOW_UP_OPENING.search(q) or _REFERS_BACK.search(q)) or len(q.split()) <= _SHORT_WORDS


def standalone_question(question: str, history: Sequence[Turn] = ()) -> str:
    """The question retrieval searches for. A deliberately simple rewrite, no model involved: a follow-up
    (`is_follow_up`) is searched as the question it follows (itself made standalone the same way) followed
    by the follow-up, e.g. "How many vacation days do I get? and for contractors?"; any other question,
    and every question without earlier turns, as it is."""
    question = question.strip()
    if not history or not is_follow_up(question):
        return question
    return f"{standalone_question(history[-1].question, history[:-1])} {question}"


def history_within(history: Sequence[Turn], tokenizer, budget: int = MAX_HISTORY_TOKENS) -> list[Turn]:
    """The most recent whole turns whose question and answer fit in `budget` tokens together (the oldest go
    first)."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(history):
        used += len(tokenizer(turn.question.strip() + "\n" + turn.answer.strip(),
                              add_special_tokens=False)["input_ids"])
        if used > budget:
            break
        kept.append(turn)
    return kept[::-1]


def approved_in_prompt(k_passages: int) -> int:
    """Approved answers per prompt: a model asked without passages (tiny) gets none either."""
    return min(MAX_APPROVED_IN_PROMPT, k_passages)


def build_messages(question: str, *, input: str = "", passages: Sequence[PromptPassage] = (),
                   approved: Sequence[ApprovedAnswer] = (), history: Sequence[Turn] = ()) -> list[dict]:
    """Chat messages for one question: system prompt, the thread's earlier turns (`history`, already bounded:
    history_within), then a user turn with the passages, the approved answers to related questions, and the
    question."""
    parts = []
    if passages:
        blocks = [f"[{i}] {p.title}\n{p.content[:MAX_PASSAGE_CHARS].strip()}" for i, p in enumerate(passages, 1)]
        parts.append("Knowledge base:\n" + "\n\n".join(blocks))
    if approved:
        pairs = [f"Q: {a.question.strip()}\nA: {a.answer[:MAX_PASSAGE_CHARS].strip()}" for a in approved]
        parts.append("Approved answers to related questions:\n" + "\n\n".join(pairs))
    parts.append(f"Question: {question.strip()}")
    if input and input.strip():
        parts.append(f"Context: {input.strip()}")
    earlier: list[dict] = []
    for turn in history:
        earlier += [{"role": "user", "content": f"Question: {turn.question.strip()}"},
                    {"role": "assistant", "content": turn.answer.strip()}]
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        *earlier,
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The generation prompt as text, through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat template; "
            "use an instruction-tuned model (e.g. Qwen/Qwen2.5-0.5B-Instruct) or `tiny`"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
