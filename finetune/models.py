"""Base models: resolving a name to something loadable, and loading for training or inference."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from store import StoreError

TINY = "tiny"


def _fallback_texts() -> Iterable[str]:
    """Text for the tiny tokenizer when the knowledge base is still empty: the shipped general text."""
    general = Path(__file__).parent / "data" / "general.txt"
    if general.exists():
        yield general.read_text(encoding="utf-8")


def resolve_base(name: str, *, home: Path, db=None) -> str:
    """`tiny` -> the locally built tiny base (built on first use); a local folder -> its path; else the HF id."""
    if name == TINY:
        from finetune.tiny import ensure_tiny_base

        texts: list[str] = []
        if db is not None:
            from store.kb import all_kb_text

            texts = list(all_kb_text(db))
        return str(ensure_tiny_base(home, texts or list(_fallback_texts())))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise StoreError(f"{path}: not a model folder (no config.json)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise StoreError(
            f"base model {name!r} not found: expected `tiny`, a local model folder, or a Hugging Face id like "
            "Qwen/Qwen2.5-0.5B-Instruct"
        )
    return name
