"""Retrieval over the knowledge base: which passages go into the prompt for a question, and whether any do.

Hybrid search over `kb_docs`:
- lexical: SQLite FTS5 BM25 over words (Chinese segmented by jieba, plus character bigrams; store.text) picks
  candidates, and word coverage scores them;
- semantic: e5 embeddings (finetune.serving.embedding; multilingual, so a Chinese question finds an English passage
  and the reverse) of each passage and of each of its sentences.

Whether the KB covers a question is decided per query, with evidence that does not depend on the KB's size
(issue 15: an absolute BM25 cut-off tuned on a 30-document KB dropped a verbatim match in a 5-document one,
because BM25 scores move with the collection). Per passage:
- `relevance` (see relevance()): CSLS of question and passage after each is centred on its language, with
  fixed background sentences (finetune/assets/retrieval_background.txt) as the neighbourhood; the mean of
  the whole passage's and its best sentence's. Centring matters most: e5 puts any Chinese text closer to a
  Chinese question than the English passage that answers it (0.82 vs 0.81 for "年假有多少天？"); subtracting
  each language's mean vector (Libovický et al. 2020, "On the language neutrality of pre-trained
  multilingual representations") took cross-language recall@3 from 0.14 to 0.92 on the bench's bilingual KB.
- `coverage`: the share of the question's topical words (stop words removed) that the passage contains.
fused = relevance + coverage_weight·coverage (+ bm25_weight·BM25 / the query's best BM25, which only orders;
tuned to 0). The KB covers the question when the best passage's fused score reaches `min_score` (raised by
`chinese_offset` for a Chinese question). Neither term of the decision looks at the rest of the KB, so a
passage scores the same in a KB of 5 documents or of 500.

Passage embeddings are computed once, at `kbloop kb import` (or on the first retrieval after an import
without them, or after a change of KBLOOP_EMBEDDING_MODEL), and kept in the store as float32 bytes under the
embedder's name; each process keeps an in-memory matrix of them and reloads it only when passages change.

Assumptions: the KB is small enough (thousands of passages) for an exact dot product per question.
Tuned with bench/retrieval_recall.py --tune on the tuning half of its questions; docs/benchmarks.md reports
the other half, and what the decision still gets wrong.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import sqlite_utils

from finetune.serving.embedding import embed_passages, embed_queries, embedding_dim, embedding_model_name, warm
from store.db import database_file
from store.kb import (
    Passage,
    count_missing_embeddings,
    get_passages,
    index_rows,
    kb_fingerprint,
    passages_missing_embedding,
    search_passages,
    set_embeddings,
)
from store.text import CJK_CHAR as _CJK_CHAR
from store.text import CJK_RUN as _CJK_RUN
from store.text import cjk_words, index_terms

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class RetrievalConfig:
    """How evidence is fused and when the KB covers a question. Tuned by bench/retrieval_recall.py --tune."""

    candidates: int = 30  # depth of each ranking that enters the fusion
    coverage_weight: float = 0.1  # fused = relevance + coverage_weight * coverage
    bm25_weight: float = 0.0  # + bm25_weight * bm25 / (the query's best bm25): orders, never decides
    min_score: float = 0.68  # the KB covers the question when the best fused score reaches this
    # Added to relevance in proportion to how far apart the languages of question and passage are (0..1):
    # after centring, a right answer in the other language still scores lower than one in the question's.
    cross_language_bonus: float = 0.1
    # The threshold rises by this much for a question in Chinese (in proportion to its CJK share): e5 puts a
    # Chinese question closer to any Chinese passage than an English question to any English one, so an
    # off-topic Chinese question scores like a covered English one. Per question, so it does not move with the
    # KB. On the bench's tuning halves, covered vs off-topic AUC 0.78 -> 0.82 (sample KB, fitted on the other
    # KB); on the test halves it trades errors rather than removing them (docs/benchmarks.md).
    chinese_offset: float = 0.2
    centre: bool = True  # centre question and passages on their language (False: raw cosines, for the bench)


DEFAULT_CONFIG = RetrievalConfig()  # multilingual-e5-small (the default embedder)
# Scores are on each embedder's own scale, so the threshold is tuned per embedder (bench/retrieval_recall.py
# --tune with KBLOOP_EMBEDDING_MODEL set); any other model gets the default's until someone tunes it.
TUNED_CONFIGS = {
    "all-MiniLM-L6-v2": RetrievalConfig(coverage_weight=0.05, bm25_weight=0.05, min_score=0.56, cross_language_bonus=0.2,
                                        chinese_offset=0.0),
}


def config_for(model_name: str) -> RetrievalConfig:
    """The tuned retrieval settings for an embedder (its name as finetune.serving.embedding gives it)."""
    return TUNED_CONFIGS.get(model_name, DEFAULT_CONFIG)


@dataclass(frozen=True)
class ScoredPassage:
    passage: Passage
    score: float  # fused score, higher is better; comparable across questions and KBs
    matches: bool = False  # the passage alone would make the KB cover the question (reaches the threshold)
    relevance: float | None = None  # similarity above the background, in its standard deviations
    coverage: float | None = None  # share of the question's topical words in the passage
    bm25_rank: int | None = None  # 1-based rank in each ranking, None when absent from it
    dense_rank: int | None = None
    bm25_score: float | None = None
    similarity: float | None = None  # cosine


# --- the embedding model (finetune.serving.embedding): loaded once per process ------------------------------

def embedding_model() -> str:
    """Load everything retrieval needs (the embedder of KBLOOP_EMBEDDING_MODEL, its background vectors, the
    Chinese segmenter) now; returns the embedder's name. The engine calls it at start."""
    return warm_retrieval()


def embed_texts(texts: list[str]) -> np.ndarray:
    """Passage-side embeddings, one unit-length float32 row per text: (N, D)."""
    return embed_passages(texts)


def _passage_text(p: Passage) -> str:
    return f"{p.title}\n{p.content}"


_SENTENCE_END = re.compile(r"(?<=[。！？.!?；;])\s*|\n+")
MAX_SENTENCES = 24  # per passage: bounds the cost of a passage that is one long list


def passage_sentences(p: Passage) -> list[str]:
    """The passage's sentences (list items, table rows), each with the title, as they are embedded.

    A question is usually answered by one sentence; a whole passage's vector averages it with the rest, so
    relevance also looks at the best sentence (bench: off-topic vs covered separability up ~0.02-0.05 AUC)."""
    parts = (part.strip(" \t-*#|>") for part in _SENTENCE_END.split(p.content))
    return [f"{p.title}\n{part}" for part in parts if len(part) >= 6][:MAX_SENTENCES]


def embed_missing_passages(db: sqlite_utils.Database, *, batch_size: int = 8, progress=None) -> int:
    """Compute and store embeddings for passages that have none (or another model's); returns how many.

    Each passage's blob holds float32 rows (1 + S, D): the whole passage, then each of its sentences.
    `progress(done, total)` is called after each batch (the CLI draws a bar with it)."""
    model = embedding_model_name()
    missing = passages_missing_embedding(db, model)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        texts = [[_passage_text(p)] + passage_sentences(p) for p in chunk]
        vectors = embed_passages([t for group in texts for t in group])
        blobs, row = {}, 0
        for p, group in zip(chunk, texts):
            blobs[p.id] = vectors[row : row + len(group)].astype("<f4").tobytes()
            row += len(group)
        set_embeddings(db, model, blobs)
        if progress is not None:
            progress(start + len(chunk), len(missing))
    return len(missing)


# --- the in-memory index, one per database file ---------------------------------------------------

@dataclass
class _Index:
    state: tuple
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 384), dtype=np.float32))  # (N, D)
    centred: np.ndarray = field(default_factory=lambda: np.zeros((0, 384), dtype=np.float32))  # (N, D)
    hub: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # (N,) see relevance()
    sentences: np.ndarray = field(default_factory=lambda: np.zeros((0, 384), dtype=np.float32))  # (S, D) centred
    sentence_hub: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # (S,)
    owner: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (S,) row of its passage
    with_sentences: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # passage rows...
    first_sentence: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # ...and where theirs start
    share: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # (N,) CJK share
    terms: dict[int, frozenset[str]] = field(default_factory=dict)  # passage id -> its index terms


_indexes: dict[tuple[str, str], _Index] = {}
_index_lock = threading.Lock()


def _dense_index(db: sqlite_utils.Database) -> _Index:
    """The embeddings matrix for this database, reloaded only when its passages changed."""
    model = embedding_model_name()
    state = kb_fingerprint(db)
    key = (database_file(db), model)
    with _index_lock:
        index = _indexes.get(key)
        if index is not None and index.state == state:
            return index
    missing = count_missing_embeddings(db, model)
    if missing:  # imported without embeddings (--no-embed), or by another embedder: embed now
        log.info("retrieval: embedding %d passages with %s (a changed KBLOOP_EMBEDDING_MODEL re-embeds the KB)",
                 missing, model)
        embed_missing_passages(db)
    rows = index_rows(db, model)
    index = _Index(state=state)
    if rows:
        dim = embedding_dim()
        blocks = [np.frombuffer(r[1], dtype="<f4").reshape(-1, dim) for r in rows]  # (1 + S_i, D) each
        index.ids = np.array([r[0] for r in rows], dtype=np.int64)
        index.matrix = np.stack([b[0] for b in blocks]).astype(np.float32)
        share = index.share = np.array([cjk_share(r[3].content) for r in rows], dtype=np.float32)
        background = _background(model)
        index.centred = _centre(index.matrix, share, background.passage_means)
        index.hub = (index.centred @ background.centred_queries.T).mean(axis=1)  # (N, M) -> (N,)
        index.owner = np.array([i for i, b in enumerate(blocks) for _ in range(len(b) - 1)], dtype=np.int64)
        counts = np.array([len(b) - 1 for b in blocks], dtype=np.int64)
        index.with_sentences = np.flatnonzero(counts)
        index.first_sentence = (np.cumsum(counts) - counts)[index.with_sentences]  # owner is sorted: contiguous runs
        if len(index.owner):
            texts = [t for r, b in zip(rows, blocks) for t in passage_sentences(r[3])[: len(b) - 1]]
            sentence_share = np.array([cjk_share(t.split("\n", 1)[-1]) for t in texts], dtype=np.float32)
            if len(sentence_share) != len(index.owner):  # split differently when embedded: the passage's mix
                sentence_share = share[index.owner]
            index.sentences = _centre(np.concatenate([b[1:] for b in blocks]).astype(np.float32), sentence_share,
                                      background.passage_means)
            index.sentence_hub = (index.sentences @ background.centred_queries.T).mean(axis=1)
        index.terms = {r[0]: frozenset(r[2].split()) for r in rows}
    with _index_lock:
        _indexes[key] = index
    return index


# --- background: what unrelated text looks like to the embedder -----------------------------------

@dataclass(frozen=True)
class _Background:
    passage_means: tuple[np.ndarray, np.ndarray]  # mean passage vector of (English, Chinese) text, (D,) each
    query_means: tuple[np.ndarray, np.ndarray]  # the same for text embedded as a question
    centred: np.ndarray  # the background sentences as centred passages, (M, D)
    centred_queries: np.ndarray  # ... and as centred questions, (M, D)


@functools.lru_cache(maxsize=4)
def _background(model_name: str) -> _Background:
    """The background sentences through one embedder: per-language means and centred vectors."""
    text = resources.files("finetune").joinpath("assets/retrieval_background.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    cjk = np.array([is_cjk(line) for line in lines])
    as_passages, as_queries = _background_vectors(model_name, lines)
    passage_means = (as_passages[~cjk].mean(axis=0), as_passages[cjk].mean(axis=0))
    query_means = (as_queries[~cjk].mean(axis=0), as_queries[cjk].mean(axis=0))
    centred = _centre(as_passages, cjk.astype(np.float32), passage_means)
    centred_queries = _centre(as_queries, cjk.astype(np.float32), query_means)
    return _Background(passage_means, query_means, centred, centred_queries)


def _background_vectors(model_name: str, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The background sentences embedded as passages and as questions: 192 texts, 5-10 s on a busy 2-core
    machine, so kept in $KBLOOP_HOME/models/ per embedder and text (`kbloop kb search` would pay it each run)."""
    import hashlib
    import os

    from kbloop.settings import load_settings

    digest = hashlib.sha1("\x1f".join([model_name, *lines]).encode()).hexdigest()[:16]
    try:
        path = load_settings().models_dir / "retrieval-background" / f"{digest}.npz"
    except Exception:  # settings that do not load: compute, do not cache (the caller reports bad settings)
        path = None
    if path is not None and path.exists():
        try:
            with np.load(path) as cached:
                return cached["passages"], cached["queries"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is recomputed
    as_passages, as_queries = embed_passages(lines), embed_queries(lines)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
            np.savez(tmp, passages=as_passages, queries=as_queries)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
        except OSError:
            pass  # a read-only home still works, only slower
    return as_passages, as_queries


def _centre(vectors: np.ndarray, share: np.ndarray, means: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Unit rows of `vectors` minus their language's mean: (N, D), `share` (N,) the CJK share of each text."""
    shifted = vectors - (share[:, None] * means[1] + (1.0 - share[:, None]) * means[0])
    return (shifted / np.maximum(np.linalg.norm(shifted, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def warm_retrieval() -> str:
    """Load the embedder, the background and the Chinese segmenter now; returns the embedder's name."""
    name = warm()
    _background(name)
    index_terms("预热")  # jieba loads its dictionary on first use (about a second)
    return name


# --- search ----------------------------------------------------------------------------------------

def cjk_share(text: str) -> float:
    """How much of the text is CJK, counting a character as much as 3 Latin letters (0: English, 1: Chinese)."""
    cjk = len(_CJK_CHAR.findall(text))
    latin = sum(len(w) for w in re.findall(r"[A-Za-z]+", text)) / 3
    return cjk / (cjk + latin) if cjk + latin else 0.0


def is_cjk(text: str) -> bool:
    """Whether the text is written (mostly) in a CJK script."""
    return cjk_share(text) >= 0.5


def topical_words(question: str) -> list[str]:
    """The question's words that say what it is about: English words and jieba's Chinese words, stop words out.

    "开叉车需要什么证书？" -> ["开", "叉车", "证书"]."""
    text = question.lower()
    words: list[str] = []
    pos = 0
    for run in _CJK_RUN.finditer(text):
        words += re.findall(r"[^\W_]+", text[pos : run.start()])
        words += cjk_words(run.group())
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


def _row_dots(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector, (N, D) @ (D,) -> (N,), on the calling thread. numpy's `@` hands it to OpenBLAS, which
    splits it over its worker threads; waking them cost 16 ms for 8,000 x 384 on 2 cores shared with other
    work, against 1.3 ms for einsum's single-threaded loop (a question's products are memory-bound anyway)."""
    return np.einsum("ij,j->i", matrix, vector)


def relevance(db: sqlite_utils.Database, question: str, *,
              config: RetrievalConfig | None = None) -> tuple[_Index, np.ndarray, np.ndarray]:
    """(index, cosine of the question to every passage, relevance of every passage).

    Relevance is CSLS (Conneau et al. 2018, "Word translation without parallel data") over centred vectors
    with the background as the neighbourhood: 2·cos(q, p) − mean cos(q, background) − mean cos(background
    questions, p). The second term discounts a question that is close to everything, the third a passage
    that is ("hubs": a long Chinese policy text near every Chinese question). Both are measured against the
    fixed background, never against the KB, so a passage's relevance is the same in a KB of 5 documents or
    of 500."""
    index = _dense_index(db)
    config = config or config_for(embedding_model_name())
    background = _background(embedding_model_name())
    q = embed_queries([question])[0]
    if not len(index.ids):
        return index, np.zeros(0, np.float32), np.zeros(0, np.float32)
    sims = _row_dots(index.matrix, q)  # (N, D) @ (D,) -> (N,)
    if not config.centre:
        return index, sims, sims
    share = cjk_share(question)
    qc = _centre(q[None, :], np.array([share], dtype=np.float32), background.query_means)[0]
    base = float(_row_dots(background.centred, qc).mean())
    rel = 2.0 * _row_dots(index.centred, qc) - base - index.hub  # (N,)
    if len(index.owner):
        # The passage's best sentence, by the same measure; relevance is the mean of passage and sentence.
        sentence_rel = 2.0 * _row_dots(index.sentences, qc) - base - index.sentence_hub  # (S,)
        best = rel.copy()
        rows = index.with_sentences
        best[rows] = np.maximum(rel[rows], np.maximum.reduceat(sentence_rel, index.first_sentence))
        rel = (rel + best) / 2.0
    return index, sims, rel + config.cross_language_bonus * np.abs(index.share - share)


def similarities(db: sqlite_utils.Database, question: str) -> dict[int, float]:
    """Cosine similarity of the question to every embedded passage, by passage id."""
    index, sims, _ = relevance(db, question)
    return dict(zip(index.ids.tolist(), sims.tolist()))


def match_score(config: RetrievalConfig, question_share: float) -> float:
    """The fused score a passage must reach for the KB to cover a question whose CJK share (cjk_share) is
    `question_share`: min_score, raised for Chinese by chinese_offset."""
    return config.min_score + config.chinese_offset * question_share


def fuse(relevance: float | None, coverage: float, bm25_score: float | None, best_bm25: float,
         config: RetrievalConfig, *, question_share: float = 0.0) -> tuple[float, bool]:
    """(fused score, whether it alone makes the KB cover the question). BM25 counts relative to the query's
    best BM25 score, and only in the order: the decision rests on evidence that does not scale with the KB.
    `question_share`: the question's CJK share, which sets the threshold (match_score)."""
    decisive = (relevance or 0.0) + config.coverage_weight * coverage
    lexical = config.bm25_weight * (bm25_score or 0.0) / best_bm25 if best_bm25 > 0 else 0.0
    return decisive + lexical, decisive >= match_score(config, question_share)


def retrieve_scored(db: sqlite_utils.Database, question: str, *, k: int = 3, mode: str = "hybrid",
                    config: RetrievalConfig | None = None) -> list[ScoredPassage]:
    """Ranked passages with the evidence behind each rank; empty when the KB does not cover the question.
    `config`: the embedder's tuned settings (config_for) unless given.

    `mode`: hybrid (the engine's) | bm25 | dense (one signal alone, ranked without a coverage decision:
    the baselines of bench/retrieval_recall.py)."""
    if mode not in ("hybrid", "bm25", "dense"):
        raise ValueError(f"retrieval mode must be hybrid, bm25 or dense, not {mode!r}")
    if k <= 0 or not question.strip():
        return []
    config = config or config_for(embedding_model_name())
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
    question_share = cjk_share(question)
    best_bm25 = max((b for _, b in bm25), default=0.0)
    scored = []
    for pid, info in candidates.items():
        if "passage" not in info:  # deleted since the index was loaded
            continue
        i = position.get(pid)
        rel = float(z[i]) if i is not None else None
        cov = coverage(words, index.terms.get(pid) or frozenset(index_terms(_passage_text(info["passage"]))))
        score, matches = fuse(rel, cov, info.get("bm25_score"), best_bm25, config, question_share=question_share)
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
