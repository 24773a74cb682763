"""A KV cache for generate() that fills a buffer in place instead of concatenating at every step.

transformers' DynamicCache appends each new token's keys and values with torch.cat, which copies the whole
cache, in every layer, at every step: for 16 answers to ~800-token prompts on the tiny base about a tenth of
the batch's time (docs/benchmarks.md, "Batching"). GrowingCache keeps each layer's keys and values in a
buffer with room for the prompt and `reserve` new tokens, and gives attention a view of the filled part; a
step writes only its own token. A buffer that fills up grows by `reserve` again (one copy).

    cache = GrowingCache(reserve=max_new_tokens)
    model.generate(..., cache=cache)

Whatever replaces the cached tensors from outside (crop, beam reordering) is taken over on the next update.
"""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """DynamicLayer whose keys and values are views of a preallocated (B, heads, capacity, head_dim) buffer."""

    def __init__(self, reserve: int = 256):
        super().__init__()
        self.reserve = max(1, reserve)
        self._key_buffer = self._value_buffer = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = self.keys.shape[-2] if self.keys.numel() else 0
        needed = filled + key_states.shape[-2]
        if not self._buffers_hold_the_cache(key_states, needed):
            self._key_buffer = self._grown(self.keys, key_states, filled, needed)
            self._value_buffer = self._grown(self.values, value_states, filled, needed)
        self._key_buffer[..., filled:needed, :] = key_states
        self._value_buffer[..., filled:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _buffers_hold_the_cache(self, states, needed: int) -> bool:
        buffer = self._key_buffer
        return (buffer is not None and needed <= buffer.shape[-2] and buffer.shape[:2] == states.shape[:2]
                and (self.keys.numel() == 0 or self.keys.data_ptr() == buffer.data_ptr()))

    def _grown(self, cached, states, filled: int, needed: int):
        batch, heads, _, dim = states.shape
        buffer = states.new_empty((batch, heads, needed + self.reserve, dim))
        if filled:
            buffer[..., :filled, :] = cached
        return buffer

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class GrowingCache(Cache):
    """A Cache of GrowingLayers, one per decoder layer, created as generate() first uses them."""

    def __init__(self, reserve: int = 256):
        super().__init__(layer_class_to_replicate=lambda: GrowingLayer(reserve))
