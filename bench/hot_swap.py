"""Hot-swap under steady load: time from promote to the first answer by the new adapter; failed requests.

    .venv/bin/python bench/hot_swap.py [--clients 4] [--max-new-tokens 32] [--out bench/out/hot_swap.json]

A workspace with the sample KB and the tiny base, two real LoRA adapters (v1, v2) registered; v1 active.
`--clients` threads ask questions in a loop; after a warm-up, v2 is activated in the store (what
`kbloop promote` does), then v1 again (a rollback). Reports, per swap, the time from the store change
to the first answer generated with the new adapter, and any request that failed or carried a notice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from engine_batching import eval_questions, prepare_workspace  # noqa: E402

from finetune.model.loading import resolve_base  # noqa: E402
from finetune.serving.engine import Engine, EngineConfig  # noqa: E402
from store.adapters import activate_adapter, register_adapter  # noqa: E402


def make_lora_adapter(base_path: str, out: Path, *, seed: int) -> Path:
    """A LoRA adapter on the tiny base with random (non-zero) weights: it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "hot_swap.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        db = prepare_workspace(home)
        base = resolve_base("tiny", home=home, db=db)
        for version, seed in (("v1", 1), ("v2", 2)):
            path = make_lora_adapter(base, home / "adapters" / version, seed=seed)
            register_adapter(db, version=version, path=str(path), base_model="tiny", method="lora", params={},
                             dataset_hash=None, dataset_size=0, metrics={})
        activate_adapter(db, "v1")
        engine = Engine(db_path=home / "kbloop.db", home=home, base_model="tiny",
                        config=EngineConfig(max_new_tokens=args.max_new_tokens)).start()
        assert engine.wait_ready(600), engine.error
        questions = eval_questions(16)
        log: list[tuple[float, float, str | None, str | None]] = []  # (sent, done, adapter, notice)
        failures: list[str] = []
        stop = threading.Event()

        def client(i: int) -> None:
            n = i
            while not stop.is_set():
                sent = time.perf_counter()
                try:
                    a = engine.answer(questions[n % len(questions)], record=False)
                    log.append((sent, time.perf_counter(), a.adapter_version, a.notice))
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    failures.append(f"{type(exc).__name__}: {exc}")
                n += args.clients

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.warmup_s)
        swaps = []
        for target in ("v2", "v1"):
            promoted = time.perf_counter()
            activate_adapter(db, target)
            while not any(done > promoted and adapter == target and sent >= promoted
                          for sent, done, adapter, _ in list(log)):
                time.sleep(0.01)
            first = min(done for sent, done, adapter, _ in list(log)
                        if done > promoted and adapter == target and sent >= promoted)
            first_any = min(done for sent, done, adapter, _ in list(log) if done > promoted and adapter == target)
            swaps.append((target, first_any - promoted, first - promoted))
            time.sleep(args.warmup_s)
        stop.set()
        for t in threads:
            t.join()
        engine.close()
    # "no_match" (the KB does not cover the question) comes with or without a swap; any other notice on an
    # answer (an adapter error, a timeout) is one the swap caused.
    noticed = [n for *_, n in log if n and n != "no_match"]
    latencies = sorted(done - sent for sent, done, *_ in log)
    print(f"{args.clients} clients, max_new_tokens={args.max_new_tokens}, tiny base, CPU; {len(log)} answers")
    print(f"answer latency: median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"p95 {latencies[int(len(latencies) * 0.95)] * 1000:.0f} ms")
    for target, first_any, first_new in swaps:
        print(f"activate {target}: first answer by {target} {first_any * 1000:.0f} ms later "
              f"(first for a request sent after the change: {first_new * 1000:.0f} ms)")
    print(f"failed requests: {len(failures)}; answers with a notice other than no_match: {len(noticed)}")
    args.out.write_text(json.dumps({
        "clients": args.clients, "max_new_tokens": args.max_new_tokens, "base": "tiny", "cpu": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "answers": len(log),
        "answer_latency_p50_ms": round(latencies[len(latencies) // 2] * 1000),
        "swaps": [{"to": target, "first_answer_ms": round(first_any * 1000),
                   "first_answer_to_a_later_request_ms": round(first_new * 1000)}
                  for target, first_any, first_new in swaps],
        "failed_requests": len(failures), "answers_with_a_swap_notice": len(noticed),
    }, indent=2) + "\n")
    if failures or noticed:
        print("\n".join((failures + noticed)[:10]))
        sys.exit(1)


if __name__ == "__main__":
    main()
