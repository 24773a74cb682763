"""What the answer engine gives back: `Answer` and its `Source`s, and every text users read from it.

The texts live together so the bot, the playground and the command line show the same words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from store.text import CJK_CHAR

STARTING_TEXT = "I'm starting up: the model is still loading. Please ask again in a minute."
EMPTY_TEXT = "Please ask a question: the message was empty."
NO_MATCH_TEXT = "I could not find anything about this in the knowledge base, so I can't answer it reliably."
NO_MATCH_TEXT_ZH = "我在知识库中没有找到相关内容，无法可靠地回答这个问题。"
UNAVAILABLE_TEXT = "The answer engine is not available: {error}"
CLOSED_TEXT = "The answer engine is shutting down; please ask again in a moment."
TIMEOUT_TEXT = "Sorry, answering took too long. Please try again."
VERIFIED_BY_TEXT = "Approved answer: reviewed by {reviewer} on {date}"
VERIFIED_IMPORTED_TEXT = "Approved answer: from the curated training data (imported {date})"
# An approved example that backs an answer as context appears among its sources under this name.
APPROVED_SOURCE_TITLE = "Approved answer: {question}"


@dataclass(frozen=True)
class Source:
    title: str
    doc_path: str


@dataclass(frozen=True)
class Answer:
    text: str
    sources: list[Source]
    adapter_version: str | None  # the adapter that generated it; None = the base model
    latency_ms: int
    interaction_id: int | None  # the row in `interactions`; None when not recorded
    notice: str | None = None  # starting | empty | no_match | unbacked | weak_match | trimmed: … | adapter errors | timeout
    verified: bool = False  # a curator's approved answer, repeated as it is (no model generated it)
    example_id: int | None = None  # the approved example it repeats
    approved_by: str | None = None  # the curator who approved it ("import" for imported data)
    approved_at: str | None = None
    team: str | None = None  # the team whose question it was (store.teams); None: no team's

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def verified_line(self) -> str | None:
        """How a verified answer is marked, for every surface alike; None for a generated answer."""
        if not self.verified:
            return None
        date = (self.approved_at or "")[:10] or "an unknown date"
        if self.approved_by in (None, "import"):
            return VERIFIED_IMPORTED_TEXT.format(date=date)
        return VERIFIED_BY_TEXT.format(reviewer=self.approved_by, date=date)


def no_match_text(question: str) -> str:
    """The refusal when nothing in the knowledge base backs an answer, in the question's language."""
    return NO_MATCH_TEXT_ZH if CJK_CHAR.search(question) else NO_MATCH_TEXT


def sources_of(passages, related=()) -> list[Source]:
    """Each document once, in retrieval order, then the approved examples that backed the answer."""
    seen: dict[str, Source] = {}
    for p in passages:
        seen.setdefault(p.doc_path, Source(title=p.title, doc_path=p.doc_path))
    for m in related:
        path = f"examples/{m.example.id}"
        seen.setdefault(path, Source(title=APPROVED_SOURCE_TITLE.format(question=m.example.question), doc_path=path))
    return list(seen.values())
