"""Mixed-adapter batches: 16 concurrent questions spread over 4 teams' adapters vs the same 16 on one adapter (tiny).

    .venv/bin/python bench/team_batching.py [--questions 16] [--teams 4] [--max-new-tokens 256] [--repeats 3]
        [--out bench/out/team_batching.json]

Builds a workspace in a temporary folder (sample KB, tiny base), adds `--teams` teams, each with its own active LoRA
adapter (random non-zero weights, so each changes the answers), and starts one Engine (adapter cache as large as
the teams, so that no adapter reloads between runs). Two ways of asking the same questions:

- **spread**: question i is asked as team i mod 4, so the 16 rows of the running batch use 4 adapters;
- **one adapter**: every question is asked as the first team.

Each way is asked one question at a time once (the reference answers), then `--repeats` times all at once from as
many threads, alternating the two ways (and which goes first). Reports each run's throughput (generated tokens per
second of wall time, and answers per second), the process's CPU time (on a shared machine the wall time moves with
the other processes' load; tokens per CPU-second much less), the running batches it took, whether every answer is
identical to the one-at-a-time answer (greedy), and the median ratios spread / one adapter with their lowest and
highest. The time limit per answer is lifted (a loaded machine would otherwise cut answers short).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from engine_batching import engine_db, eval_questions, prepare_workspace, spread  # noqa: E402
from hot_swap import make_lora_adapter  # noqa: E402

from finetune.model.loading import resolve_base  # noqa: E402
from finetune.serving.engine import Engine, EngineConfig  # noqa: E402
from finetune.serving.retrieval import retrieve_passages  # noqa: E402
from store.adapters import activate_adapter, register_adapter  # noqa: E402
from store.teams import add_team  # noqa: E402


def ask_all(engine: Engine, asks: list[tuple[str, str]]) -> dict:
    """All questions at once, one thread each, released together; (team, question) pairs."""
    results: list = [None] * len(asks)
    barrier = threading.Barrier(len(asks) + 1)

    def ask(i: int) -> None:
        barrier.wait()
        team, question = asks[i]
        results[i] = engine.answer(question, team=team, record=False, model_only=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    batches, tokens, load = engine.batches_run, engine.tokens_generated, os.getloadavg()[0]
    barrier.wait()
    started, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens = engine.tokens_generated - tokens
    return {"seconds": round(seconds, 3), "cpu_s": round(cpu, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2), "tokens_per_cpu_s": round(tokens / cpu, 2),
            "answers_per_s": round(len(asks) / seconds, 3), "batches": engine.batches_run - batches,
            "load_average_1m": round(load, 2), "answers": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--teams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=EngineConfig.max_new_tokens)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "team_batching.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    teams = [f"team{i + 1}" for i in range(args.teams)]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        db = prepare_workspace(home)
        base = resolve_base("tiny", home=home, db=db)
        for i, team in enumerate(teams):
            add_team(db, team, (f"C0TEAM{i + 1}",))
            version = f"{team}-v1"
            path = make_lora_adapter(base, home / "adapters" / version, seed=i + 1)
            register_adapter(db, version=version, path=str(path), base_model="tiny", method="lora", params={},
                             dataset_hash=None, dataset_size=0, metrics={}, team=team)
            activate_adapter(db, version)
        config = EngineConfig(max_new_tokens=args.max_new_tokens, max_batch_size=args.questions,
                              adapter_cache_size=args.teams, time_limit_s=3600.0)
        engine = Engine(db_path=home / "kbloop.db", home=home, base_model="tiny", config=config).start()
        assert engine.wait_ready(600), engine.error
        questions = eval_questions(args.questions)
        ways = {"spread": [(teams[i % len(teams)], q) for i, q in enumerate(questions)],
                "one_adapter": [(teams[0], q) for q in questions]}
        # Query embeddings are cached per process, adapters load once: both outside the timing.
        for q in questions:
            retrieve_passages(engine_db(home), q, k=config.k)
        for team in teams:
            engine.answer(questions[0], team=team, record=False)
        alone = {way: [engine.answer(q, team=t, record=False, model_only=True) for t, q in asks]
                 for way, asks in ways.items()}
        runs: dict[str, list[dict]] = {way: [] for way in ways}
        for repeat in range(args.repeats):
            for way in sorted(ways, reverse=bool(repeat % 2)):
                run = ask_all(engine, ways[way])
                got = run.pop("answers")
                run["identical_answers"] = [(a.text, a.adapter_version) for a in got] == \
                    [(a.text, a.adapter_version) for a in alone[way]]
                run["adapters"] = sorted({a.adapter_version for a in got})
                run["notices"] = sorted({a.notice for a in got + alone[way] if a.notice})
                runs[way].append(run)
        engine.close()
    ratios = sorted(s["tokens_per_s"] / o["tokens_per_s"] for s, o in zip(runs["spread"], runs["one_adapter"]))
    cpu_ratios = sorted(s["tokens_per_cpu_s"] / o["tokens_per_cpu_s"]
                        for s, o in zip(runs["spread"], runs["one_adapter"]))
    same = all(r["identical_answers"] for way in runs for r in runs[way])
    print(f"{args.questions} questions, {args.teams} teams, max_new_tokens={args.max_new_tokens}, tiny base, "
          f"{os.cpu_count()} CPUs, load average before {load_before}, after {os.getloadavg()}")
    for i, (s, o) in enumerate(zip(runs["spread"], runs["one_adapter"]), 1):
        print(f"run {i}: spread over {len(s['adapters'])} adapters {s['tokens_per_s']:.0f} tokens/s "
              f"({s['answers_per_s']:.2f} answers/s, {s['batches']} batch(es)); one adapter {o['tokens_per_s']:.0f} "
              f"tokens/s ({o['answers_per_s']:.2f} answers/s, {o['batches']} batch(es)); ratio "
              f"{s['tokens_per_s'] / o['tokens_per_s']:.2f}, per CPU-second "
              f"{s['tokens_per_cpu_s'] / o['tokens_per_cpu_s']:.2f}; identical to one at a time: "
              f"{s['identical_answers']} / {o['identical_answers']}")
    print(f"ratio spread / one adapter: median {statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f}) "
          f"over {len(ratios)} runs; per CPU-second {statistics.median(cpu_ratios):.2f} ({cpu_ratios[0]:.2f}–"
          f"{cpu_ratios[-1]:.2f}); answers identical to one at a time: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "questions": args.questions, "teams": args.teams, "max_new_tokens": args.max_new_tokens, "base": "tiny",
        "cpu": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "distinct_answers_alone": {way: len({a.text for a in answers}) for way, answers in alone.items()},
        "runs": runs,
        "throughput_ratio": spread(ratios),
        "cpu_throughput_ratio": spread(cpu_ratios),
        "identical_answers": same,
    }, indent=2) + "\n")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
