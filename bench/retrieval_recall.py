"""Retrieval recall@k on held-out paraphrased questions: BM25 alone, embeddings alone, hybrid.

    .venv/bin/python bench/retrieval_recall.py            # the table for docs/benchmarks.md
    .venv/bin/python bench/retrieval_recall.py --tune     # also a grid over the fusion settings

Imports samples/kb into a temporary store, then for each question in samples/retrieval_eval.jsonl checks
whether its source document is among the first k distinct documents of the ranking (document recall@k).
Per language of the question, and split into same-language and cross-lingual questions (an English
question about a Chinese document or the reverse). The BM25 baseline is store.kb.search_passages on the
raw question and the embeddings baseline a pure cosine ranking, both without match thresholds; hybrid is
exactly what the engine uses (segmented BM25 query, weighted reciprocal rank fusion, thresholds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.retrieval import DEFAULT_CONFIG, RetrievalConfig, embed_missing_passages, retrieve_scored  # noqa: E402
from store import open_db  # noqa: E402
from store.documents import import_documents  # noqa: E402

SAMPLES = REPO / "samples"


def load_kb(db, root: Path) -> None:
    import_documents(db, [root])
    embed_missing_passages(db)


def doc_language(source: str) -> str:
    return "zh" if source.startswith("kb/zh/") or source.endswith("-zh.md") else "en"


def groups_of(row: dict) -> list[str]:
    same = "same-language" if doc_language(row["source"]) == row["lang"] else "cross-lingual"
    return [row["lang"], "all", same]


def top_documents(db, question: str, *, k: int, mode: str, config: RetrievalConfig) -> list[str]:
    ranked = retrieve_scored(db, question, k=config.candidates, mode=mode, config=config)
    return list(dict.fromkeys(s.passage.doc_path for s in ranked))[:k]


def recall(db, rows: list[dict], *, k: int, mode: str, config: RetrievalConfig) -> dict[str, float]:
    hits: dict[str, list[int]] = {}
    for row in rows:
        want = row["source"].removeprefix("kb/")
        got = top_documents(db, row["question"], k=k, mode=mode, config=config)
        for group in groups_of(row):
            hits.setdefault(group, []).append(int(want in got))
    return {group: sum(h) / len(h) for group, h in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tune", action="store_true", help="grid over fusion weights and thresholds")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (SAMPLES / "retrieval_eval.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        db = open_db(Path(tmp) / "bench.db")
        started = time.perf_counter()
        load_kb(db, SAMPLES / "kb")
        print(f"KB imported and embedded in {time.perf_counter() - started:.1f}s")
        pure = dataclasses.replace(DEFAULT_CONFIG, min_dense_similarity=-1.0, min_dense_similarity_cjk=-1.0,
                                   min_bm25_score=-1e9, segment_query=False)
        langs = ["en", "zh", "all", "same-language", "cross-lingual"]
        counts = {g: sum(g in groups_of(r) for r in rows) for g in langs}
        print(f"\ndocument recall@{args.k} on {len(rows)} questions ({counts['en']} en, {counts['zh']} zh)\n")
        print("| retrieval | " + " | ".join(f"{lang} (n={counts[lang]})" for lang in langs) + " |")
        print("| --- | " + " | ".join("---" for _ in langs) + " |")
        for label, mode, cfg in [("BM25 (FTS5) alone", "bm25", pure), ("MiniLM embeddings alone", "dense", pure),
                                 ("hybrid (engine default)", "hybrid", DEFAULT_CONFIG)]:
            started = time.perf_counter()
            r = recall(db, rows, k=args.k, mode=mode, config=cfg)
            per_q = (time.perf_counter() - started) / len(rows) * 1000
            print(f"| {label} | " + " | ".join(f"{r[lang]:.3f}" for lang in langs) + f" |  ({per_q:.1f} ms/question)")
        if args.tune:
            print("\nfusion grid (hybrid):")
            results = []
            grid = [dict(fusion="rrf", rrf_k=60.0, bm25_weight=bw, cjk_bm25_weight=cbw, cjk_dense_weight=0.5)
                    for bw in (0.5, 1.0) for cbw in (2.0, 4.0)]
            grid += [dict(fusion="score", bm25_half=half, bm25_weight=bw, cjk_bm25_weight=cbw, cjk_dense_weight=cdw)
                     for half in (3.0, 5.0, 10.0) for bw in (0.25, 0.5, 1.0) for cbw in (1.0, 2.0)
                     for cdw in (0.25, 0.5)]
            for params in grid:
                r = recall(db, rows, k=args.k, mode="hybrid", config=dataclasses.replace(DEFAULT_CONFIG, **params))
                results.append((r["all"], r["en"], r["zh"], sorted(params.items())))
            for all_, en, zh, params in sorted(results, reverse=True)[:15]:
                print(f"  all {all_:.3f} en {en:.3f} zh {zh:.3f}  " + " ".join(f"{k}={v}" for k, v in params))

if __name__ == "__main__":
    main()
