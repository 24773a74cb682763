"""Retraining after one new approved answer: continued from the active adapter vs a first full training.

    .venv/bin/python bench/continued_training.py [--pairs 330] [--out bench/out/continued_training.json]
    .venv/bin/python bench/continued_training.py --base bench    # bench/out/continued_training_bench_base.json

The product's path on a fresh workspace (`tiny` base, kbloop's defaults; or, with `--base bench`, the
pretrained ~10M-parameter base of bench/train_vs_seed.py, which trains with the guide's recipe, QLoRA r=8,
as a real base does): samples/kb imported, --pairs of
samples/qa.jsonl approved, `train_candidate` (a first full training, from the base) and promoted; then one
new approved answer, on a topic the knowledge base does not cover, and `train_candidate` again with the
default start (continue from the active adapter). Finally, for the ratio the issue asks for, a full training
of the same data (all pairs + the new one) from the base.

Measured: training time of each run (TrainOutcome.runtime_s) and the whole train_candidate call (training +
evaluation of the candidate and of the active adapter); the share of the answers the previous adapter
reproduced that the continued one still reproduces (exact teacher-forced check over the whole training
split, the gate's `retained_vs_active`); whether the new answer is learnt (reproduced exactly, and by real
greedy generation); and whether the promotion gate passes without --force.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from candidate_runs import timed_candidate  # noqa: E402
from train_vs_seed import bench_base  # noqa: E402

from finetune.evaluation.metrics import generate_answers  # noqa: E402
from finetune.model.loading import load_model_for_inference, resolve_base  # noqa: E402
from finetune.registry.folders import read_metadata  # noqa: E402
from finetune.registry.promotion import promote  # noqa: E402
from finetune.training.config import TrainConfig  # noqa: E402
from finetune.training.continuation import example_key  # noqa: E402
from finetune.training.data import TrainingExample  # noqa: E402
from store import open_db  # noqa: E402
from store.documents import import_documents  # noqa: E402
from store.examples import add_examples  # noqa: E402
from store.formats import read_examples_file  # noqa: E402

SAMPLES = REPO / "samples"
NEW_QUESTION = "What is the guest Wi-Fi network called in the Lisbon office?"
NEW_ANSWER = "It is called KB-Guest-Lisboa; the password is on the card at the reception desk and changes every Monday."


def _run(db, home, config, label: str) -> dict:
    result, meta, total = timed_candidate(db, home, config, label)
    training, metrics = meta["training"], meta["metrics"]
    return {
        "version": result.adapter.version, "start": meta.get("start"), "train_s": round(training["runtime_s"], 1),
        "train_candidate_s": round(total, 1), "steps": training["steps"], "examples_seen": training["n_examples"],
        "stopped_early": training.get("stopped_early"), "notes": training["notes"],
        "train_reproduced_exact": metrics.get("train_reproduced_exact"),
        "retained_vs_active": metrics.get("retained_vs_active"), "n_active_reproduced": metrics.get("n_active_reproduced"),
        "forgetting_vs_active": metrics.get("forgetting_vs_active"),
        "heldout_loss": metrics.get("heldout_loss"), "stop_rate": metrics.get("stop_rate"),
        "gate_passed": result.verdict.passed, "gate_reasons": result.verdict.reasons, "table": result.verdict.table,
        "reproduced_keys": meta.get("reproduced_keys") or [],
    }


def _from_metadata(folder: Path) -> dict:
    """A registered run's figures, as _run reports them (its whole-call time is not recorded: None)."""
    meta = read_metadata(folder)
    training, metrics = meta["training"], meta["metrics"]
    return {
        "version": meta["version"], "start": meta.get("start"), "train_s": round(training["runtime_s"], 1),
        "train_candidate_s": None, "steps": training["steps"], "examples_seen": training["n_examples"],
        "stopped_early": training.get("stopped_early"), "notes": training["notes"],
        "train_reproduced_exact": metrics.get("train_reproduced_exact"), "heldout_loss": metrics.get("heldout_loss"),
        "stop_rate": metrics.get("stop_rate"), "reproduced_keys": meta.get("reproduced_keys") or [],
    }


def _generated(adapter_path: Path, base_path: str, question: str) -> str:
    model, tokenizer = load_model_for_inference(base_path, adapter_path=adapter_path)
    return generate_answers(model, tokenizer, [TrainingExample(question=question, input="", answer=NEW_ANSWER)])[0].text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=330)
    parser.add_argument("--skip-scratch", action="store_true", help="leave out the full training of all the data")
    parser.add_argument("--workspace", help="reuse this workspace (a copy is used) whose active v1 is the first "
                        "full training on --pairs pairs: its numbers are read from v1's metadata")
    parser.add_argument("--base", choices=("tiny", "bench"), default="tiny",
                        help="`tiny` (random weights, memorises) or `bench`: bench/train_vs_seed.py's pretrained base")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="with --base bench: the base's pretraining")
    parser.add_argument("--base-dir", help="with --base bench: a base this script pretrained before (its copy is used)")
    parser.add_argument("--out", help="default: bench/out/continued_training.json "
                        "(continued_training_bench_base.json with --base bench)")
    args = parser.parse_args()
    args.out = args.out or str(REPO / "bench" / "out" / ("continued_training.json" if args.base == "tiny"
                                                         else "continued_training_bench_base.json"))

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        if args.base == "bench":
            base = bench_base(home, base_dir=args.base_dir, pretrain_steps=args.pretrain_steps)
        else:
            base = "tiny"
        config = TrainConfig(base=base)
        partial = Path(args.out).with_suffix(".partial.json")
        if args.workspace:
            shutil.copytree(args.workspace, home, dirs_exist_ok=True)
            db = open_db(home / "kbloop.db")
            first = _from_metadata(home / "adapters" / "v1")
        else:
            db = open_db(home / "kbloop.db")
            import_documents(db, [SAMPLES / "kb"])
            pairs = read_examples_file(SAMPLES / "qa.jsonl").examples[: args.pairs]
            add_examples(db, pairs, status="approved", source="import", reviewer="bench")
            first = _run(db, home, config, "first full training")
            _save(partial, {"first": first})
            promote(db, first["version"], actor="bench", force=True)  # against the bare base: not this bench's point

        new = read_examples_file_from_pair(NEW_QUESTION, NEW_ANSWER)
        add_examples(db, new, status="approved", source="playground", reviewer="bench")
        continued = _run(db, home, config, "continued after one new answer")
        new_key = example_key(new[0])
        continued["new_answer_reproduced_exact"] = new_key in continued["reproduced_keys"]
        base_path = resolve_base(base, home=home, db=db)
        generated = _generated(home / "adapters" / continued["version"], base_path, NEW_QUESTION)
        continued["new_answer_generated"] = generated
        continued["new_answer_generated_equal"] = generated == NEW_ANSWER
        _save(partial, {"first": first, "continued": continued})

        scratch = None
        if not args.skip_scratch:
            scratch = _run(db, home, TrainConfig(base=base, start_from="base"), "full training of the same data")
    for r in (first, continued, scratch):
        if r:
            r["n_reproduced"] = len(r.pop("reproduced_keys"))
    reference = scratch or first
    results = {
        "pairs": args.pairs, "base": args.base, "machine": f"{os.cpu_count()} CPU cores, no GPU, shared",
        "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
        "first": first, "continued": continued, "scratch_same_data": scratch,
        "train_time_ratio": round(continued["train_s"] / reference["train_s"], 3),
        "train_candidate_time_ratio": (round(continued["train_candidate_s"] / reference["train_candidate_s"], 3)
                                       if reference["train_candidate_s"] else None),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(json.dumps({k: v for k, v in results.items() if k not in ("first", "continued", "scratch_same_data")}))
    print(f"continued: {continued['train_s']:.0f} s vs {reference['train_s']:.0f} s of training "
          f"({results['train_time_ratio']:.2f}x; target <= 0.4x); kept {continued['retained_vs_active']}; "
          f"new answer learnt: {continued['new_answer_reproduced_exact']}; gate: {continued['gate_passed']}")


def _save(path: Path, data: dict) -> None:
    """What is measured so far, in case a later stage does not finish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=list))


def read_examples_file_from_pair(question: str, answer: str):
    """One approved pair, as `kbloop data import` would read it."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as fh:
        fh.write(json.dumps({"question": question, "answer": answer}) + "\n")
    try:
        return read_examples_file(fh.name).examples
    finally:
        os.unlink(fh.name)


if __name__ == "__main__":
    main()
