"""Does the `tiny` base, with kbloop's default settings, reproduce its training answers?

    .venv/bin/python bench/tiny_memorisation.py [--out bench/out/tiny_memorisation.json]

The product's feedback loop is demonstrated on `tiny` (random weights, built locally), so its defaults must
make it learn its training set: at least 90% of the training answers reproduced exactly under greedy
decoding. This runs the product's own path on the sample data: a fresh workspace, samples/kb imported,
samples/qa.jsonl approved, `train_candidate` with no options (TINY_DEFAULTS), the adapter promoted, then
every training question asked through the answer engine (16 at a time, as employees would) and each answer
compared with the approved one: byte for byte, and after the evaluation's normalisation (case, spacing,
punctuation). Held-out questions are reported apart: tiny memorises, it does not generalise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.evaluation.metrics import EvalConfig, exact_match  # noqa: E402
from finetune.registry.candidates import train_candidate  # noqa: E402
from finetune.registry.folders import read_metadata  # noqa: E402
from finetune.registry.promotion import promote  # noqa: E402
from finetune.serving.engine import Engine  # noqa: E402
from finetune.serving.retrieval import embed_missing_passages  # noqa: E402
from finetune.training.config import TrainConfig  # noqa: E402
from store import open_db  # noqa: E402
from store.documents import import_documents  # noqa: E402
from store.examples import add_examples  # noqa: E402
from store.formats import read_examples_file  # noqa: E402

SAMPLES = REPO / "samples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "tiny_memorisation.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        db = open_db(home / "kbloop.db")
        import_documents(db, [SAMPLES / "kb"])
        embed_missing_passages(db)
        pairs = read_examples_file(SAMPLES / "qa.jsonl").examples
        add_examples(db, pairs, status="approved", source="import", reviewer="bench")

        load_start = os.getloadavg()[0]
        started = time.monotonic()
        # The evaluation's reproduction check covers every training example here, not its usual sample.
        result = train_candidate(db, home=home, config=TrainConfig(base="tiny"),
                                 eval_config=EvalConfig(train_sample=len(pairs)))
        train_and_eval_s = time.monotonic() - started
        version = result.adapter.version
        meta = read_metadata(Path(result.adapter.path))
        promote(db, version, actor="bench", force=True)

        heldout = set(meta["heldout_questions"])
        # Examples with an `input` (extra context) are trained with it in the prompt; an employee's question
        # reaches the engine alone, so those are left out of the engine's check (the evaluation covers them).
        answers = {p.question: p.answer for p in pairs if not p.input}
        with_input = sum(1 for p in pairs if p.input and p.question not in heldout)
        train_qs = [q for q in answers if q not in heldout]
        heldout = sorted(q for q in heldout if q in answers)
        engine = Engine(db_path=home / "kbloop.db", home=home, base_model="tiny").start()
        assert engine.wait_ready(600), engine.error
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda q: engine.answer(q, record=False), train_qs + heldout))
        answer_s = time.monotonic() - started
        engine.close()

    train_got, heldout_got = got[: len(train_qs)], got[len(train_qs):]
    strict = sum(a.text == answers[q] for q, a in zip(train_qs, train_got))
    normalised = sum(exact_match(a.text, answers[q]) for q, a in zip(train_qs, train_got))
    misses = [{"question": q, "expected": answers[q], "got": a.text}
              for q, a in zip(train_qs, train_got) if a.text != answers[q]]
    by_adapter = {a.adapter_version for a in got}
    training = meta["training"]
    results = {
        "examples": len(pairs), "train_asked": len(train_qs), "train_with_input_not_asked": with_input,
        "heldout_asked": len(heldout), "version": version,
        "config": meta["params"], "steps": training.get("steps"), "train_runtime_s": training.get("runtime_s"),
        "train_and_eval_s": train_and_eval_s, "final_loss": training.get("final_loss"),
        "engine_reproduced_strict": strict / len(train_qs), "engine_reproduced_normalised": normalised / len(train_qs),
        "eval_train_reproduced": meta["metrics"].get("train_reproduced"), "eval_stop_rate": meta["metrics"].get("stop_rate"),
        "heldout_exact_match": meta["metrics"].get("heldout_exact_match"),
        "heldout_token_f1": meta["metrics"].get("heldout_token_f1"),
        "heldout_answered_exactly": sum(exact_match(a.text, answers[q]) for q, a in zip(heldout, heldout_got)),
        "answered_by": sorted(v or "base" for v in by_adapter), "answer_all_s": answer_s,
        "cpu": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
        "misses": misses,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"\ntiny defaults: {strict}/{len(train_qs)} training answers reproduced byte for byte "
          f"({strict / len(train_qs):.1%}), {normalised:.0f} after normalisation; target >= 90%. "
          f"Training {training.get('runtime_s', 0):.0f} s, training + evaluation {train_and_eval_s:.0f} s.")
    if strict / len(train_qs) < 0.9:
        sys.exit(1)


if __name__ == "__main__":
    main()
