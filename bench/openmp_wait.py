"""OpenMP's wait policy on a shared CPU: greedy decoding on `tiny` with spinning (the default) and passive waiting.

    .venv/bin/python bench/openmp_wait.py [--out bench/out/openmp_wait.json]

Each measurement runs in its own process (the OpenMP runtime reads OMP_WAIT_POLICY once, when torch loads):
8 rows x 100 new tokens, greedy, three timed generations after a warm-up; once on otherwise idle cores and once
beside a process that keeps one core busy (as the bot, an embedding or a training job would). finetune/__init__.py
chooses passive waiting from these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DECODE = """
import json, sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(path).eval()
batch = tok(["How do I set up the VPN on my laptop?"] * 8, return_tensors="pt", padding=True)
times = []
with torch.no_grad():
    model.generate(**batch, max_new_tokens=5, do_sample=False)
    for _ in range(3):
        started = time.perf_counter()
        model.generate(**batch, max_new_tokens=100, min_new_tokens=100, do_sample=False)
        times.append(time.perf_counter() - started)
print(json.dumps(times))
"""


def decode_seconds(base: Path, policy: str | None) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy  # read before finetune is imported: the child never imports it
    done = subprocess.run([sys.executable, "-c", DECODE, str(base)], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "openmp_wait.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from finetune.model.tiny import ensure_tiny_base

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "samples" / "kb").rglob("*.md"))]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = ensure_tiny_base(Path(tmp), texts)
        for setting in ("idle", "one busy core"):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if setting != "idle" else None
            try:
                time.sleep(1 if busy else 0)
                for policy in ("active", "passive"):
                    label = f"{setting}, {'spinning (default)' if policy == 'active' else 'passive'}"
                    runs = decode_seconds(base, None if policy == "active" else policy)
                    results[label] = {"runs_s": [round(x, 3) for x in runs], "median_s": round(statistics.median(runs), 3)}
                    print(f"{label}: {results[label]}")
            finally:
                if busy:
                    busy.kill()
    args.out.write_text(json.dumps({"cpu": os.cpu_count(), "load_average_end": os.getloadavg(),
                                    "decode": "8 rows x 100 new tokens, greedy, tiny", "results": results},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
