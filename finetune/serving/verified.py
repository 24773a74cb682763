"""Verified answers: approved examples are searchable knowledge, in effect for the very next question.

    match = find_verified(db, "who's our DPO?")        # ExampleMatch | None: answer with match.example.answer
    related = related_examples(db, question, k=2)       # close but not the same: context for the prompt

Questions are compared by embedding (finetune.serving.embedding, multilingual) and by their normalised text (case,
spacing and closing punctuation ignored: always a match). Two questions in different scripts (Chinese and
English) score a fixed bonus over their cosine: the bundled multilingual-e5-small rates a translation lower
than a same-language question on a neighbouring subject, so without it the other language never matches.
Each approved question is embedded once and kept in `example_embeddings` with the hash of its text, so an
edit re-embeds it; each process keeps a matrix of them per database and reloads it when the approved set
changes (one cheap query per question), which is what makes an approval, an edit or a rejection count for
the next question without a restart.

The thresholds come from bench/verified_matching.py: chosen on one half of a bilingual paraphrase set and
reported on the other (docs/benchmarks.md, "Verified answers"). A verified answer repeats a curator's
words to someone else, so the match threshold is set for no false matches first, recall second: about half
of the same-language paraphrases match and few translations do; the rest are answered by the model, with the
related approved answers in its prompt.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import sqlite_utils

from finetune.serving.retrieval import is_cjk
from store.db import database_file
from store.text import fold_script
from store.verified import (
    ApprovedExample,
    approved_examples,
    approved_state,
    example_embeddings,
    matching_text_hash,
    set_example_embeddings,
)


@dataclass(frozen=True)
class VerifiedConfig:
    match_similarity: float = 0.963  # score at or above which an approved answer is given as it is
    related_similarity: float = 0.899  # at or above which an approved example is context for the prompt
    cross_script_bonus: float = 0.06  # added to the cosine of a Chinese/English pair


DEFAULT_VERIFIED = VerifiedConfig()


@dataclass(frozen=True)
class ExampleMatch:
    example: ApprovedExample
    similarity: float  # cosine, plus the cross-script bonus for a pair in two scripts
    exact: bool = False  # the same question once case, spacing and closing punctuation are ignored


_CLOSING = re.compile(r"[\s?？!！.。,，;；:：]+$")


def normalise_question(text: str) -> str:
    """The question for the exact comparison: case, spacing, closing punctuation and traditional characters
    (store.text.fold_script) set aside."""
    text = fold_script(unicodedata.normalize("NFKC", text).casefold())
    return _CLOSING.sub("", " ".join(text.split()))


@dataclass
class _Index:
    state: tuple
    model: str
    examples: list[ApprovedExample] = field(default_factory=list)
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=np.float32))
    cjk: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # per row: written in Chinese
    by_text: dict[str, list[int]] = field(default_factory=dict)  # normalised question -> rows (one per team at most)
    teams: list[str | None] = field(default_factory=list)  # per row: the example's team; None: shared
    _masks: dict[tuple[str, str | None], np.ndarray] = field(default_factory=dict, repr=False)

    def visible(self, team: str | None) -> np.ndarray:
        """(N,) bool: the examples a question of `team` may be answered with: shared ones and the team's."""
        mask = self._masks.get(("visible", team))
        if mask is None:
            mask = self._masks[("visible", team)] = np.array([t is None or t == team for t in self.teams], dtype=bool)
        return mask

    def own(self, team: str | None) -> np.ndarray:
        """(N,) bool: the team's own examples (none for no team)."""
        mask = self._masks.get(("own", team))
        if mask is None:
            mask = self._masks[("own", team)] = np.array([team is not None and t == team for t in self.teams],
                                                         dtype=bool)
        return mask


_indexes: dict[str, _Index] = {}
_lock = threading.Lock()


def _index(db: sqlite_utils.Database) -> _Index:
    from finetune.serving.embedding import embed_queries, embedding_model_name

    model = embedding_model_name()
    state = approved_state(db)
    key = database_file(db)
    with _lock:
        index = _indexes.get(key)
        if index is not None and index.state == state and index.model == model:
            return index
    examples = approved_examples(db)
    stored = example_embeddings(db, model)
    missing = [ex for ex in examples
               if ex.id not in stored or stored[ex.id][0] != matching_text_hash(ex.question)]
    if missing:
        # Questions are embedded as queries on both sides: question-to-question is a symmetric match.
        vectors = embed_queries([ex.question for ex in missing])
        fresh = {ex.id: (matching_text_hash(ex.question), v.astype("<f4").tobytes()) for ex, v in zip(missing, vectors)}
        set_example_embeddings(db, model, fresh)
        stored.update(fresh)
    index = _Index(state=state, model=model, examples=examples)
    if examples:
        index.matrix = np.stack([np.frombuffer(stored[ex.id][1], dtype="<f4") for ex in examples])
        for row, ex in enumerate(examples):
            index.by_text.setdefault(normalise_question(ex.question), []).append(row)
        index.cjk = np.array([is_cjk(ex.question) for ex in examples])
        index.teams = [ex.team for ex in examples]
    with _lock:
        _indexes[key] = index
    return index


def search_examples(db: sqlite_utils.Database, question: str, *, k: int = 5,
                    config: VerifiedConfig = DEFAULT_VERIFIED, team: str | None = None) -> list[ExampleMatch]:
    """The `k` approved examples closest to `question`, closest first (an exact match always first), among those a
    question of `team` may see: the shared ones and the team's (None: shared only). Another team's example is never
    returned. When both the team and the shared set have the question, the team's own answer is the exact match."""
    from finetune.serving.embedding import embed_queries

    question = question.strip()
    index = _index(db)
    if not question or not index.examples or k <= 0:
        return []
    visible = index.visible(team)
    if not visible.any():
        return []
    sims = index.matrix @ embed_queries([question])[0]  # (N, D) @ (D,) -> (N,)
    sims = sims + config.cross_script_bonus * (index.cjk != is_cjk(question))
    rows = [r for r in index.by_text.get(normalise_question(question), []) if visible[r]]
    exact_row = min(rows, key=lambda r: index.teams[r] is None) if rows else None  # the team's own first
    k = min(k, int(visible.sum()))
    # Among equally close examples the team's own comes first (a team may answer a shared question its own way).
    order = [int(i) for i in np.argsort(-np.where(visible, sims + 1e-4 * index.own(team), -np.inf), kind="stable")[:k]]
    if exact_row is not None:
        order = [exact_row] + [i for i in order if i != exact_row][: k - 1]
    return [ExampleMatch(index.examples[i], float(sims[i]), exact=i == exact_row) for i in order]


def find_verified(db: sqlite_utils.Database, question: str, *, config: VerifiedConfig = DEFAULT_VERIFIED,
                  team: str | None = None) -> ExampleMatch | None:
    """The approved example that answers this very question (a paraphrase or a translation of it) for a question
    of `team` (search_examples), if any."""
    best = search_examples(db, question, k=1, config=config, team=team)
    if best and (best[0].exact or best[0].similarity >= config.match_similarity):
        return best[0]
    return None


def related_examples(db: sqlite_utils.Database, question: str, *, k: int,
                     config: VerifiedConfig = DEFAULT_VERIFIED, exclude: frozenset[int] = frozenset(),
                     team: str | None = None) -> list[ExampleMatch]:
    """Up to `k` approved examples on the same subject (not matches) that a question of `team` may see: context for
    the prompt. `exclude`: ids left out, e.g. an example's own when its training prompt is built."""
    if k <= 0:
        return []
    found = search_examples(db, question, k=k + len(exclude), config=config, team=team)
    return [m for m in found if m.example.id not in exclude and not m.exact
            and m.similarity >= config.related_similarity][:k]
