"""GrowingCache gives generate() the same tokens as transformers' own cache, with and without growing."""

from __future__ import annotations

import pytest
import torch

from finetune.kv_cache import GrowingCache, GrowingLayer


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_path):
    from finetune.models import load_base_model, load_tokenizer

    model = load_base_model(tiny_path)
    model.eval()
    return model, load_tokenizer(tiny_path)


@pytest.mark.parametrize("reserve", [40, 7])  # 7 < the 40 new tokens: the buffer grows during generation
def test_growing_cache_generates_what_the_default_cache_does(model_and_tokenizer, reserve):
    model, tok = model_and_tokenizer
    tok.padding_side = "left"
    prompts = ["How many vacation days do I get?", "VPN 怎么设置？请详细说明步骤。", "Hi"]
    enc = tok(prompts, return_tensors="pt", padding=True)  # left padding: rows of different lengths
    kw = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=40, do_sample=False,
              min_new_tokens=40, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        expected = model.generate(**kw)
        cache = GrowingCache(reserve=reserve)
        got = model.generate(**kw, cache=cache)
    assert torch.equal(got, expected)
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    assert layer.keys.shape[-2] == expected.shape[1] - 1  # every token but the last generated one is cached
    assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()  # a view of the buffer, not a copy


def test_a_replaced_cache_tensor_is_taken_over():
    layer = GrowingLayer(reserve=4)
    first = torch.randn(2, 1, 3, 8)
    layer.update(first, first.clone())
    layer.keys, layer.values = layer.keys[[1]], layer.values[[1]]  # what beam reordering does
    new = torch.randn(1, 1, 1, 8)
    keys, _ = layer.update(new, new.clone())
    assert keys.shape == (1, 1, 4, 8)
    assert torch.equal(keys[:, :, :3], first[[1]]) and torch.equal(keys[:, :, 3:], new)
