"""Traditional Chinese against a simplified KB, and a traditional KB against simplified questions.

    .venv/bin/python bench/traditional_chinese.py             # kbloop as it is -> bench/out/traditional_chinese.json
    .venv/bin/python bench/traditional_chinese.py --no-fold   # without store.text.fold_script, for comparison

Employees in Taiwan and Hong Kong write traditional characters (叉車證) where the KB writes simplified (叉车证),
and a company's KB may be written in traditional. The questions are retrieval_recall.py's, both halves (nothing
here is tuned), each Chinese one also asked in traditional characters (OpenCC's s2tw, the Taiwan standard);
the second KB is `bilingual` with every document converted the same way, asked the original questions. Reported:
recall@3 of the covered questions, covered questions refused (false "nothing found"), and off-topic ones that
correctly find nothing, through the engine's retrieval (retrieve_passages, defaults).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import retrieval_recall as rr  # noqa: E402  (its KBs, questions and embedding cache)
from opencc import OpenCC  # noqa: E402

from finetune.serving import embedding, retrieval  # noqa: E402
from finetune.serving.retrieval import retrieve_passages  # noqa: E402

OUT = REPO / "bench" / "out" / "traditional_chinese.json"


def top_documents(db, question: str) -> list[str]:
    docs: list[str] = []
    for p in retrieve_passages(db, question, k=10):
        if p.doc_path not in docs:
            docs.append(p.doc_path)
    return docs[:rr.K]


def tally(db, rows: list[dict], ask) -> dict:
    """Per group (covered / off-topic): n, recall@3 or nothing found, and covered questions refused."""
    out: dict[str, dict] = {}
    for row in rows:
        docs = top_documents(db, ask(row["question"]))
        g = out.setdefault("off-topic" if row["source"] is None else "covered", {"n": 0, "hits": 0, "refused": 0})
        g["n"] += 1
        if row["source"] is None:
            g["hits"] += not docs
        else:
            g["hits"] += row["source"] in docs
            g["refused"] += not docs
    for name, g in out.items():
        g["nothing_found" if name == "off-topic" else "recall@3"] = round(g.pop("hits") / g["n"], 3)
        if name == "off-topic":
            g.pop("refused")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-fold", action="store_true", help="match traditional characters as written")
    ap.add_argument("--out", type=Path, default=None, help=f"default: {OUT} (with --no-fold, beside it)")
    a = ap.parse_args()
    if a.no_fold:  # every place kbloop folds: the index terms, the question's words, the embedder's input
        import store.text

        for module in (store.text, retrieval, embedding):
            module.fold_script = lambda text: text
    to_traditional = OpenCC("s2tw").convert
    tmp = Path(tempfile.mkdtemp(prefix="kbloop-traditional-"))
    report: dict = {"fold": not a.no_fold, "converter": "OpenCC s2tw (opencc-python-reimplemented)",
                    "machine": f"{platform.machine()}, {platform.python_version()}", "kbs": {}}
    kbs = {"sample": (REPO / "samples" / "kb", rr.sample_questions()),
           "bilingual": (rr.DATA / "kb", rr.bilingual_questions())}
    for name, (root, rows) in kbs.items():
        chinese = [r for r in rows if r["lang"] == "zh" and not r.get("near_miss")]
        (tmp / name).mkdir()
        db = rr.build_kb(tmp / name, [(root, None)])
        report["kbs"][name] = {"simplified questions": tally(db, chinese, lambda q: q),
                               "the same questions in traditional": tally(db, chinese, to_traditional)}
    # The bilingual KB written in traditional characters, asked every original question.
    folder = tmp / "traditional-kb"
    shutil.copytree(rr.DATA / "kb", folder)
    for f in folder.rglob("*.md"):
        f.write_text(to_traditional(f.read_text(encoding="utf-8")), encoding="utf-8")
    (tmp / "traditional-db").mkdir()
    db = rr.build_kb(tmp / "traditional-db", [(folder, None)])
    rows = [r for r in rr.bilingual_questions() if not r.get("near_miss")]
    report["kbs"]["bilingual in traditional"] = {
        f"{lang} questions": tally(db, [r for r in rows if r["lang"] == lang], lambda q: q) for lang in ("zh", "en")}
    out = a.out or (OUT.with_name("traditional_chinese_no_fold.json") if a.no_fold else OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report["kbs"], ensure_ascii=False, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
