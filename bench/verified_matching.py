"""How often does a question get someone else's approved answer, and how often does a rephrased one get its own?

    .venv/bin/python bench/verified_matching.py [--out bench/out/verified_matching.json]

Approved set: the 330 sample QA pairs (samples/qa.jsonl), English and Chinese, imported into a fresh store.
Asked, through finetune.serving.verified (the engine's own lookup):
- positives: for 48 approved questions (bench/data/verified_paraphrases.jsonl), a paraphrase in the same
  language and a translation into the other one. A hit is a verified match on that very example.
- related negatives: the same 96 questions after their own example is rejected in the store. The sample set
  has many questions on each subject (meal allowance in Berlin, in France, …), so what is left is the hardest
  kind of wrong answer: same subject, another question. Any verified match here is a false match.
- unrelated negatives: 24 off-topic questions (bench/data/verified_unrelated.txt), English and Chinese.

The sample set asks a few things twice in other words (the same answer under two questions): a match on such
a twin counts as right, not as a false match.

The items are split in two by position (even: tune, odd: report). The match threshold is the lowest that
gives no false match on the tune half, plus a margin; the related threshold (approved answers as context
in the prompt) the lowest above every unrelated question of the tune half. Both are then reported on the
report half, which played no part in choosing them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.serving.embedding import embedding_model_name  # noqa: E402
from finetune.serving.verified import DEFAULT_VERIFIED, search_examples  # noqa: E402
from store import open_db  # noqa: E402
from store.examples import add_examples, list_examples, review_example  # noqa: E402
from store.formats import read_examples_file  # noqa: E402

DATA = REPO / "bench" / "data"
MARGIN = 0.01
NO_BONUS = replace(DEFAULT_VERIFIED, cross_script_bonus=0.0)


def load_items() -> list[dict]:
    return [json.loads(line) for line in (DATA / "verified_paraphrases.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def measure(db, items: list[dict], unrelated: list[str]) -> list[dict]:
    by_question = {e.question: e for e in list_examples(db, status="approved")}
    rows = []
    for i, item in enumerate(items):
        own = by_question[item["approved"]]
        for kind in ("same", "cross"):
            top = search_examples(db, item[kind], k=1)[0]
            unadjusted = search_examples(db, item[kind], k=1, config=NO_BONUS)[0]
            rows.append({"item": i, "kind": kind, "ask": item[kind], "positive": True,
                         "similarity": top.similarity, "exact": top.exact, "right": top.example.answer == own.answer,
                         "right_without_bonus": unadjusted.example.answer == own.answer,
                         "top": top.example.question})
        review_example(db, own.id, decision="rejected", reviewer="bench")
        for kind in ("same", "cross"):
            top = search_examples(db, item[kind], k=1)[0]
            rows.append({"item": i, "kind": kind, "ask": item[kind], "positive": False, "related": True,
                         "similarity": top.similarity, "exact": top.exact, "right": top.example.answer == own.answer,
                         "top": top.example.question})
        review_example(db, own.id, decision="approved", reviewer="bench")
    for i, question in enumerate(unrelated):
        top = search_examples(db, question, k=1)[0]
        rows.append({"item": i, "kind": "unrelated", "ask": question, "positive": False, "related": False,
                     "similarity": top.similarity, "exact": top.exact, "right": False, "top": top.example.question})
    return rows


def scores(rows: list[dict], match: float, related: float) -> dict:
    def matched(r):
        return r["exact"] or r["similarity"] >= match

    pos = [r for r in rows if r["positive"]]
    out = {}
    for kind in ("same", "cross"):
        group = [r for r in pos if r["kind"] == kind]
        out[f"recall_{kind}"] = sum(matched(r) and r["right"] for r in group) / len(group)
    out["wrong_match_on_positives"] = sum(matched(r) and not r["right"] for r in pos)
    cross = [r for r in pos if r["kind"] == "cross"]
    out["translations_ranking_their_own_first"] = {
        "with_cross_script_bonus": f"{sum(r['right'] for r in cross)} of {len(cross)}",
        "without": f"{sum(r['right_without_bonus'] for r in cross)} of {len(cross)}"}
    rel = [r for r in rows if not r["positive"] and r.get("related") and not r["right"]]
    unrel = [r for r in rows if not r["positive"] and not r.get("related")]
    out["false_matches_related"] = f"{sum(matched(r) for r in rel)} of {len(rel)}"
    out["false_matches_unrelated"] = f"{sum(matched(r) for r in unrel)} of {len(unrel)}"
    out["unrelated_as_context"] = f"{sum(r['similarity'] >= related for r in unrel)} of {len(unrel)}"
    out["related_as_context"] = f"{sum(r['similarity'] >= related for r in rel)} of {len(rel)}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "verified_matching.json")
    args = parser.parse_args()
    items = load_items()
    unrelated = [q for q in (DATA / "verified_unrelated.txt").read_text(encoding="utf-8").splitlines() if q.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        db = open_db(Path(tmp) / "kbloop.db")
        add_examples(db, read_examples_file(REPO / "samples" / "qa.jsonl").examples, status="approved",
                     reviewer="import")
        started = time.perf_counter()
        rows = measure(db, items, unrelated)
        elapsed = time.perf_counter() - started
    n_lookups = len(rows)
    tune = [r for r in rows if r["item"] % 2 == 0]
    report = [r for r in rows if r["item"] % 2 == 1]
    tune_negatives = [r["similarity"] for r in tune if not r["positive"] and not r["exact"] and not r["right"]]
    tune_wrong = [r["similarity"] for r in tune if r["positive"] and not r["right"]]
    match = round(max(tune_negatives + tune_wrong) + MARGIN, 3)
    related = round(max(r["similarity"] for r in tune if r["kind"] == "unrelated") + MARGIN, 3)
    result = {
        "embedding_model": embedding_model_name(),
        "approved_examples": 330, "paraphrase_items": len(items), "unrelated_questions": len(unrelated),
        "cross_script_bonus": DEFAULT_VERIFIED.cross_script_bonus,
        "chosen_on_tune_half": {"match_similarity": match, "related_similarity": related},
        "in_use": {"match_similarity": DEFAULT_VERIFIED.match_similarity,
                   "related_similarity": DEFAULT_VERIFIED.related_similarity},
        "tune_half": scores(tune, match, related),
        "report_half": scores(report, match, related),
        "ms_per_lookup": round(1000 * elapsed / n_lookups, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "report_misses": [r for r in report if r["positive"] and not (r["similarity"] >= match and r["right"])],
        "report_false_matches": [r for r in report if not r["right"] and r["similarity"] >= match],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "report_misses", "report_false_matches")},
                     ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
