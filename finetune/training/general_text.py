"""The general text shipped with kbloop (finetune/assets/general.txt, a copy of samples/general.txt inside the
package so that an installed kbloop has it), and the one rule that splits it: the forgetting probe
(finetune.evaluation.metrics) reads its first `PROBE_TOKENS` tokens, and training mixes in windows from after
them against forgetting (`general_text_items`), so that the probe measures text the model was not trained on.
"""

from __future__ import annotations

import random
from pathlib import Path

from finetune.training.data import IGNORE_INDEX

GENERAL_TEXT_PATH = Path(__file__).resolve().parents[1] / "assets" / "general.txt"
PROBE_TOKENS = 2048  # how much of the general text the forgetting probe reads


def load_general_text(path: Path | None = None) -> str:
    path = path or GENERAL_TEXT_PATH
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"{path}: general text for the forgetting probe is missing ({exc.strerror})") from None


def general_text_items(tokenizer, n: int, *, window: int = 128, seed: int = 42) -> list[dict]:
    """n training items of plain general text (every token but the first learnt), drawn with replacement from
    the windows that come after the part the forgetting probe reads (`PROBE_TOKENS`)."""
    ids = tokenizer(load_general_text(), add_special_tokens=False, verbose=False)["input_ids"][PROBE_TOKENS:]  # read in windows
    windows = [ids[i : i + window] for i in range(0, len(ids) - window // 2, window)]
    if not windows:
        return []
    rng = random.Random(seed)
    picked = [rng.choice(windows) for _ in range(n)]
    return [{"input_ids": list(w), "labels": [IGNORE_INDEX] + list(w[1:])} for w in picked]
