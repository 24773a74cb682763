"""`export_merged`: base + adapter merged into one full-precision model folder."""

from __future__ import annotations

import json

import pytest

from finetune.registry.export import EXPORT_META, export_merged
from store import ConfigError, StoreError
from store import adapters as rows


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from finetune.model.tiny import ensure_tiny_base
    from tests.finetune.registry_fixtures import sample_texts

    return ensure_tiny_base(tmp_path_factory.mktemp("export-home"), sample_texts())


def _register_lora(db, home, tiny_base, version="v1", method="lora"):
    from tests.finetune.registry_fixtures import make_lora_adapter

    # The workspace's `tiny` resolves to $KBLOOP_HOME/models/tiny: share the module's base.
    (home / "models").mkdir(parents=True, exist_ok=True)
    if not (home / "models" / "tiny").exists():
        (home / "models" / "tiny").symlink_to(tiny_base, target_is_directory=True)
    path = make_lora_adapter(tiny_base, home / "adapters" / version, rank=8, seed=1)
    return rows.register_adapter(db, version=version, path=str(path), base_model="tiny", method=method,
                                 params={"rank": 8}, dataset_hash="h", dataset_size=1, metrics={})


@pytest.mark.slow
def test_merged_model_matches_base_plus_adapter(db, kbloop_home, tiny_base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _register_lora(db, kbloop_home, tiny_base, method="qlora")  # trained 4-bit, merged in fp32
    out = export_merged(db, "v1", tmp_path / "merged", home=kbloop_home)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", EXPORT_META} <= names
    assert "adapter_config.json" not in names and not [n for n in names if n.startswith(".")]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((out / EXPORT_META).read_text())["version"] == "v1"

    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["How many vacation days do I get?", "年假有几天？"], return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert next(merged.parameters()).dtype == torch.float32
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.inference_mode():
        base_logits = base(**batch).logits
        reference = PeftModel.from_pretrained(base, adapter.path)(**batch).logits
        got = merged(**batch).logits
    # The adapter changes the output (so the comparison means something) and the merge keeps that change.
    assert (reference - base_logits).abs().max() > 1e-2
    assert torch.allclose(got, reference, atol=1e-4, rtol=1e-4), (got - reference).abs().max()


def test_export_bad_input(db, kbloop_home, tmp_path):
    with pytest.raises(StoreError, match=r"no adapter 'v7' \(known: none yet\)"):
        export_merged(db, "v7", tmp_path / "out", home=kbloop_home)
    folder = kbloop_home / "adapters" / "v1"
    rows.register_adapter(db, version="v1", path=str(folder), base_model="tiny", method="lora", params={},
                          dataset_hash=None, dataset_size=0, metrics={})
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="already exists; choose a new folder"):
        export_merged(db, "v1", existing, home=kbloop_home)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(StoreError, match="folder .* is missing"):
        export_merged(db, "v1", tmp_path / "new", home=kbloop_home)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        export_merged(db, "v1", tmp_path / "new", home=kbloop_home, dtype="int3")
    assert not (tmp_path / "new").exists()
