"""Adapter folders: where versions live, the `.tmp-…` folder a run writes into, the metadata file, and
whether vLLM (or PEFT) could load what is there.

A run's adapter folder is moved into `$KBLOOP_HOME/adapters/<version>/` in one rename: until then it lives
in a `.tmp-…` folder beside it, which nothing reads and which the next run deletes if its writer died.

Adapter folders are PEFT format, loadable by `PeftModel.from_pretrained` and by vLLM: LoRA on the
attention and MLP projections only, no `modules_to_save`, no DoRA, no bias, rank at most 64 (`MAX_RANK`).
Beside the weights: the tokenizer and `kbloop_adapter.json` (version, base, method, params, dataset
hash and size, metrics, the gate's comparison, created).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import sqlite_utils

from store import ConfigError, StoreError
from store import adapters as adapter_rows
from store.adapters import VERSION_RE
from store.processes import pid_alive

META_FILE = "kbloop_adapter.json"
TMP_PREFIX = ".tmp-"
# vLLM serves LoRA on these projections (Qwen2 / Llama naming) and nothing else without extra flags.
VLLM_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
MAX_RANK = 64
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapters_dir(home: Path) -> Path:
    return Path(home) / "adapters"


def clean_stale_temp(home: Path) -> list[Path]:
    """Delete `.tmp-*` folders whose writer is gone (a crash or a full disk mid-write). Returns them."""
    removed = []
    root = adapters_dir(home)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
            continue
        parts = entry.name[len(TMP_PREFIX):].split("-")
        pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
        if pid is not None and (pid == os.getpid() or pid_alive(pid)):
            continue  # its writer is still running
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def temp_dir(home: Path, label: str) -> Path:
    root = adapters_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{TMP_PREFIX}{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def read_metadata(adapter_dir: Path) -> dict:
    try:
        return json.loads((Path(adapter_dir) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def vllm_problems(adapter_dir: Path, *, max_rank: int = MAX_RANK) -> list[str]:
    """Why vLLM (or plain PEFT) could not load this adapter folder; empty when it can."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        return [f"{adapter_dir}: no adapter_config.json"]
    if not (adapter_dir / ADAPTER_WEIGHTS).exists():
        return [f"{adapter_dir}: no {ADAPTER_WEIGHTS}"]
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (vLLM loads only LoRA weights)")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        problems.append(f"target_modules is a pattern ({targets!r}), not a list of module names")
    else:
        extra = sorted(set(targets) - VLLM_TARGETS)
        if extra:
            problems.append(f"target modules {extra} are not attention/MLP projections vLLM serves")
    rank = cfg.get("r") or 0
    if rank > max_rank:
        problems.append(f"rank {rank} is above {max_rank}")
    if cfg.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (vLLM expects bias='none')")
    return problems


def adapter_folder_problem(adapter: adapter_rows.Adapter) -> str | None:
    """None when the registered folder looks loadable, else a one-line reason."""
    path = Path(adapter.path)
    if not path.is_dir():
        return f"adapter {adapter.version}'s folder {path} is missing"
    if adapter.method == "full":
        return None if (path / "config.json").exists() else f"{path}: no config.json (full model expected)"
    if not (path / "adapter_config.json").exists() or not (path / ADAPTER_WEIGHTS).exists():
        return f"{path}: incomplete adapter folder (adapter_config.json / {ADAPTER_WEIGHTS} missing)"
    return None



def pick_version(db: sqlite_utils.Database, home: Path, requested: str | None) -> str:
    if requested is not None:
        if not VERSION_RE.match(requested):
            raise StoreError(f"adapter version {requested!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        known = {a.version for a in adapter_rows.list_adapters(db)}
        if requested in known or (adapters_dir(home) / requested).exists():
            raise StoreError(f"adapter version {requested!r} already exists; choose another")
        return requested
    return next_free_version(db, home)


def next_free_version(db: sqlite_utils.Database, home: Path) -> str:
    """The version the next run registers as when none is asked for: v1, v2, … (store.adapters.next_version),
    past any folder left by a crash between rename and registration, which keeps its number."""
    version = adapter_rows.next_version(db)
    while (adapters_dir(home) / version).exists():
        version = f"v{int(version[1:]) + 1}"
    return version


def adapter_objective(adapter: adapter_rows.Adapter) -> str:
    """What the adapter's last run learnt from: sft (the approved examples; adapters from before issue 20), kto
    (the votes) or dpo (correction pairs)."""
    return str((adapter.params or {}).get("objective") or "sft")


def check_registrable(config) -> None:
    """Refuse, before any training, what the registry could not register: adapters vLLM cannot serve."""
    rank = config.rank
    if isinstance(rank, int) and rank > MAX_RANK:
        raise ConfigError(f"rank {rank} is above {MAX_RANK}, the largest the registry accepts "
                         "(vLLM's LoRA serving limit); choose a smaller rank or --method full")
    targets = config.targets
    if isinstance(targets, (tuple, list)):
        extra = sorted(set(targets) - VLLM_TARGETS)
        if extra:
            raise ConfigError(f"target modules {', '.join(extra)} cannot be served by vLLM; "
                             f"use some of {', '.join(sorted(VLLM_TARGETS))} or all-linear")

