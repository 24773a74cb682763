"""Retrieval over the knowledge base: which passages go into the prompt for a question, and whether any do.

Hybrid search over `kb_docs`:
- lexical: SQLite FTS5 BM25 over words (Chinese segmented by jieba, plus character bigrams; store.text);
- semantic: cosine similarity of e5 embeddings (finetune.embedding; multilingual, so a Chinese question
  finds an English passage and the reverse).

Whether the KB covers a question is decided per query, with evidence that does not depend on the KB's size
(issue 15: an absolute BM25 cut-off tuned on a 30-document KB dropped a verbatim match in a 5-document one,
because BM25 scores move with the collection):
- `relevance`: how far the passage's similarity stands above the question's similarity to background
  text (finetune/assets/retrieval_background.txt, in the passage's language), in standard deviations of
  the latter. e5's cosines are compressed (unrelated text scores ~0.75), and some questions are close to
  everything; this z-score is comparable across questions, languages and models.
- `coverage`: the share of the question's topical words (stop words removed) that the passage contains.
The fused score is `relevance + coverage_weight·coverage`; the KB covers the question when the best passage's
fused score reaches `min_score`. BM25 only orders the candidates (normalised by the query's best BM25 score),
so neither the decision nor its threshold moves when documents are added.

Passage embeddings are computed once, at `kbloop kb import` (or on the first retrieval after an import
without them, or after a change of KBLOOP_EMBEDDING_MODEL), and kept in the store as float32 bytes under the
embedder's name; each process keeps an in-memory matrix of them and reloads it only when passages change.

Assumptions: the KB is small enough (thousands of passages) for an exact dot product per question.
Tuned with bench/retrieval_recall.py on the tuning half of its questions; docs/benchmarks.md reports the other.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import sqlite_utils

from finetune.embedding import embed_passages, embed_queries, embedding_model_name, warm
from store.db import database_file
from store.kb import (
    Passage,
    embedding_state,
    get_passages,
    index_rows,
    passages_missing_embedding,
    search_passages,
    set_embeddings,
)
from store.text import cjk_words, index_terms

# Words that carry no topic. FTS5 has no stop list, so "what is the … of an …" would match every
# passage a little; dropping them keeps BM25 and coverage about the question's topic.
_EN_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
how i if in into is it its itself just me more most my no nor not now of off on once only or other our ours out
over own same she should so some such than that the their theirs them then there these they this those through
to too under until up very was we were what when where which while who whom why will with would you your yours
get got tell please need know want like there's what's can't don't i'm us also still
""".split())
# Chinese question words and particles, as jieba cuts them.
_ZH_STOPWORDS = frozenset("""
有没有 为什么 什么 怎么 怎样 怎么办 如何 多少 哪个 哪些 哪里 哪儿 几点 可以 能否 是否 还是 应该 需要 请问 一下
我们 你们 他们 没有 多久 多长 的 了 吗 呢 吧 啊 呀 嘛 是 我 你 他 她 要 能 会 在 和 与 或 吗 么 谁 给 把 被 让 就 都
也 还 又 再 很 有 到 去 做 用 这 那 哪 几 时候 什么样 可不可以 能不能 要不要 怎么样
""".split())
_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")


@dataclass(frozen=True)
class RetrievalConfig:
    """How evidence is fused and when the KB covers a question. Tuned by bench/retrieval_recall.py --tune."""

    candidates: int = 30  # depth of each ranking that enters the fusion
    coverage_weight: float = 2.0  # fused = relevance + coverage_weight * coverage
    bm25_weight: float = 0.5  # + bm25_weight * bm25 / (the query's best bm25): orders, never decides
    min_score: float = 4.0  # the KB covers the question when the best fused score reaches this
    background_by_language: bool = True  # baseline from background text in the passage's language


DEFAULT_CONFIG = RetrievalConfig()


@dataclass(frozen=True)
class ScoredPassage:
    passage: Passage
    score: float  # fused score, higher is better; comparable across questions and KBs
    matches: bool = False  # the passage alone would make the KB cover the question (score >= min_score)
    relevance: float | None = None  # similarity above the background, in its standard deviations
    coverage: float | None = None  # share of the question's topical words in the passage
    bm25_rank: int | None = None  # 1-based rank in each ranking, None when absent from it
    dense_rank: int | None = None
    bm25_score: float | None = None
    similarity: float | None = None  # cosine


# --- the embedding model (finetune.embedding): loaded once per process ------------------------------

def embedding_model() -> str:
    """Load everything retrieval needs (the embedder of KBLOOP_EMBEDDING_MODEL, its background vectors, the
    Chinese segmenter) now; returns the embedder's name. The engine calls it at start."""
    return warm_retrieval()


def embed_texts(texts: list[str]) -> np.ndarray:
    """Passage-side embeddings, one unit-length float32 row per text: (N, D)."""
    return embed_passages(texts)


def _passage_text(p: Passage) -> str:
    return f"{p.title}\n{p.content}"


def embed_missing_passages(db: sqlite_utils.Database, *, batch_size: int = 16, progress=None) -> int:
    """Compute and store embeddings for passages that have none (or another model's); returns how many.

    `progress(done, total)` is called after each batch (the CLI draws a bar with it)."""
    model = embedding_model_name()
    missing = passages_missing_embedding(db, model)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        vectors = embed_passages([_passage_text(p) for p in chunk])
        set_embeddings(db, model, {p.id: v.astype("<f4").tobytes() for p, v in zip(chunk, vectors)})
        if progress is not None:
            progress(start + len(chunk), len(missing))
    return len(missing)


# --- the in-memory index, one per database file ---------------------------------------------------

@dataclass
class _Index:
    state: tuple
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 384), dtype=np.float32))  # (N, D)
    cjk: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # passage written in CJK
    terms: dict[int, frozenset[str]] = field(default_factory=dict)  # passage id -> its index terms


_indexes: dict[tuple[str, str], _Index] = {}
_index_lock = threading.Lock()


def _dense_index(db: sqlite_utils.Database) -> _Index:
    """The embeddings matrix for this database, reloaded only when its passages changed."""
    model = embedding_model_name()
    state = embedding_state(db, model)
    if state[1] < state[0]:  # imported without embeddings (--no-embed), or by another embedder: embed now
        embed_missing_passages(db)
        state = embedding_state(db, model)
    key = (database_file(db), model)
    with _index_lock:
        index = _indexes.get(key)
        if index is not None and index.state == state:
            return index
    rows = index_rows(db, model)
    index = _Index(state=state)
    if rows:
        index.ids = np.array([r[0] for r in rows], dtype=np.int64)
        index.matrix = np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows]).astype(np.float32)
        index.cjk = np.array([is_cjk(r[3]) for r in rows], dtype=bool)
        index.terms = {r[0]: frozenset(r[2].split()) for r in rows}
    with _index_lock:
        _indexes[key] = index
    return index


# --- background: what unrelated text looks like to the embedder -----------------------------------

@functools.lru_cache(maxsize=4)
def _background(model_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the background sentences, (English rows, Chinese rows), for one embedder."""
    text = resources.files("finetune").joinpath("assets/retrieval_background.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    vectors = embed_passages(lines)
    cjk = np.array([is_cjk(line) for line in lines])
    return vectors[~cjk], vectors[cjk]


def warm_retrieval() -> str:
    """Load the embedder, the background and the Chinese segmenter now; returns the embedder's name."""
    name = warm()
    _background(name)
    index_terms("预热")  # jieba loads its dictionary on first use (about a second)
    return name


# --- search ----------------------------------------------------------------------------------------

def is_cjk(text: str) -> bool:
    """Whether the text is written (mostly) in a CJK script."""
    cjk = len(_CJK_CHAR.findall(text))
    latin = sum(len(w) for w in re.findall(r"[A-Za-z]+", text))
    return cjk > 0 and cjk >= latin / 3  # a Chinese character carries about as much as a 3-letter word


def topical_words(question: str) -> list[str]:
    """The question's words that say what it is about: English words and jieba's Chinese words, stop words out.

    "开叉车需要什么证书？" -> ["开", "叉车", "证书"]."""
    text = question.lower()
    words: list[str] = []
    pos = 0
    for run in _CJK_RUN.finditer(text):
        words += re.findall(r"[^\W_]+", text[pos : run.start()])
        words += [w for w in cjk_words(run.group())]
        pos = run.end()
    words += re.findall(r"[^\W_]+", text[pos:])
    return list(dict.fromkeys(w for w in words if w not in _EN_STOPWORDS and w not in _ZH_STOPWORDS))


def lexical_query(question: str) -> str:
    """The text BM25 is queried with: the question's topical words, each a separate chunk, so that no
    bigram straddles a stop word ("么证" from "什么证书")."""
    return " ".join(topical_words(question))


def bm25_ranking(db: sqlite_utils.Database, question: str, *, limit: int) -> list[tuple[Passage, float]]:
    """FTS5 BM25 over the question's topical words (index terms: words and bigrams)."""
    query = lexical_query(question)
    return search_passages(db, query, limit=limit) if query.strip() else []


def _word_weight(word: str) -> float:
    # A lone Chinese character ("开", "证") is a weaker clue than a word; an English word counts fully.
    return 0.5 if len(word) == 1 and _CJK_CHAR.match(word) else 1.0


def coverage(words: list[str], terms: frozenset[str]) -> float:
    """Weighted share of `words` found in a passage's index terms. A Chinese word the passage's segmentation
    cut differently counts when all its bigrams are there (叉车证 in "叉车 证")."""
    if not words:
        return 0.0
    total = found = 0.0
    for w in words:
        weight = _word_weight(w)
        total += weight
        if w in terms or (len(w) > 2 and _CJK_CHAR.match(w) and all(w[i : i + 2] in terms for i in range(len(w) - 1))):
            found += weight
    return found / total


def relevance(db: sqlite_utils.Database, question: str, *,
              config: RetrievalConfig = DEFAULT_CONFIG) -> tuple[_Index, np.ndarray, np.ndarray]:
    """(index, cosine similarity of the question to every passage, the same as z-scores over the background)."""
    index = _dense_index(db)
    model = embedding_model_name()
    q = embed_queries([question])[0]
    if not len(index.ids):
        return index, np.zeros(0, np.float32), np.zeros(0, np.float32)
    sims = index.matrix @ q  # (N, D) @ (D,) -> (N,)
    bg_en, bg_zh = _background(model)
    if config.background_by_language:
        stats = [(float(s.mean()), float(s.std()) + 1e-6) for s in (bg_en @ q, bg_zh @ q)]
        mean = np.where(index.cjk, stats[1][0], stats[0][0])
        std = np.where(index.cjk, stats[1][1], stats[0][1])
    else:
        both = np.concatenate([bg_en @ q, bg_zh @ q])
        mean, std = float(both.mean()), float(both.std()) + 1e-6
    return index, sims, (sims - mean) / std


def similarities(db: sqlite_utils.Database, question: str) -> dict[int, float]:
    """Cosine similarity of the question to every embedded passage, by passage id."""
    index, sims, _ = relevance(db, question)
    return dict(zip(index.ids.tolist(), sims.tolist()))


def fuse(relevance: float | None, coverage: float, bm25_score: float | None, best_bm25: float,
         config: RetrievalConfig = DEFAULT_CONFIG) -> tuple[float, bool]:
    """(fused score, whether it alone makes the KB cover the question). BM25 counts relative to the query's
    best BM25 score, and only in the order: the decision rests on evidence that does not scale with the KB."""
    decisive = (relevance or 0.0) + config.coverage_weight * coverage
    lexical = config.bm25_weight * (bm25_score or 0.0) / best_bm25 if best_bm25 > 0 else 0.0
    return decisive + lexical, decisive >= config.min_score


def retrieve_scored(db: sqlite_utils.Database, question: str, *, k: int = 3, mode: str = "hybrid",
                    config: RetrievalConfig = DEFAULT_CONFIG) -> list[ScoredPassage]:
    """Ranked passages with the evidence behind each rank; empty when the KB does not cover the question.

    `mode`: hybrid (the engine's) | bm25 | dense (one signal alone, ranked without a coverage decision:
    the baselines of bench/retrieval_recall.py)."""
    if mode not in ("hybrid", "bm25", "dense"):
        raise ValueError(f"retrieval mode must be hybrid, bm25 or dense, not {mode!r}")
    if k <= 0 or not question.strip():
        return []
    depth = max(config.candidates, k)
    if mode == "bm25":
        ranked = search_passages(db, question, limit=k)  # the raw question, as FTS5 alone would take it
        return [ScoredPassage(passage=p, score=b, bm25_rank=i, bm25_score=b) for i, (p, b) in enumerate(ranked, 1)]
    index, sims, z = relevance(db, question, config=config)
    if mode == "dense":
        top = np.argsort(-sims, kind="stable")[:k]
        ids = index.ids[top].tolist()
        passages = {p.id: p for p in get_passages(db, ids)}
        return [ScoredPassage(passage=passages[pid], score=float(sims[i]), dense_rank=r, similarity=float(sims[i]),
                              relevance=float(z[i])) for r, (pid, i) in enumerate(zip(ids, top.tolist()), 1)
                if pid in passages]

    bm25 = bm25_ranking(db, question, limit=depth)
    position = {pid: i for i, pid in enumerate(index.ids.tolist())}
    candidates: dict[int, dict] = {}
    for rank, (p, score) in enumerate(bm25, 1):
        candidates[p.id] = {"passage": p, "bm25_rank": rank, "bm25_score": score}
    for rank, i in enumerate(np.argsort(-z, kind="stable")[:depth].tolist(), 1):
        candidates.setdefault(int(index.ids[i]), {})["dense_rank"] = rank
    missing = [pid for pid, info in candidates.items() if "passage" not in info]
    for p in get_passages(db, missing):
        candidates[p.id]["passage"] = p
    words = topical_words(question)
    best_bm25 = max((b for _, b in bm25), default=0.0)
    scored = []
    for pid, info in candidates.items():
        if "passage" not in info:  # deleted since the index was loaded
            continue
        i = position.get(pid)
        rel = float(z[i]) if i is not None else None
        cov = coverage(words, index.terms.get(pid) or frozenset(index_terms(_passage_text(info["passage"]))))
        score, matches = fuse(rel, cov, info.get("bm25_score"), best_bm25, config)
        scored.append(ScoredPassage(score=score, matches=matches, relevance=rel, coverage=cov,
                                    similarity=float(sims[i]) if i is not None else None, **info))
    if config.min_score > float("-inf") and not any(s.matches for s in scored):
        # Nothing is convincing: the KB does not cover the question. Once one passage is, the others are
        # ranked as usual (the threshold decides "any match?", the fusion the order).
        return []
    scored.sort(key=lambda s: (-s.score, s.passage.id))  # ties fall back to passage id: deterministic
    return scored[:k]


def retrieve_passages(db: sqlite_utils.Database, question: str, *, k: int = 3) -> list[Passage]:
    """The `k` passages most relevant to `question`, best first (empty when nothing in the KB matches)."""
    return [s.passage for s in retrieve_scored(db, question, k=k)]
