"""The fused training ops give the values and gradients of the plain computation (finetune.training.fused)."""

from __future__ import annotations

import pytest
import torch

from finetune.training import fused
from finetune.training.data import IGNORE_INDEX, CompletionCollator, TrainingExample, encode_example


def _batch(tokenizer, eot):
    answers = ("Yes.", "No, never: ask the IT desk first.", "三十天。")
    feats = [encode_example(tokenizer, TrainingExample(question=f"Question {i}?", input="", answer=a, passages=[]),
                            max_length=512, eot_id=eot) for i, a in enumerate(answers)]
    return CompletionCollator(pad_id=tokenizer.pad_token_id)(feats)


def _prompt(batch) -> torch.Tensor:
    """The real (non-padding) prompt positions: before the first label of each row."""
    labelled = batch["labels"] != IGNORE_INDEX
    first = labelled.int().argmax(dim=1, keepdim=True)
    return torch.arange(labelled.shape[1])[None, :] < first


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_answer_token_loss_matches_the_models_own_loss_and_gradients(tiny_path, tokenizer, eot, monkeypatch):
    from finetune.model.loading import load_base_model

    model = load_base_model(tiny_path)
    model.train()
    batch = _batch(tokenizer, eot)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=(batch["labels"] != IGNORE_INDEX) | _prompt(batch))

    reference = model(**inputs, labels=batch["labels"]).loss  # HF's loss over the same answer tokens
    reference.backward()
    expected = _grads(model)
    model.zero_grad()

    # The collator gives no attention mask (right padding is invisible under causal attention): same loss.
    assert "attention_mask" not in batch
    plain = model(input_ids=batch["input_ids"], logits_to_keep=batch["logits_to_keep"])
    assert plain.logits.shape[0] == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # answer positions only
    assert fused.answer_token_loss(plain, batch["labels"]).item() == pytest.approx(reference.item(), rel=1e-5)

    weight = fused.fuse_output_head(model)
    assert weight is model.get_output_embeddings().weight
    monkeypatch.setattr(fused, "CHUNK_BYTES", 4 * weight.shape[0] * 7)  # 7 rows a chunk: several chunks
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], logits_to_keep=batch["logits_to_keep"])
    assert out.logits.shape[-1] == model.config.hidden_size  # the head passed the hidden states through
    loss = fused.answer_token_loss(out, batch["labels"], head_weight=weight)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    got = _grads(model)
    assert got.keys() == expected.keys()  # the tied head/embedding weight included
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_fused_head_computes_logits_outside_training_and_unfuses(tiny_path):
    from finetune.model.loading import load_base_model

    model = load_base_model(tiny_path)
    keys = set(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fused.fuse_output_head(model)
    assert set(model.state_dict()) == keys  # same parameters, same checkpoint files
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # eval mode: real logits
        model.train()
        assert model(input_ids=ids).logits.shape[-1] == model.config.hidden_size
    fused.unfuse_output_head(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_dropout_linear_matches_dropout_then_linear_with_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 64, requires_grad=True)
    layer = fused.DropoutLinear(64, 8, bias=False)
    layer.dropout_p = 0.25
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, ()).item())  # the seed the layer drew
    keep = fused.keep_mask(x.detach(), 0.25, seed).clone()
    assert 0.2 < 1 - keep.mean().item() < 0.3
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.linear(x_ref * keep / 0.75, w_ref)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)


def test_dropout_masks_have_the_asked_rate_and_follow_the_seed():
    x = torch.ones(1000, 1000)
    keep = fused.keep_mask(x, 0.1, seed=7)
    assert keep.dtype == x.dtype and keep.shape == x.shape
    assert abs((1 - keep.mean().item()) - 0.1) < 0.002  # 1M draws: sd 0.0003, so this allows ~7 sd
    assert torch.equal(fused.keep_mask(x, 0.1, seed=7), keep)
    assert not torch.equal(fused.keep_mask(x, 0.1, seed=8), keep)
    layer = fused.DropoutLinear(1000, 4, bias=False)
    layer.dropout_p = 0.1
    layer.eval()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))  # no dropout in eval


def test_fused_lora_dropout_in_a_peft_model_keeps_its_keys_and_is_recomputed_under_checkpointing(tiny_path):
    from peft import LoraConfig, get_peft_model

    from finetune.model.loading import load_base_model

    def lora_model(checkpointing: bool):
        torch.manual_seed(0)
        base = load_base_model(tiny_path)
        if checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():  # lora_B starts at zero: give it values so every grad is live
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return model

    plain = lora_model(False)
    keys = set(plain.state_dict())
    adapters = sum(1 for m in plain.modules() if isinstance(m, torch.nn.Dropout))
    assert adapters > 0 and fused.fuse_lora_dropout(plain) == adapters
    assert set(plain.state_dict()) == keys
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    checkpointed = lora_model(True)
    fused.fuse_lora_dropout(checkpointed)

    ids = torch.randint(10, 200, (2, 24))
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(123)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:  # the recomputed forward drew the same masks
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    torch.manual_seed(124)
    plain.zero_grad()
    plain(input_ids=ids, labels=ids).loss.backward()
    assert any(not torch.allclose(p.grad, grads[0][n]) for n, p in plain.named_parameters() if p.grad is not None)
