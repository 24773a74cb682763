"""Batched generation: 16 concurrent questions vs the same 16 answered one after another (tiny base).

    .venv/bin/python bench/engine_batching.py [--questions 16] [--max-new-tokens 256] [--repeats 3]
        [--out bench/out/engine_batching.json]

Builds a workspace in a temporary folder (sample KB, tiny base), starts one Engine, answers the questions
one by one, then all at once from 16 threads, and checks that the answers are identical (greedy); `--repeats`
times, reporting each run and the median speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.model.loading import resolve_base  # noqa: E402
from finetune.serving.engine import Engine, EngineConfig  # noqa: E402
from finetune.serving.retrieval import embed_missing_passages  # noqa: E402
from store import open_db  # noqa: E402
from store.documents import import_documents  # noqa: E402

SAMPLES = REPO / "samples"


def spread(values) -> dict:
    """Median, lowest and highest of a repeated measurement, as the bench outputs keep them."""
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3), "min": round(ordered[0], 3), "max": round(ordered[-1], 3)}


def prepare_workspace(home: Path):
    """A store with the sample KB (embedded) and the tiny base built; returns the open db."""
    db = open_db(home / "kbloop.db")
    import_documents(db, [SAMPLES / "kb"])
    embed_missing_passages(db)
    resolve_base("tiny", home=home, db=db)
    return db


def engine_db(home: Path):
    from store import local_db

    return local_db(home / "kbloop.db")


def eval_questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in (SAMPLES / "retrieval_eval.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [r["question"] for r in rows][:n]


@dataclass(frozen=True)
class Run:
    t_seq: float
    t_par: float
    batches: int
    median_ms: int
    same: bool
    distinct: int  # different answers among the questions' (the random tiny base often repeats one token)


def run_both(engine: Engine, questions: list[str]) -> Run:
    """The questions one after another, then all at once from as many threads."""
    started = time.perf_counter()
    sequential = [engine.answer(q, record=False) for q in questions]
    t_seq = time.perf_counter() - started

    results = [None] * len(questions)
    barrier = threading.Barrier(len(questions) + 1)

    def ask(i: int) -> None:
        barrier.wait()
        results[i] = engine.answer(questions[i], record=False)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    batches_before = engine.batches_run
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    t_par = time.perf_counter() - started
    return Run(t_seq, t_par, engine.batches_run - batches_before,
               sorted(a.latency_ms for a in results)[len(results) // 2],
               [a.text for a in sequential] == [a.text for a in results], len({a.text for a in results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=EngineConfig.max_new_tokens)
    parser.add_argument("--repeats", type=int, default=3, help="runs of both ways (this VM's timings vary ~10%%)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "engine_batching.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        prepare_workspace(home)
        config = EngineConfig(max_new_tokens=args.max_new_tokens, max_batch_size=args.questions)
        engine = Engine(db_path=home / "kbloop.db", home=home, base_model="tiny", config=config).start()
        assert engine.wait_ready(600), engine.error
        questions = eval_questions(args.questions)
        engine.answer(questions[0], record=False)  # warm-up
        # Query embeddings are cached per process: compute them for both runs alike, outside the timing.
        from finetune.serving.retrieval import retrieve_passages
        for q in questions:
            retrieve_passages(engine_db(home), q, k=config.k)
        runs = [run_both(engine, questions) for _ in range(args.repeats)]
        engine.close()
    n = len(questions)
    print(f"{n} questions, max_new_tokens={args.max_new_tokens}, tiny base, CPU, load average {os.getloadavg()}")
    for i, run in enumerate(runs, 1):
        print(f"run {i}: one after another {run.t_seq:.2f}s ({n / run.t_seq:.2f} answers/s); concurrent "
              f"{run.t_par:.2f}s ({n / run.t_par:.2f} answers/s) in {run.batches} running batch(es); "
              f"speed-up {run.t_seq / run.t_par:.1f}x; median latency in the burst {run.median_ms} ms; "
              f"identical answers: {run.same} ({run.distinct} distinct)")
    speedups = sorted(run.t_seq / run.t_par for run in runs)
    print(f"speed-up: median {statistics.median(speedups):.1f}x (lowest {speedups[0]:.1f}x) over {len(runs)} runs")
    same = all(run.same for run in runs)
    args.out.write_text(json.dumps({
        "questions": n, "max_new_tokens": args.max_new_tokens, "base": "tiny", "cpu": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "runs": [{"sequential_s": round(r.t_seq, 3), "concurrent_s": round(r.t_par, 3), "batches": r.batches,
                  "speedup": round(r.t_seq / r.t_par, 3), "burst_latency_p50_ms": r.median_ms,
                  "identical_answers": r.same, "distinct_answers": r.distinct} for r in runs],
        "speedup": spread(speedups),
        "identical_answers": same,
    }, indent=2) + "\n")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
