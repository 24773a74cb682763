"""How QLoRA's 4-bit layers compute while training: the dtype measured on the machine, the frozen weights
unpacked once. Both must leave outputs and gradients as bitsandbytes' own path gives them."""

from __future__ import annotations

import pytest

from finetune.training.config import TrainConfig

pytestmark = pytest.mark.slow


def test_compute_dtype_is_the_faster_of_bf16_and_fp32_on_the_cpu():
    import torch

    from finetune.training.qlora import qlora_compute_dtype

    if torch.cuda.is_available():
        pytest.skip("on a GPU the GPU's dtype is used")
    slow_bf16 = {torch.bfloat16: 0.5, torch.float32: 0.05}  # seconds per product, as on the development CPU
    dtype, why = qlora_compute_dtype(measure=slow_bf16.get)
    assert dtype is torch.float32 and "so fp32" in why and "bf16 0.8 vs fp32 8.1 GFLOP/s" in why
    fast_bf16 = {torch.bfloat16: 0.01, torch.float32: 0.05}  # a CPU with AMX
    dtype, _ = qlora_compute_dtype(measure=fast_bf16.get)
    assert dtype is torch.bfloat16


def _qlora(tiny_path):
    import torch

    from finetune.training.config import resolve_config
    from finetune.training.model_setup import prepare_model as _prepare_model

    cfg, _ = resolve_config(TrainConfig(base=tiny_path, method="qlora", rank=4, alpha=8, dropout=0.0, epochs=1.0,
                                        batch_size=2, grad_accum=1, max_length=64, k_passages=0,
                                        gradient_checkpointing=False), tiny=True, n_examples=8)
    torch.manual_seed(0)
    model = _prepare_model(cfg)
    for name, p in model.named_parameters():  # lora_B starts at zero: give it values so every grad is live
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_unpacked_weights_give_the_same_loss_and_gradients_as_bitsandbytes(tiny_path, dtype_name):
    import torch

    from finetune.training.qlora import keep_dequantized_weights, set_qlora_compute_dtype

    dtype = getattr(torch, dtype_name)
    ids = torch.randint(10, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    model = _qlora(tiny_path)
    assert set_qlora_compute_dtype(model, dtype) > 0 or dtype is torch.bfloat16  # bf16 is the config's own
    loss_bnb, grads_bnb = _loss_and_grads(model, ids)
    changed = keep_dequantized_weights(model, dtype)
    assert changed == 4 * 7  # every projection of the tiny base's 4 layers
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, loss_bnb, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_bnb.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_bnb[name], rtol=1e-4, atol=1e-7, msg=name)


def test_fp32_compute_changes_what_the_4bit_layers_compute_in(tiny_path):
    import bitsandbytes as bnb
    import torch

    from finetune.training.qlora import set_qlora_compute_dtype

    model = _qlora(tiny_path)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype is torch.bfloat16 for m in layers)  # QLoRA's configured dtype
    assert set_qlora_compute_dtype(model, torch.float32) == len(layers)
    assert all(m.compute_dtype is torch.float32 for m in layers)
    ids = torch.randint(10, 300, (1, 16))
    model(input_ids=ids)  # bitsandbytes' first forward must not switch it back
    assert all(m.compute_dtype is torch.float32 for m in layers)


def test_a_qlora_run_says_how_it_computed(tiny_path, tmp_path):
    import json

    from finetune.training.data import TrainingExample
    from finetune.training.trainer import train_adapter
    from tests.conftest import SAMPLES

    rows = [json.loads(line) for line in (SAMPLES / "qa.jsonl").read_text(encoding="utf-8").splitlines()[:8]]
    examples = [TrainingExample(question=r["instruction"], input="", answer=r["output"]) for r in rows]
    outcome = train_adapter(TrainConfig(base=tiny_path, method="qlora", rank=4, alpha=8, epochs=1.0, batch_size=4,
                                        grad_accum=1, max_length=96, k_passages=0), examples, tmp_path / "a")
    assert any(n.startswith("QLoRA computes in ") and "GFLOP/s on this CPU" in n for n in outcome.notes)
    assert any("4-bit layers' weights unpacked once for the run" in n for n in outcome.notes)
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
