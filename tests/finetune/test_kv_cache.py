"""Prefilling prompts one by one and decoding them from one left-padded cache generates what each prompt
generates alone (finetune.serving.kv_cache)."""

from __future__ import annotations

import pytest
import torch

from finetune.model.prompting import PromptPassage, build_messages, render_prompt
from finetune.serving.kv_cache import BufferedLayer, cache_kwarg, prefill

QUESTIONS = [
    ("VPN?", []),
    ("How many days of parental leave do new parents get, and who approves it?",
     [PromptPassage("Leave policy", "Parents get 30 days of paid leave. Your manager approves the request.")]),
    ("报销需要哪些发票？", [PromptPassage("报销制度", "报销需要提供正规发票和审批单，三十天内提交。")]),
]


@pytest.fixture(scope="module")
def model(tiny_path):
    from finetune.model.loading import load_base_model

    return load_base_model(tiny_path).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    out = [tokenizer(render_prompt(tokenizer, build_messages(q, passages=ps)), add_special_tokens=False).input_ids
           for q, ps in QUESTIONS]
    assert len({len(p) for p in out}) == len(out)  # different lengths: the batch needs padding
    return out


GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def _alone(model, ids: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Plain generate() on one unpadded prompt with transformers' own cache, the reference: the new tokens and
    each step's logits (the random tiny model repeats one token, so the tokens alone would prove little)."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, **GREEDY)
    return out.sequences[0, len(ids):].tolist(), torch.stack(out.logits, dim=1)[0]


def _batched(model, prompts, new_tokens: int, reserve: int):
    """The same through prefill(): [(tokens, logits)] per prompt, and the cache."""
    with torch.inference_mode():
        cache, input_ids, attention_mask = prefill(model, prompts, reserve=reserve, pad_token_id=0)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             **GREEDY, **{cache_kwarg(model): cache})
    logits = torch.stack(out.logits, dim=1)
    return [(row, logits[i]) for i, row in enumerate(out.sequences[:, input_ids.shape[1]:].tolist())], cache


def _assert_same(got, expected) -> None:
    for (tokens, logits), (ref_tokens, ref_logits) in zip(got, expected, strict=True):
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_a_prefilled_batch_generates_what_each_prompt_generates_alone(model, prompts):
    expected = [_alone(model, p, 12) for p in prompts]
    got, cache = _batched(model, prompts, 12, reserve=12)
    _assert_same(got, expected)
    # Every step wrote into the buffer made by prefill: no layer was copied to grow.
    for layer in cache.layers:
        assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()
        assert layer.keys.shape[-2] == max(map(len, prompts)) - 1 + 12


def test_the_cache_holds_each_prompt_right_aligned_after_zeros(model, prompts):
    from transformers import DynamicCache

    with torch.inference_mode():
        cache, input_ids, attention_mask = prefill(model, prompts, reserve=4, pad_token_id=7)
        longest = max(map(len, prompts))
        assert input_ids.shape == attention_mask.shape == (len(prompts), longest)
        for row, ids in enumerate(prompts):
            start = longest - len(ids)
            assert input_ids[row, start:].tolist() == ids and set(input_ids[row, :start].tolist()) <= {7}
            assert attention_mask[row].tolist() == [0] * start + [1] * len(ids)
            alone = DynamicCache()
            model(input_ids=torch.tensor([ids[:-1]]), **{cache_kwarg(model): alone})
            for mine, reference in zip(cache.layers, alone.layers):
                assert torch.equal(mine.keys[row, :, start:], reference.keys[0])
                assert torch.equal(mine.values[row, :, start:], reference.values[0])
                assert not mine.keys[row, :, :start].any() and not mine.values[row, :, :start].any()


def test_a_full_buffer_grows_and_generation_goes_on_unchanged(model, prompts):
    expected = [_alone(model, p, 6) for p in prompts]
    got, cache = _batched(model, prompts, 6, reserve=2)  # room for 2 new tokens: grows twice
    _assert_same(got, expected)
    assert all(layer.keys.shape[-2] == max(map(len, prompts)) - 1 + 6 for layer in cache.layers)


def test_a_layer_whose_tensors_were_replaced_copies_them_before_writing():
    keys = torch.zeros(2, 1, 5, 3)
    layer = BufferedLayer(keys, torch.zeros(2, 1, 5, 3), filled=2, reserve=3)
    layer.batch_select_indices(torch.tensor([1]))  # what beam search or a dropped row does from outside
    new = torch.ones(1, 1, 1, 3)
    k, v = layer.update(new, new)
    assert k.shape == (1, 1, 3, 3) and torch.equal(k[:, :, 2], new[:, :, 0]) and not k[:, :, :2].any()
    assert layer._key_buffer.data_ptr() != keys.data_ptr() and k.data_ptr() == layer._key_buffer.data_ptr()


def test_prompts_that_cannot_be_prefilled_are_refused(model):
    with pytest.raises(ValueError, match="two tokens or more"):
        prefill(model, [[5, 6, 7], [5]], reserve=4, pad_token_id=0)
    with pytest.raises(ValueError, match="at least one prompt"):
        prefill(model, [], reserve=4, pad_token_id=0)


def test_an_adapter_model_prefills_through_peft(model, tiny_path, prompts):
    from peft import LoraConfig, get_peft_model

    from finetune.model.loading import load_base_model

    peft_model = get_peft_model(load_base_model(tiny_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero, so that the adapter changes the answers
            torch.nn.init.normal_(param, std=0.5)
    peft_model.eval()
    expected = [_alone(peft_model, p, 8) for p in prompts]
    assert not torch.allclose(expected[0][1], _alone(model, prompts[0], 8)[1], atol=1e-2)  # the adapter counts
    got, _ = _batched(peft_model, prompts, 8, reserve=8)
    _assert_same(got, expected)


def test_the_cache_keyword_follows_the_installed_transformers():
    class OldModel(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):  # transformers before `cache`
            return input_ids

    class NewModel(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    assert cache_kwarg(OldModel()) == "past_key_values"
    assert cache_kwarg(NewModel()) == "cache"
