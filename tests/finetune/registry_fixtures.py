"""Helpers for the registry / evaluation / export tests: sample data, a seeded store, hand-made adapters."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import SAMPLES

# Metrics of a sound adapter: what gate and promotion tests compare candidates with.
GOOD = {"heldout_loss": 1.00, "heldout_exact_match": 0.50, "heldout_token_f1": 0.70, "stop_rate": 0.90,
        "train_reproduced": 0.8, "forgetting_adapter_loss": 5.0, "forgetting_delta": 0.3, "n_heldout": 10,
        "n_train_sampled": 32}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sample_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted((SAMPLES / "kb").rglob("*")) if p.is_file()]


def sample_qa(n: int | None = None) -> list[tuple[str, str]]:
    rows = []
    for line in (SAMPLES / "qa.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            rows.append((d["instruction"], d["output"]))
    return rows[:n] if n else rows


def seed_store(db, *, n_examples: int = 40) -> None:
    """The sample knowledge base and the first `n_examples` sample QA pairs, approved."""
    from store.documents import import_documents
    from store.examples import NewExample, add_examples

    import_documents(db, [SAMPLES / "kb"])
    add_examples(db, [NewExample(question=q, answer=a) for q, a in sample_qa(n_examples)])


def make_lora_adapter(base_path: str | Path, out_dir: Path, *, rank: int = 8, seed: int = 0, steps: int = 0,
                      texts: list[str] | None = None, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter on the base: random (non-zero) B so it changes outputs, optionally a few
    optimiser steps on `texts`. Saved with the base's tokenizer, as the registry keeps adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_path)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM", init_lora_weights=False, **lora_kwargs)
    model = get_peft_model(model, config)
    if steps:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = tok(texts or ["hello world"], return_tensors="pt", padding=True)
        for _ in range(steps):
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
