"""Near-duplicate questions: the same question asked in other words, in English or Chinese.

Two questions match when their normalised text is equal, or when their search terms overlap enough
(Dice coefficient over words, with Chinese runs split into character bigrams by store.text.search_terms,
so "怎么申请年假" and "如何申请年假" share 申请/请年/年假). Cheap enough to run over the whole dataset for
each item a curator opens.
"""

from __future__ import annotations

from dataclasses import dataclass

from store.text import normalize, search_terms

# Words that carry no meaning for "is this the same question" (English question scaffolding).
_STOP = frozenset(
    "a an the is are was were do does did i we you my our your to of in on for at how what when where who why which "
    "can could should would will may be it this that with and or there any".split()
)
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Candidate:
    kind: str  # "example" | "queue"
    id: int
    question: str
    status: str


@dataclass(frozen=True)
class Match:
    candidate: Candidate
    score: float


def question_terms(text: str) -> frozenset[str]:
    terms = [t for t in search_terms(text) if t not in _STOP]
    return frozenset(terms or search_terms(text))


def similarity(a: str, b: str) -> float:
    """1.0 for the same normalised text; else the Dice overlap of their terms (0..1)."""
    if normalize(a) == normalize(b):
        return 1.0
    ta, tb = question_terms(a), question_terms(b)
    if not ta or not tb:
        return 0.0
    return round(2 * len(ta & tb) / (len(ta) + len(tb)), 3)


def near_duplicates(question: str, candidates: list[Candidate], *, threshold: float = DEFAULT_THRESHOLD,
                    limit: int = 5) -> list[Match]:
    """The candidates that ask the same as `question`, best first."""
    target = question_terms(question)
    norm = normalize(question)
    matches = []
    for c in candidates:
        if normalize(c.question) == norm:
            score = 1.0
        else:
            terms = question_terms(c.question)
            if not terms or not target:
                continue
            score = round(2 * len(target & terms) / (len(target) + len(terms)), 3)
        if score >= threshold:
            matches.append(Match(candidate=c, score=score))
    matches.sort(key=lambda m: (-m.score, m.candidate.kind != "example", m.candidate.id))
    return matches[:limit]
