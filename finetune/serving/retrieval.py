"""Retrieval over the knowledge base: which passages go into the prompt for a question, and whether any do.

Hybrid search over `kb_docs`:
- lexical: SQLite FTS5 BM25 over words (Chinese segmented by jieba, plus character bigrams; store.text) picks
  candidates, and word coverage scores them;
- semantic: e5 embeddings (finetune.serving.embedding; multilingual, so a Chinese question finds an English passage
  and the reverse) of each passage and of each of its sentences.

Whether the KB covers a question is decided per query, with evidence that does not depend on the KB's size
(issue 15: an absolute BM25 cut-off tuned on a 30-document KB dropped a verbatim match in a 5-document one,
because BM25 scores move with the collection). Per passage:
- `relevance` (see evidence()): CSLS of question and passage after each is centred on its language, with
  fixed background sentences (finetune/assets/retrieval_background.txt) as the neighbourhood; the mean of
  the whole passage's and its best sentence's. Centring matters most: e5 puts any Chinese text closer to a
  Chinese question than the English passage that answers it (0.82 vs 0.81 for "年假有多少天？"); subtracting
  each language's mean vector (Libovický et al. 2020, "On the language neutrality of pre-trained
  multilingual representations") took cross-language recall@3 from 0.14 to 0.92 on the bench's bilingual KB.
- `coverage`: the share of the question's topical words (stop words removed) that the passage contains.
- `latent`: cosine of the question's and the passage's latent terms (finetune.serving.embedding: e5's sparse
  head, max-pooled over tokens; many are shared by English and Chinese). The dense vector averages a text
  into one point; latent terms say which concepts each token carries, so a passage that shares the
  question's general area but not its subject scores lower. On the bench's tuning halves (throwaway
  scripts over its questions), it raised the AUC of covered vs off-topic questions from 0.83 to 0.89
  (sample KB) and from 0.89 to 0.96 (bilingual KB).
Two fused scores weigh this evidence, each tuned for its own job (bench/retrieval_recall.py --tune: the order
first, for recall@3 alone; then the decision, given that order):
- the decision: relevance + coverage_weight·coverage + latent_weight·latent − the language pair's offset. The
  offset depends on the languages of question and passage (Chinese question and English passage, English and
  Chinese, both Chinese; both English is 0): e5 puts a Chinese question closer to any Chinese passage, and an
  answer in the other language lower, than the same pair in English. The KB covers the question when some
  passage's decision score reaches `min_score`.
- the order: the same sum with `ranking_latent_weight` and `ranking_pair_offsets` (+ bm25_weight·BM25 / the
  query's best BM25, tuned to 0). The offsets that decide best order worse: with one set for both, `sample`'s
  same-language tuning questions had their document in the top 3 0.86 of the time (cross-language 0.95);
  ordered with its own weight and offsets, 0.96 (0.93), the decision unchanged (docs/benchmarks.md).
No term looks at the rest of the KB, so a passage scores the same in a KB of 5 documents or of 500.

What the decision still gets wrong: off-topic workplace questions ("Can I bring my dog to the office?") sit as
close to a workplace KB as covered paraphrases do; with at most 5% of the covered questions refused, 0.25 of
the off-topic test questions find nothing on each bench KB (target 0.9). Measured on the tuning halves and not
adopted (docs/benchmarks.md, "Retrieval"): a logistic second stage over per-passage evidence (AUC of covered
vs off-topic 0.77 and 0.90 against 0.75 and 0.88; fitted on one KB, no gain on the other); a veto when the
question's words that the background corpus lacks are missing from the passage (it refuses covered
cross-language questions: 0.17 and 0.07 of them kept); the same words looked up in the passage's latent
terms (covered cross-language questions: 0.05 and 0.04 of those words found there; a lone word's latent terms
rarely cross languages).

Passage vectors and latent terms are computed at import and indexed per process: finetune.serving.kb_index.

Assumptions: the KB is small enough (thousands of passages) for an exact dot product per question.
Tuned with bench/retrieval_recall.py --tune on the tuning half of its questions; docs/benchmarks.md reports
the other half, and what the decision still gets wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import sqlite_utils

from finetune.serving.embedding import embed_question, embedding_model_name
from finetune.serving.kb_index import (  # noqa: F401  (embed_missing_passages, passage_sentences: re-exported)
    Index,
    background_for,
    centre,
    cjk_share,
    embed_missing_passages,
    kb_index,
    passage_sentences,
    passage_text,
    warm_retrieval,
)
from store.kb import Passage, get_passages, search_passages
from store.text import CJK_CHAR, CJK_RUN, cjk_words, fold_script, index_terms

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
    """How evidence is fused, in the order and in the decision, and when the KB covers a question. Tuned by
    bench/retrieval_recall.py --tune: the order (ranking_*) for recall@3 alone; then the decision, recall
    first: a false "nothing found" is a covered question the bot refuses, so the decision may refuse at most
    5% of the covered tuning questions the order finds, and keeps out what off-topic questions it can within
    that (docs/benchmarks.md, "Retrieval")."""

    candidates: int = 30  # depth of each ranking that enters the fusion
    coverage_weight: float = 0.1  # fused = relevance + coverage_weight * coverage
    # + latent_weight * cosine of latent terms (0: the second pass of the model is skipped). Embedders
    # without latent terms (MiniLM, hub models) score 0 there.
    latent_weight: float = 1.0
    latent_terms: int = 64  # the question's strongest latent terms that count (of 256 a passage keeps)
    # Retrieval reads this much of a question. A pasted page is not a question: read whole, its filler
    # outweighs the ask, and each pass of the model costs per token (a 22,000-character question took 30 s
    # for the dense pass and 20 s more for the latent one on two busy cores, holding the embedder meanwhile).
    question_chars: int = 2000
    bm25_weight: float = 0.0  # + bm25_weight * bm25 / (the query's best bm25): orders, never decides
    min_score: float = 0.81  # the KB covers the question when the best decision score reaches this
    # Added to relevance in proportion to how far apart the languages of question and passage are (0..1):
    # after centring, a right answer in the other language still scores lower than one in the question's.
    # 0 for e5, whose language-pair offsets below do this.
    cross_language_bonus: float = 0.0
    # The threshold rises by this much for a question in Chinese (in proportion to its CJK share): e5 puts a
    # Chinese question closer to any Chinese passage than an English question to any English one, so an
    # off-topic Chinese question scores like a covered English one. Per question, so it does not move with the
    # KB (docs/benchmarks.md, "Retrieval"). 0 for e5, whose language-pair offsets below do this.
    chinese_offset: float = 0.0
    # Per language pair of question and passage: how much higher the bar is that the passage's fused score
    # must clear (negative: lower), in proportion to how much the pair is that pair (question CJK share q,
    # passage CJK share p: Chinese question and English passage q·(1−p), English question and Chinese passage
    # (1−q)·p, both Chinese q·p; both English is the reference, 0). A finer form of chinese_offset (per
    # question) and cross_language_bonus (per passage); where these are tuned, those two are 0
    # (docs/benchmarks.md, "Retrieval"). They decide only: the order has its own (ranking_pair_offsets).
    zh_question_en_passage_offset: float = -0.1
    en_question_zh_passage_offset: float = -0.2
    zh_question_zh_passage_offset: float = 0.05
    # The order has its own latent weight and language-pair offsets (same pairs, same order as above; None: the
    # decision's), tuned for recall@3 alone: the offsets that decide best order worse (docs/benchmarks.md,
    # "Retrieval"). They move the order only, never whether the KB covers the question.
    ranking_latent_weight: float | None = 3.0
    ranking_pair_offsets: tuple[float, float, float] | None = (-0.1, -0.2, 0.2)
    # The KB covers a question only weakly when its best passage clears the threshold by less than this: the
    # answer is given, with the "weak_match" notice (Slack shows a caution line). Tuned after the threshold, on
    # the tuning halves: the widest band that flags at most 10% of the covered questions there
    # (bench/retrieval_recall.py --caution; docs/benchmarks.md, "Retrieval").
    confident_margin: float = 0.08
    centre: bool = True  # centre question and passages on their language (False: raw cosines, for the bench)


DEFAULT_CONFIG = RetrievalConfig()  # multilingual-e5-small (the default embedder)
# Scores are on each embedder's own scale, so the threshold is tuned per embedder (bench/retrieval_recall.py
# --tune with KBLOOP_EMBEDDING_MODEL set); any other model gets the default's until someone tunes it.
TUNED_CONFIGS = {
    "all-MiniLM-L6-v2": RetrievalConfig(coverage_weight=0.05, bm25_weight=0.05, min_score=0.56, cross_language_bonus=0.2,
                                        chinese_offset=0.0, latent_weight=0.0, zh_question_en_passage_offset=0.0,
                                        en_question_zh_passage_offset=0.0, zh_question_zh_passage_offset=0.0,
                                        ranking_latent_weight=None, ranking_pair_offsets=None,
                                        confident_margin=0.0),  # no weak-match band tuned for MiniLM
}


def config_for(model_name: str) -> RetrievalConfig:
    """The tuned retrieval settings for an embedder (its name as finetune.serving.embedding gives it)."""
    return TUNED_CONFIGS.get(model_name, DEFAULT_CONFIG)


@dataclass(frozen=True)
class ScoredPassage:
    passage: Passage
    score: float  # the order's fused score, higher is better; comparable across questions and KBs
    margin: float | None = None  # by how much it clears the threshold (negative: misses it); decision_margin
    relevance: float | None = None  # CSLS of the centred vectors against the background (evidence())
    coverage: float | None = None  # share of the question's topical words in the passage
    latent: float | None = None  # cosine of the question's and the passage's latent terms
    bm25_rank: int | None = None  # 1-based rank in each ranking, None when absent from it
    dense_rank: int | None = None
    bm25_score: float | None = None
    similarity: float | None = None  # cosine

    @property
    def matches(self) -> bool:
        """The passage alone would make the KB cover the question (it reaches the threshold)."""
        return self.margin is not None and self.margin >= 0

    def evidence(self) -> dict:
        """What ranked it, rounded for people: `kbloop kb search` and the playground's search show this."""
        return {
            "bm25": _rounded(self.bm25_score), "bm25_rank": self.bm25_rank,
            "similarity": _rounded(self.similarity), "dense_rank": self.dense_rank,
            "relevance": _rounded(self.relevance), "coverage": _rounded(self.coverage), "latent": _rounded(self.latent),
        }

    def to_dict(self, rank: int) -> dict:
        """One hit of `kbloop kb search --json` (doc_path, title, score and the evidence behind the rank)."""
        return {
            "rank": rank, "doc_path": self.passage.doc_path, "title": self.passage.title,
            "chunk_index": self.passage.chunk_index, "passage_id": self.passage.id,
            "score": _rounded(self.score, 4), "matches": self.matches, "margin": _rounded(self.margin, 4),
            "evidence": self.evidence(), "content": self.passage.content,
        }


def _rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def is_cjk(text: str) -> bool:
    """Whether the text is written (mostly) in a CJK script."""
    return cjk_share(text) >= 0.5


def topical_words(question: str) -> list[str]:
    """The question's words that say what it is about: English words and jieba's Chinese words, stop words out.

    "开叉车需要什么证书？" -> ["开", "叉车", "证书"]; traditional characters as simplified (fold_script)."""
    text = fold_script(question.lower())
    words: list[str] = []
    pos = 0
    for run in CJK_RUN.finditer(text):
        words += re.findall(r"[^\W_]+", text[pos : run.start()])
        words += cjk_words(run.group())
        pos = run.end()
    words += re.findall(r"[^\W_]+", text[pos:])
    return list(dict.fromkeys(w for w in words if w not in _EN_STOPWORDS and w not in _ZH_STOPWORDS))


def lexical_query(question: str) -> str:
    """The text BM25 is queried with: the question's topical words, each a separate chunk, so that no
    bigram straddles a stop word ("么证" from "什么证书")."""
    return " ".join(topical_words(question))


def bm25_ranking(db: sqlite_utils.Database, question: str, *, limit: int,
                 team: str | None = None) -> list[tuple[Passage, float]]:
    """FTS5 BM25 over the question's topical words (index terms: words and bigrams), among the passages a question
    of `team` may see."""
    query = lexical_query(question)
    return search_passages(db, query, limit=limit, team=team) if query.strip() else []


def _word_weight(word: str) -> float:
    # A lone Chinese character ("开", "证") is a weaker clue than a word; an English word counts fully.
    return 0.5 if len(word) == 1 and CJK_CHAR.match(word) else 1.0


def coverage(words: list[str], terms: frozenset[str]) -> float:
    """Weighted share of `words` found in a passage's index terms. A Chinese word the passage's segmentation
    cut differently counts when all its bigrams are there (叉车证 in "叉车 证")."""
    if not words:
        return 0.0
    total = found = 0.0
    for w in words:
        weight = _word_weight(w)
        total += weight
        if w in terms or (len(w) > 2 and CJK_CHAR.match(w) and all(w[i : i + 2] in terms for i in range(len(w) - 1))):
            found += weight
    return found / total


def row_dots(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector, (N, D) @ (D,) -> (N,), on the calling thread. numpy's `@` hands it to OpenBLAS, which
    splits it over its worker threads; waking them cost 16 ms for 8,000 x 384 on 2 cores shared with other
    work, against 1.3 ms for einsum's single-threaded loop (a question's products are memory-bound anyway)."""
    return np.einsum("ij,j->i", matrix, vector)


@dataclass(frozen=True)
class Evidence:
    """What the embedder says about every passage of the index for one question, (N,) arrays."""

    index: Index
    similarity: np.ndarray  # cosine of the raw vectors
    relevance: np.ndarray
    latent: np.ndarray  # zeros without latent terms


def evidence(db: sqlite_utils.Database, question: str, config: RetrievalConfig) -> Evidence:
    """Similarity, relevance and latent-term overlap of the question with every passage.

    Relevance is CSLS (Conneau et al. 2018, "Word translation without parallel data") over centred vectors
    with the background as the neighbourhood: 2·cos(q, p) − mean cos(q, background) − mean cos(background
    questions, p). The second term discounts a question that is close to everything, the third a passage
    that is ("hubs": a long Chinese policy text near every Chinese question). Both are measured against the
    fixed background, never against the KB, so a passage's relevance is the same in a KB of 5 documents or
    of 500. It is the mean of the whole passage's and its best sentence's."""
    index = kb_index(db)
    wanted = config.latent_weight or ranking_latent_weight(config)
    q, latents = embed_question(question, latent_terms=config.latent_terms if wanted else 0)
    n = len(index.ids)
    latent = np.zeros(n, np.float32)
    if not n:
        return Evidence(index, latent, latent, latent)
    sims = row_dots(index.matrix, q)  # (N, D) @ (D,) -> (N,)
    if latents is not None and index.latent_ids is not None and len(latents[0]):
        dense = np.zeros(int(max(index.latent_ids.max(), latents[0].max())) + 1, np.float32)
        dense[latents[0]] = latents[1] / max(float(np.linalg.norm(latents[1])), 1e-12)
        latent = (index.latent_weights * dense[index.latent_ids]).sum(axis=1)  # (N, K) -> (N,)
    if not config.centre:
        return Evidence(index, sims, sims, latent)
    background = background_for(embedding_model_name())
    share = cjk_share(question)
    qc = centre(q[None, :], np.array([share], dtype=np.float32), background.query_means)[0]
    base = float(row_dots(background.centred, qc).mean())
    rel = 2.0 * row_dots(index.centred, qc) - base - index.hub  # (N,)
    if len(index.owner):
        sentence_rel = 2.0 * row_dots(index.sentences, qc) - base - index.sentence_hub  # (S,)
        best = rel.copy()
        rows = index.with_sentences
        best[rows] = np.maximum(rel[rows], np.maximum.reduceat(sentence_rel, index.first_sentence))
        rel = (rel + best) / 2.0
    return Evidence(index, sims, rel + config.cross_language_bonus * np.abs(index.share - share), latent)


def language_pair_offset(config: RetrievalConfig, question_share, passage_share, *, ranking: bool = False):
    """How much the bar rises for this language pair (RetrievalConfig.zh_question_en_passage_offset and the
    other two), from the CJK shares of question and passage; floats or (N,) arrays of passage shares.
    `ranking`: the offsets of the order instead (RetrievalConfig.ranking_pair_offsets, when set)."""
    zh_en, en_zh, zh_zh = ((config.zh_question_en_passage_offset, config.en_question_zh_passage_offset,
                            config.zh_question_zh_passage_offset)
                           if not ranking or config.ranking_pair_offsets is None else config.ranking_pair_offsets)
    q, p = question_share, passage_share
    return zh_en * q * (1.0 - p) + en_zh * (1.0 - q) * p + zh_zh * q * p


def ranking_latent_weight(config: RetrievalConfig) -> float:
    """The latent terms' weight in the order (RetrievalConfig.ranking_latent_weight, or the decision's)."""
    return config.latent_weight if config.ranking_latent_weight is None else config.ranking_latent_weight


def match_score(config: RetrievalConfig, question_share: float) -> float:
    """The fused score a passage must reach for the KB to cover a question whose CJK share (cjk_share) is
    `question_share`: min_score, raised for Chinese by chinese_offset."""
    return config.min_score + config.chinese_offset * question_share


def not_covered_line(question: str) -> str:
    """Why a search found nothing, for people: the score a passage had to reach, and under which embedder."""
    name = embedding_model_name()
    config = config_for(name)
    pairs = (config.zh_question_en_passage_offset, config.en_question_zh_passage_offset,
             config.zh_question_zh_passage_offset)
    per_pair = ", moved by the languages of question and passage" if any(pairs) else ""
    return (f"The knowledge base does not cover this question (no passage reaches the match score "
            f"{match_score(config, cjk_share(question)):.2f} of {name}{per_pair}).")


def weak_match_line(scored: list[ScoredPassage]) -> str | None:
    """For people, when the passages found cover the question only weakly (weakly_covered): by how much the best
    clears the match score, against the band; None otherwise."""
    config = config_for(embedding_model_name())
    if not weakly_covered(scored, config):
        return None
    best = max(s.margin for s in scored if s.margin is not None)
    return (f"Weak match: the best passage clears the match score by {best:.3f}, less than {config.confident_margin:.2f}; "
            "the bot answers with a caution that the knowledge base may not cover the question.")


def fuse(relevance: float | None, coverage: float, bm25_score: float | None, best_bm25: float,
         config: RetrievalConfig, *, question_share: float = 0.0, latent: float = 0.0,
         passage_share: float = 0.0) -> tuple[float, bool]:
    """(fused score, which orders; whether the passage alone makes the KB cover the question). The two weigh
    the same evidence differently: the order with the ranking's latent weight and language-pair offsets, the
    decision with its own (RetrievalConfig). BM25 counts relative to the query's best BM25 score, and only in
    the order: the decision rests on evidence that does not scale with the KB.
    `question_share`, `passage_share`: the CJK shares of question and passage, which set the threshold
    (match_score) and the language pair's offsets (language_pair_offset)."""
    rel = relevance or 0.0
    lexical = (bm25_score or 0.0) / best_bm25 if best_bm25 > 0 else 0.0
    return (order_score(rel, coverage, config, question_share=question_share, latent=latent,
                        passage_share=passage_share, lexical=lexical),
            decision_margin(rel, coverage, config, question_share=question_share, latent=latent,
                            passage_share=passage_share) >= 0)


def order_score(relevance, coverage, config: RetrievalConfig, *, question_share=0.0, latent=0.0, passage_share=0.0,
                lexical=0.0):
    """The order's fused score: floats, or arrays of passages (the dense ranking, the bench's grids).
    `lexical`: the passage's BM25 score over the query's best (0..1)."""
    return (relevance + config.coverage_weight * coverage + ranking_latent_weight(config) * latent
            - language_pair_offset(config, question_share, passage_share, ranking=True) + config.bm25_weight * lexical)


def decision_score(relevance, coverage, config: RetrievalConfig, *, question_share=0.0, latent=0.0, passage_share=0.0):
    """The decision's fused score, which match_score is measured against: floats, or arrays of passages."""
    return (relevance + config.coverage_weight * coverage + config.latent_weight * latent
            - language_pair_offset(config, question_share, passage_share))


def decision_margin(relevance, coverage, config: RetrievalConfig, *, question_share=0.0, latent=0.0, passage_share=0.0):
    """How far the decision score is above (or below: negative) the score that makes the KB cover the question."""
    return (decision_score(relevance, coverage, config, question_share=question_share, latent=latent,
                           passage_share=passage_share) - match_score(config, question_share))


def retrieve_scored(db: sqlite_utils.Database, question: str, *, k: int = 3, mode: str = "hybrid",
                    config: RetrievalConfig | None = None, team: str | None = None) -> list[ScoredPassage]:
    """Ranked passages with the evidence behind each rank; empty when the KB does not cover the question.
    `config`: the embedder's tuned settings (config_for) unless given.

    `team`: the question's team (store.teams). Only the shared passages and that team's are candidates, in every
    ranking, so another team's passage can neither be returned nor decide that the KB covers the question;
    None (a question from no team's channel): shared passages only.

    `mode`: hybrid (the engine's) | bm25 | dense (one signal alone, ranked without a coverage decision:
    the baselines of bench/retrieval_recall.py)."""
    if mode not in ("hybrid", "bm25", "dense"):
        raise ValueError(f"retrieval mode must be hybrid, bm25 or dense, not {mode!r}")
    if k <= 0 or not question.strip():
        return []
    config = config or config_for(embedding_model_name())
    question = question[: config.question_chars]
    if mode == "bm25":
        ranked = search_passages(db, question, limit=k, team=team)  # the raw question, as FTS5 alone would take it
        return [ScoredPassage(passage=p, score=b, bm25_rank=i, bm25_score=b) for i, (p, b) in enumerate(ranked, 1)]
    ev = evidence(db, question, config)
    ids = ev.index.ids
    hidden = ~ev.index.visible(team)  # (N,) another team's passages: never ranked
    if mode == "dense":
        top = np.argsort(-np.where(hidden, -np.inf, ev.similarity), kind="stable")[: min(k, int((~hidden).sum()))]
        passages = {p.id: p for p in get_passages(db, ids[top].tolist())}
        return [ScoredPassage(passage=passages[int(ids[i])], score=float(ev.similarity[i]), dense_rank=r,
                              similarity=float(ev.similarity[i]), relevance=float(ev.relevance[i]))
                for r, i in enumerate(top.tolist(), 1) if int(ids[i]) in passages]

    depth = max(config.candidates, k)
    bm25 = bm25_ranking(db, question, limit=depth, team=team)
    candidates: dict[int, dict] = {p.id: {"passage": p, "bm25_rank": r, "bm25_score": b} for r, (p, b) in enumerate(bm25, 1)}
    # The semantic ranking enters with the evidence of the order that does not need the passage's text; the
    # passage that the decision's evidence (coverage aside) puts first enters too, however low the order puts it.
    words, share = topical_words(question), cjk_share(question)
    shares = dict(question_share=share, latent=ev.latent, passage_share=ev.index.share)
    dense = np.where(hidden, -np.inf, order_score(ev.relevance, 0.0, config, **shares))
    dense_order = np.argsort(-dense, kind="stable")[: min(depth, int((~hidden).sum()))]
    for rank, i in enumerate(dense_order.tolist(), 1):
        candidates.setdefault(int(ids[i]), {})["dense_rank"] = rank
    if (~hidden).any():
        decisive = np.where(hidden, -np.inf, decision_score(ev.relevance, 0.0, config, **shares))
        candidates.setdefault(int(ids[int(np.argmax(decisive))]), {})
    for p in get_passages(db, [pid for pid, info in candidates.items() if "passage" not in info]):
        candidates[p.id]["passage"] = p
    position = {pid: i for i, pid in enumerate(ids.tolist())}
    best_bm25 = max((b for _, b in bm25), default=0.0)
    scored = []
    for pid, info in candidates.items():
        if "passage" not in info:  # deleted since the index was loaded
            continue
        if info["passage"].team not in (None, team):  # re-imported for another team since the index was loaded
            continue
        i = position.get(pid)
        rel, latent = (float(ev.relevance[i]), float(ev.latent[i])) if i is not None else (None, 0.0)
        passage_share = float(ev.index.share[i]) if i is not None else cjk_share(info["passage"].content)
        cov = coverage(words, ev.index.terms.get(pid) or frozenset(index_terms(passage_text(info["passage"]))))
        evidence_of = dict(question_share=share, latent=latent, passage_share=passage_share)
        lexical = (info.get("bm25_score") or 0.0) / best_bm25 if best_bm25 > 0 else 0.0
        score = order_score(rel or 0.0, cov, config, lexical=lexical, **evidence_of)
        margin = decision_margin(rel or 0.0, cov, config, **evidence_of)
        scored.append(ScoredPassage(score=score, margin=margin, relevance=rel, coverage=cov,
                                    latent=latent if i is not None else None,
                                    similarity=float(ev.similarity[i]) if i is not None else None, **info))
    if config.min_score > float("-inf") and not any(s.matches for s in scored):
        # Nothing is convincing: the KB does not cover the question. Once one passage is, the others are
        # ranked as usual (the threshold decides "any match?", the fusion the order).
        return []
    scored.sort(key=lambda s: (-s.score, s.passage.id))  # ties fall back to passage id: deterministic
    return scored[:k]


def weakly_covered(scored: list[ScoredPassage], config: RetrievalConfig | None = None) -> bool:
    """Whether the passages retrieve_scored returned cover the question only weakly: found, but the best of them
    clears the threshold by less than `confident_margin` (the engine answers with the "weak_match" notice)."""
    config = config or config_for(embedding_model_name())
    margins = [s.margin for s in scored if s.margin is not None]
    return bool(margins) and max(margins) < config.confident_margin


def retrieve_passages(db: sqlite_utils.Database, question: str, *, k: int = 3, team: str | None = None) -> list[Passage]:
    """The `k` passages most relevant to `question` of `team` (shared and that team's passages; None: shared only),
    best first (empty when nothing in the KB matches)."""
    return [s.passage for s in retrieve_scored(db, question, k=k, team=team)]


def embedding_model() -> str:
    """Load everything retrieval needs (the embedder of KBLOOP_EMBEDDING_MODEL, its background vectors, the
    Chinese segmenter) now; returns the embedder's name. The engine calls it at start."""
    return warm_retrieval()
