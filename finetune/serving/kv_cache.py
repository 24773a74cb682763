"""KV caches for batched decoding: prompts prefilled one at a time, decoded together in place.

Why not hand the model a left-padded batch as it is: on the CPU the batched prefill computed every row at the
longest prompt's length, and with a padding mask attention can take neither the causal shortcut nor skip the
padding. For 16 prompts of 537-1,191 tokens it took 2.3-2.8 s, against 1.0-1.2 s for the same prompts one by
one (docs/benchmarks.md, "Batching"). And transformers' DynamicCache appends each new token with torch.cat,
which copies the whole cache, in every layer, at every step: a fifth of a batched decode step.

Two users:
- `RunningBatch`, the answer engine's continuous batch (finetune.serving.scheduler): rows join and leave
  between decode steps, each on its own LoRA adapter or the base; see its docstring.
- `generate_batch`, for a fixed batch through generate() (evaluation: finetune.evaluation.metrics):

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

# A row without an adapter in PEFT's `adapter_names` (peft.tuners.lora.layer.LoraLayer._mixed_batch_forward).
PEFT_BASE = "__base__"


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


def _logits_of_last(model) -> dict:
    """`logits_to_keep=1` where forward() takes it: a prefill needs no logits but the last."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


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
    extra = _logits_of_last(model)
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


class RunningBatch:
    """The rows of a continuous batch and their KV cache: rows join and leave between decode steps.

    Every row's keys and values are right-aligned in one buffer per layer (row slots, heads, columns, dim):
    a row that has `n` tokens in the cache holds columns `width - n .. width - 1`, zeros to their left. A
    decode step feeds one token per row at its own position (`position_ids`), writes its keys and values in
    place at column `width` (BufferedLayer), and masks each row's columns left of its first token.

    Rows change without copying the cache where they can: a newcomer (prefilled alone, as `prefill` does)
    that fits the width is written into a free row slot; a row that leaves is replaced by the last row
    (one row copied) and the batch shrinks to a prefix of the slots. The buffers are rebuilt (one copy of
    the whole cache) only to widen them to the left for a prompt longer than the cache, to make room for
    more columns or slots, or to drop leading columns that became padding in every row (when they are at
    least a quarter of the width). A row feeds its prompt's last token at its first step.

    Adapters per row: on a PEFT model with several LoRA adapters loaded, `prefill` and `step` take each row's
    adapter name (PEFT_BASE: the base), passed on as PEFT's `adapter_names` (its mixed-adapter batches), so rows
    of different adapters decode in one forward pass. Without names (or all None) the model runs as it is.
    `model` may be replaced between steps by a wrapper of the same weights (PEFT wraps the base in a PeftModel
    when its first adapter loads, and a row on the base keeps PEFT_BASE); the cache stays valid.

        batch = RunningBatch(model, reserve=256, slots=16)
        batch.add([batch.prefill(a, "v1"), batch.prefill(b, PEFT_BASE)], [len(a) - 1, len(b) - 1])
        logits = batch.step([a[-1], b[-1]], ["v1", PEFT_BASE])  # (2, vocab): each row's next token, on its adapter
        order = batch.remove([0])                           # the rows left, as indices of the rows before
    """

    def __init__(self, model, *, reserve: int, slots: int = 1):
        self.model = model
        self.reserve = max(1, reserve)  # free columns a rebuild leaves to the right
        self.slots = max(1, slots)  # row slots a rebuild allocates (at least the rows present)
        self.device = next(model.parameters()).device
        self.cache: Cache | None = None  # BufferedLayers over the first len(self) slots of the buffers
        self.lengths: list[int] = []  # per row: tokens in the cache, the position of the token it feeds next
        self.width = 0  # columns in use
        self._keys: list[torch.Tensor] = []  # per layer: (slots, heads, columns, dim)
        self._values: list[torch.Tensor] = []
        self._cache_name = cache_kwarg(model)

    def __len__(self) -> int:
        return len(self.lengths)

    def prefill(self, prompt: list[int], adapter: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values, (heads, tokens, dim) per layer, of all but the prompt's last token, run alone (on
        `adapter`; None: the model as it is)."""
        if len(prompt) < 2:
            raise ValueError("prefill needs a prompt of two tokens or more")
        one = DynamicCache()
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([prompt[:-1]], device=self.device), use_cache=True,
                       **{self._cache_name: one}, **_logits_of_last(self.model), **self._adapters([adapter]))
        return [(layer.keys[0], layer.values[0]) for layer in one.layers]

    def add(self, prefilled: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int]) -> None:
        """Add rows at the end: `prefilled[i]` from `prefill(prompt)`, `lengths[i]` = len(prompt) - 1."""
        rows = len(self) + len(prefilled)
        if (not self._keys or max(lengths) > self.width or rows > self._keys[0].shape[0]
                or self.width >= self._keys[0].shape[2]):
            self._rebuild(list(range(len(self))), prefilled, lengths)
            return
        with torch.inference_mode():
            for slot, (kv, n) in enumerate(zip(prefilled, lengths), start=len(self)):
                for (k, v), keys, values in zip(kv, self._keys, self._values):
                    keys[slot].zero_()  # the slot may hold a row that left
                    values[slot].zero_()
                    keys[slot, :, self.width - n:self.width] = k
                    values[slot, :, self.width - n:self.width] = v
        self.lengths += list(lengths)
        self._views()

    def remove(self, rows: list[int]) -> list[int]:
        """Take rows out; returns the rows left, in their new order, as indices of the rows before."""
        gone = set(rows)
        left = len(self) - len(gone)
        order = list(range(left))
        movers = [i for i in range(left, len(self)) if i not in gone]  # kept rows beyond the new end
        with torch.inference_mode():
            for hole, mover in zip(sorted(i for i in gone if i < left), movers):
                for keys, values in zip(self._keys, self._values):
                    keys[hole] = keys[mover]
                    values[hole] = values[mover]
                order[hole] = mover
        self.lengths = [self.lengths[i] for i in order]
        if not self.lengths:
            self.cache, self._keys, self._values, self.width = None, [], [], 0
        elif self.width - max(self.lengths) >= max(1, self.width // 4):
            self._rebuild(list(range(left)), [], [])  # padding in every row: drop those columns
        else:
            self._views()
        return order

    def step(self, tokens: list[int], adapters: list[str | None] | None = None) -> torch.Tensor:
        """Feed one token per row (on the row's adapter; no list: the model as it is); the logits of each row's
        next token, (rows, vocab)."""
        if len(tokens) != len(self):
            raise ValueError(f"{len(tokens)} tokens for {len(self)} rows")
        adapters = [None] * len(tokens) if adapters is None else adapters
        if len(adapters) != len(tokens):
            raise ValueError(f"{len(adapters)} adapters for {len(tokens)} rows")
        if self.width >= self._keys[0].shape[2]:  # no free column left: rebuild with room
            self._rebuild(list(range(len(self))), [], [])
        width = self.width
        lengths = torch.tensor(self.lengths, device=self.device)
        # Row r attends to its own columns, width - lengths[r] .. width (the token fed now).
        mask = torch.arange(width + 1, device=self.device)[None, :] >= (width - lengths)[:, None]  # (B, width+1)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=mask,
                             position_ids=lengths[:, None], use_cache=True, **{self._cache_name: self.cache},
                             **self._adapters(adapters))
        self.lengths = [n + 1 for n in self.lengths]
        self.width += 1
        return out.logits[:, -1, :]

    def _adapters(self, names: list[str | None]) -> dict:
        """PEFT's `adapter_names` for rows on these adapters. None for every row: the model as it is. Otherwise
        every row names its adapter (PEFT_BASE: none), as PEFT needs on a model with adapters (its active
        adapter would apply to every row); on a model without adapters (yet) every row must be PEFT_BASE."""
        if all(name is None for name in names):
            return {}
        if not hasattr(self.model, "peft_config"):
            if any(name != PEFT_BASE for name in names):
                raise ValueError(f"adapters {sorted(set(map(str, names)))} asked of a model without adapters")
            return {}
        if None in names:
            raise ValueError("on a model with adapters every row names its adapter (PEFT_BASE: the base)")
        return {"adapter_names": list(names)}

    def _views(self) -> None:
        rows = len(self)
        self.cache = Cache(layers=[BufferedLayer(k[:rows], v[:rows], self.width, self.reserve)
                                   for k, v in zip(self._keys, self._values)])

    def _rebuild(self, keep: list[int], prefilled: list, lengths: list[int]) -> None:
        """New buffers holding the rows `keep` (indices of the present rows, in order), then the prefilled
        ones, as wide as the longest row plus `reserve`."""
        all_lengths = [self.lengths[i] for i in keep] + list(lengths)
        width, rows = max(all_lengths), len(all_lengths)
        span = max((self.lengths[i] for i in keep), default=0)  # the kept rows' columns, at the old right edge
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        keys_out, values_out = [], []
        with torch.inference_mode():
            for li in range(len(self._keys) if self._keys else len(prefilled[0])):
                k_like = self._keys[li] if self._keys else prefilled[0][li][0][None]
                v_like = self._values[li] if self._values else prefilled[0][li][1][None]
                # zeros, not empty: a masked position's value still meets a zero weight
                keys = k_like.new_zeros((max(rows, self.slots), k_like.shape[1], width + self.reserve, k_like.shape[-1]))
                values = v_like.new_zeros((max(rows, self.slots), v_like.shape[1], width + self.reserve,
                                           v_like.shape[-1]))
                if keep:
                    old = self.width
                    keys[:len(keep), :, width - span:width] = self._keys[li][index, :, old - span:old]
                    values[:len(keep), :, width - span:width] = self._values[li][index, :, old - span:old]
                for row, (kv, n) in enumerate(zip(prefilled, lengths), start=len(keep)):
                    keys[row, :, width - n:width] = kv[li][0]
                    values[row, :, width - n:width] = kv[li][1]
                keys_out.append(keys)
                values_out.append(values)
        self._keys, self._values, self.lengths, self.width = keys_out, values_out, all_lengths, width
        self._views()
