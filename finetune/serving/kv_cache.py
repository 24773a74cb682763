"""Prefill prompts one at a time, then decode them together from one left-padded KV cache.

Why not hand generate() the left-padded batch as it is: on the CPU the batched prefill computed every row
at the longest prompt's length, and with a padding mask attention can take neither the causal shortcut nor
skip the padding. For 16 prompts of 537-1,191 tokens it took 2.3-2.8 s, against 1.0-1.2 s for the same
prompts one by one (docs/benchmarks.md, "Batching"). And transformers' DynamicCache appends each new token with
torch.cat, which copies the whole cache, in every layer, at every step: a fifth of a batched decode step.

    new_tokens = generate_batch(model, prompts, max_new_tokens=256, pad_token_id=pad, eos_token_id=eos, ...)

`prefill` runs each prompt but its last token through the model alone (no padding, no mask), and copies
the keys and values into one buffer per layer, right-aligned like a left-padded batch, with room for
`reserve` new tokens. generate() then sees a cache that already holds all but the last prompt token of
every row, feeds only those last tokens, and each step writes its token in place. Positions agree: the
prompts were prefilled from position 0, and generate() numbers a left-padded row from its first real token.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of a preallocated (batch, heads, capacity, head_dim)
    buffer: an update writes only the new tokens. A buffer that fills up grows by `reserve` (one copy)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int, reserve: int):
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self.reserve = max(1, reserve)
        self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]

    def update(self, key_states, value_states, *args, **kwargs):
        filled = self.keys.shape[-2]
        needed = filled + key_states.shape[-2]
        if not self._buffers_hold_the_cache(key_states, needed):
            # Full, or the cached tensors were replaced from outside (crop, beam reordering): copy once.
            self._key_buffer = self._grown(self.keys, key_states, filled, needed)
            self._value_buffer = self._grown(self.values, value_states, filled, needed)
        self._key_buffer[..., filled:needed, :] = key_states
        self._value_buffer[..., filled:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _buffers_hold_the_cache(self, states: torch.Tensor, needed: int) -> bool:
        buffer = self._key_buffer
        return (needed <= buffer.shape[-2] and buffer.shape[:2] == states.shape[:2]
                and self.keys.data_ptr() == buffer.data_ptr())

    def _grown(self, cached: torch.Tensor, states: torch.Tensor, filled: int, needed: int) -> torch.Tensor:
        batch, heads, _, dim = states.shape
        buffer = states.new_zeros((batch, heads, needed + self.reserve, dim))
        if filled:
            buffer[..., :filled, :] = cached
        return buffer


def _forward_parameters(model) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    return set(inspect.signature(inner.forward).parameters)


def cache_kwarg(model) -> str:
    """The name forward() and generate() take the cache by: `cache` in recent transformers 5 releases (5.24
    warns that `past_key_values` goes in 5.40), `past_key_values` in the earlier ones."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def prefill(model, prompts: list[list[int]], *, reserve: int, pad_token_id: int
            ) -> tuple[Cache, torch.Tensor, torch.Tensor]:
    """(cache, input_ids, attention_mask) for generate(): the prompts left-padded, and a cache holding
    every prompt but its last token, with room for `reserve` more tokens per row."""
    if not prompts or min(map(len, prompts)) < 2:
        raise ValueError("prefill needs at least one prompt, each of two tokens or more")
    device = next(model.parameters()).device
    longest = max(map(len, prompts))
    extra = {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}
    cache_name = cache_kwarg(model)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for row, ids in enumerate(prompts):
        one = DynamicCache()
        model(input_ids=torch.tensor([ids[:-1]], device=device), use_cache=True, **{cache_name: one}, **extra)
        start = longest - len(ids)  # right-aligned: row `row` holds positions start .. longest-2
        for i, layer in enumerate(one.layers):
            if i == len(keys):  # zeros, not empty: a masked position's value still meets a zero weight
                shape = (len(prompts), layer.keys.shape[1], longest - 1 + reserve, layer.keys.shape[-1])
                keys.append(layer.keys.new_zeros(shape))
                values.append(layer.values.new_zeros(shape[:-1] + (layer.values.shape[-1],)))
            keys[i][row, :, start:longest - 1] = layer.keys[0]
            values[i][row, :, start:longest - 1] = layer.values[0]
    cache = Cache(layers=[BufferedLayer(k, v, longest - 1, reserve) for k, v in zip(keys, values)])
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids):] = torch.tensor(ids, device=device)
        attention_mask[row, longest - len(ids):] = 1
    return cache, input_ids, attention_mask


def generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int, pad_token_id: int, **generate_kwargs
                   ) -> torch.Tensor:
    """generate() on prompts prefilled one by one; the new tokens, (batch, new), padded after a row stops.
    `generate_kwargs` go to generate() as they are (generation config, stopping criteria, streamer, ...)."""
    with torch.inference_mode():
        cache, input_ids, attention_mask = prefill(model, prompts, reserve=max_new_tokens, pad_token_id=pad_token_id)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_token_id, **generate_kwargs, **{cache_kwarg(model): cache})
    return out[:, input_ids.shape[1]:]
