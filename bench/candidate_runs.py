"""What the benches that train registered candidates (continued_training.py, preference.py) share: one
`train_candidate` call, timed, with the adapter's metadata read back and a one-line summary printed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.registry.candidates import CandidateResult, train_candidate  # noqa: E402
from finetune.registry.folders import read_metadata  # noqa: E402


def timed_candidate(db, home: Path, config, label: str) -> tuple[CandidateResult, dict, float]:
    """(the result, the adapter's metadata, seconds the whole call took); prints `label`'s line with the verdict."""
    started = time.monotonic()
    result = train_candidate(db, home=home, config=config)
    total = time.monotonic() - started
    meta = read_metadata(Path(result.adapter.path))
    print(f"{label}: {result.adapter.version} train {meta['training']['runtime_s']:.0f} s, total {total:.0f} s, "
          f"gate {'PASS' if result.verdict.passed else 'FAIL'}: {result.verdict.reasons}", flush=True)
    return result, meta, total
