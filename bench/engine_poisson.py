"""Answer latency under Poisson arrivals, with an adapter that stops early: continuous batching against the
engine of any other tree.

    .venv/bin/python bench/engine_poisson.py --prepare /tmp/poisson-ws            # train + promote, once
    .venv/bin/python bench/engine_poisson.py --workspace /tmp/poisson-ws --label continuous \\
        --rates 2,8,16 --questions 32 --repeats 3 --out bench/out/engine_poisson_continuous.json
    git worktree add /tmp/engine_before 0c53e77
    PYTHONPATH=/tmp/engine_before .venv/bin/python bench/engine_poisson.py --workspace /tmp/poisson-ws \\
        --label before --rates 2,8,16 --questions 32 --repeats 3 --out bench/out/engine_poisson_before.json
    .venv/bin/python bench/engine_poisson.py --summary bench/out/engine_poisson_continuous.json \\
        bench/out/engine_poisson_before.json > bench/out/engine_poisson_summary.json

`--prepare`: a workspace with the sample KB, samples/qa.jsonl approved, an adapter trained on it with the
`tiny` defaults (train_candidate with no options, as bench/tiny_memorisation.py) and promoted. It
reproduces its training answers, so generation stops at the end-of-turn token after a few dozen tokens.
On a machine too busy to finish that training, interrupt it and serve its latest checkpoint instead:
`--register-checkpoint /tmp/poisson-ws` (what docs/benchmarks.md reports: step 152 of 760, answers of 4 tokens).

A run: one Engine (its defaults: greedy, 256 new tokens at most) on the workspace; the training questions
(first `--questions` of them, fixed order) asked with `model_only` (a verified answer would skip the model)
and `record=False`, each from its own thread at a time drawn from a Poisson process of `rate` questions per
second (exponential gaps, fixed seed: every engine gets the same schedule). Per question: latency (asked to
answer), time to the first streamed characters (`on_text`), the answer. Throughput: questions over the time
from the first arrival to the last answer. Query embeddings are computed before the runs (cached per
process), as in bench/engine_batching.py.

Which engine runs is whatever `finetune` the interpreter imports: this tree, or another one put first on
PYTHONPATH (this script puts its own tree last on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # after PYTHONPATH: another tree's engine can be measured with this script
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import finetune.serving.engine as engine_module  # noqa: E402
from finetune.evaluation.metrics import EvalConfig  # noqa: E402
from finetune.registry.candidates import train_candidate  # noqa: E402
from finetune.registry.promotion import promote  # noqa: E402
from finetune.serving.engine import Engine  # noqa: E402
from finetune.serving.retrieval import embed_missing_passages, retrieve_passages  # noqa: E402
from finetune.training.config import TrainConfig  # noqa: E402
from store import local_db, open_db  # noqa: E402
from store.adapters import activate_adapter, register_adapter  # noqa: E402
from store.documents import import_documents  # noqa: E402
from store.examples import add_examples  # noqa: E402
from store.formats import read_examples_file  # noqa: E402

SAMPLES = REPO / "samples"


def prepare(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    db = open_db(home / "kbloop.db")
    import_documents(db, [SAMPLES / "kb"])
    embed_missing_passages(db)
    pairs = read_examples_file(SAMPLES / "qa.jsonl").examples
    add_examples(db, pairs, status="approved", source="import", reviewer="bench")
    (home / "questions.json").write_text(json.dumps([p.question for p in pairs if not p.input], ensure_ascii=False))
    started = time.monotonic()
    result = train_candidate(db, home=home, config=TrainConfig(base="tiny"), eval_config=EvalConfig())
    promote(db, result.adapter.version, actor="bench", force=True)
    print(f"trained and promoted {result.adapter.version} in {time.monotonic() - started:.0f} s; "
          f"metrics {result.adapter.metrics}")


def register_checkpoint(home: Path) -> None:
    """Serve the latest checkpoint of an interrupted `--prepare` (a `tiny` full fine-tune: its checkpoints are
    whole models) as version `step<N>`, with tiny's 0 passages per prompt, and make it active."""
    import shutil

    checkpoints = sorted(home.glob("adapters/.tmp-*/checkpoints/checkpoint-*"), key=lambda c: int(c.name.split("-")[-1]))
    if not checkpoints:
        sys.exit(f"no training checkpoint under {home}/adapters")
    source = checkpoints[-1]
    version = f"step{source.name.split('-')[-1]}"
    out = home / "adapters" / version
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    db = open_db(home / "kbloop.db")
    register_adapter(db, version=version, path=str(out), base_model="tiny", method="full",
                     params={"k_passages": 0, "checkpoint": str(source)}, dataset_hash=None, dataset_size=0, metrics={})
    activate_adapter(db, version)
    print(f"serving {source} as {version}")


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def run_rate(engine, questions: list[str], rate: float, seed: int) -> dict:
    schedule = arrivals(len(questions), rate, seed)
    rows: list[dict | None] = [None] * len(questions)
    t0 = time.monotonic() + 0.2

    def ask(i: int) -> None:
        time.sleep(max(0.0, t0 + schedule[i] - time.monotonic()))
        sent = time.monotonic()
        first: list[float] = []
        answer = engine.answer(questions[i], record=False, model_only=True,
                               on_text=lambda piece: first or first.append(time.monotonic()))
        done = time.monotonic()
        rows[i] = {"latency_s": done - sent, "first_chars_s": (first[0] if first else done) - sent,
                   "done_at": done - t0, "text": answer.text, "notice": answer.notice}

    load = os.getloadavg()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latency = [r["latency_s"] for r in rows]
    first = [r["first_chars_s"] for r in rows]
    span = max(r["done_at"] for r in rows) - schedule[0]
    return {
        "rate_per_s": rate, "questions": len(questions), "seed": seed,
        "latency_p50_s": pct(latency, 0.5), "latency_p95_s": pct(latency, 0.95),
        "first_chars_p50_s": pct(first, 0.5), "first_chars_p95_s": pct(first, 0.95),
        "throughput_per_s": round(len(questions) / span, 3), "arrival_span_s": round(schedule[-1], 2),
        "load_average_before": load, "load_average_after": os.getloadavg(),
        "notices": sorted({r["notice"] or "" for r in rows}),
        "answers": [r["text"] for r in rows],
    }


def run(home: Path, label: str, rates: list[float], n: int, repeats: int, out: Path) -> None:
    trained = json.loads((home / "questions.json").read_text())
    questions = [trained[i % len(trained)] for i in range(n)]  # asked again when n is larger
    engine = Engine(db_path=home / "kbloop.db", home=home, base_model="tiny").start()
    assert engine.wait_ready(900), engine.error
    for q in questions:
        retrieve_passages(local_db(home / "kbloop.db"), q, k=engine.config.k)
    engine.answer(questions[0], record=False, model_only=True)  # warm-up (loads the adapter)
    results = []
    try:
        for rep in range(repeats):
            for rate in rates:
                r = run_rate(engine, questions, rate, seed=rep)
                r["repeat"] = rep
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "answers"}), flush=True)
    finally:
        engine.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"label": label, "engine_module": engine_module.__file__, "cpu": os.cpu_count(),
                               "runs": results}, indent=2, ensure_ascii=False) + "\n")


def summary(paths: list[Path]) -> dict:
    """Median and spread over the repeats, per engine and rate; and whether both engines gave equal answers."""
    by_label = {}
    for path in paths:
        data = json.loads(path.read_text())
        by_label.setdefault(data["label"], []).extend(data["runs"])
    table = {}
    for label, runs in by_label.items():
        for rate in sorted({r["rate_per_s"] for r in runs}):
            mine = [r for r in runs if r["rate_per_s"] == rate]
            row = {}
            for key in ("latency_p50_s", "latency_p95_s", "first_chars_p50_s", "first_chars_p95_s",
                        "throughput_per_s"):
                values = [r[key] for r in mine]
                row[key] = {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}
            row["runs"] = len(mine)
            row["load_average_1min"] = [r["load_average_before"][0] for r in mine]
            table.setdefault(label, {})[str(rate)] = row
    labels = list(by_label)
    if len(labels) == 2:
        a, b = (by_label[x] for x in labels)
        pairs = [(x, y) for x in a for y in b if (x["rate_per_s"], x["repeat"]) == (y["rate_per_s"], y["repeat"])]
        table["answers_equal"] = f"{sum(p == q for x, y in pairs for p, q in zip(x['answers'], y['answers']))} of " \
                                 f"{sum(len(x['answers']) for x, _ in pairs)}"
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", type=Path)
    ap.add_argument("--register-checkpoint", type=Path, help="a workspace whose --prepare was interrupted")
    ap.add_argument("--workspace", type=Path)
    ap.add_argument("--label", default="continuous")
    ap.add_argument("--rates", default="2,8,16")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summary", type=Path, nargs="+")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
    elif args.register_checkpoint:
        register_checkpoint(args.register_checkpoint)
    elif args.summary:
        print(json.dumps(summary(args.summary), indent=2))
    else:
        out = args.out or REPO / "bench" / "out" / f"engine_poisson_{args.label}.json"
        run(args.workspace, args.label, [float(r) for r in args.rates.split(",")], args.questions, args.repeats, out)


if __name__ == "__main__":
    tempfile.tempdir = tempfile.gettempdir()
    main()
