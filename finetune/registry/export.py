"""Merging an adapter into its base: one standalone model folder (safetensors + tokenizer).

    export_merged(db, "v3", Path("out/kb-model"), home=home)

For serving without PEFT (vLLM without --enable-lora, llama.cpp conversion, TGI). The base is always
reloaded in full precision first: merging LoRA weights into a 4-bit base would round the sum back to
4 bits (and PEFT refuses or warns). A QLoRA adapter merged this way answers like the adapter on a full
precision base, which is close to, not identical with, the 4-bit model it was trained against.

The folder is written to a temporary name beside OUT and renamed when complete; an existing OUT is
never touched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import sqlite_utils

from store import ConfigError, StoreError
from store import adapters as adapter_rows
from store.files import publish_dir, write_json_atomic
from store.text import now

EXPORT_META = "kbloop_export.json"
DTYPES = ("float32", "bfloat16", "float16")


def export_merged(db: sqlite_utils.Database, version: str, out: Path, *, home: Path, dtype: str = "float32") -> Path:
    """Write base + adapter `version` merged into `out` (which must not exist). Returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.model.loading import load_tokenizer, resolve_base
    from finetune.registry.folders import adapter_folder_problem

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    adapter = adapter_rows.get_adapter(db, version)
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise StoreError(f"{out}: already exists; choose a new folder (nothing was written)")
    problem = adapter_folder_problem(adapter)
    if problem:
        raise StoreError(problem)
    base_path = resolve_base(adapter.base_model, home=Path(home), db=db)
    torch_dtype = getattr(torch, dtype)
    adapter_dir = Path(adapter.path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if adapter.method == "full":
            model = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch_dtype)
        else:
            from peft import PeftModel

            # Full precision, never quantised: see the module docstring.
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
            model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_path
        load_tokenizer(str(tok_source)).save_pretrained(tmp)
        write_json_atomic(tmp / EXPORT_META, {
            "version": version, "base": adapter.base_model, "base_path": base_path, "method": adapter.method,
            "params": adapter.params, "dataset_hash": adapter.dataset_hash, "dtype": dtype, "merged": True,
            "created": now(),
        })
        if out.exists():
            raise StoreError(f"{out}: appeared while exporting; the export was discarded")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
