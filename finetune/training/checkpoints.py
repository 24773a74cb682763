"""Checkpoints and the finished folder: resuming from the latest checkpoint, and writing the final adapter.

Checkpoints hold the adapter (or model) and the optimiser state, in out_dir/checkpoints until training
finishes. The final adapter (or model) and tokenizer are written into a sibling folder and moved into out_dir;
a full disk leaves only the checkpoints, never half an adapter.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from store import StoreError

CHECKPOINTS = "checkpoints"


def latest_checkpoint(checkpoints: Path) -> Path | None:
    if not checkpoints.is_dir():
        return None
    found = [p for p in checkpoints.glob("checkpoint-*") if checkpoint_step(p) is not None
             and (p / "trainer_state.json").exists()]
    return max(found, key=checkpoint_step) if found else None


def checkpoint_step(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def disk_full_error(exc: OSError, where: Path) -> StoreError:
    return StoreError(f"disk full while writing {where}: free some space and train again (nothing was registered)")


def save_final(trainer, tokenizer, out_dir: Path, *, full: bool) -> None:
    """Write the adapter (or model) and tokenizer: into a sibling folder first, then moved into out_dir."""
    if not trainer.is_world_process_zero():
        return
    staging = out_dir / ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, out_dir / item.name)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            for name in os.listdir(out_dir):
                if name != CHECKPOINTS:
                    target = out_dir / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            raise disk_full_error(exc, out_dir) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not full:
        _check_adapter_folder(out_dir)


def _check_adapter_folder(out_dir: Path) -> None:
    cfg = json.loads((out_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("modules_to_save"):
        raise StoreError(f"{out_dir}: the adapter would carry modules_to_save, which vLLM cannot load")
