"""The one prompt builder, shared by training and answering.

What the model sees when it learns is what it sees when it answers: the same system prompt, the same
layout of retrieved passages, rendered by the tokenizer's own chat template (never a hard-coded one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are the company's knowledge-base assistant. Answer the employee's question briefly and "
    "accurately, using the knowledge-base passages given with it. If they do not contain the answer, "
    "say that you could not find it instead of guessing. Answer in the language of the question."
)

# Passages are trimmed so that the prompt stays well inside small models' context windows.
MAX_PASSAGE_CHARS = 600
# Approved answers to related questions (finetune.verified) that join the passages in a prompt.
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


def approved_in_prompt(k_passages: int) -> int:
    """Approved answers per prompt: a model asked without passages (tiny) gets none either."""
    return min(MAX_APPROVED_IN_PROMPT, k_passages)


def build_messages(question: str, *, input: str = "", passages: Sequence[PromptPassage] = (),
                   approved: Sequence[ApprovedAnswer] = ()) -> list[dict]:
    """Chat messages for one question: system prompt, then a user turn with the passages, the approved answers
    to related questions, and the question."""
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
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
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
