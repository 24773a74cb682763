"""What a training run keeps in memory: gradient checkpointing, and memory handed back to the OS.

`choose_checkpointing` decides what `gradient_checkpointing="auto"` means from the free memory of the training
device (whole layers, QLoRA's feed-forward blocks only, or nothing); `checkpoint_feed_forward` recomputes the
feed-forward blocks; `trim_memory_callback` returns the memory each micro-batch freed to the OS on the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import psutil

from finetune.model import loading
from finetune.training.config import TrainConfig
from store import StoreError


def activation_bytes(model_config, *, batch_size: int, max_length: int, dtype_bytes: int) -> int:
    """Activations one training batch keeps for the backward pass: ~34 values per hidden unit, token and
    layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"; the
    attention-score term is left out, as SDPA does not keep the scores)."""
    text = getattr(model_config, "text_config", None) or model_config
    per_token_layer = 34 * text.hidden_size * dtype_bytes // 2
    return batch_size * max_length * text.num_hidden_layers * per_token_layer


def choose_checkpointing(config: TrainConfig) -> tuple[bool | str, str]:
    """What `gradient_checkpointing="auto"` means for this run: True (whole layers), "mlp" or False.

    Whole layers when one batch's activations would take more than a quarter of the memory free on the
    training device (recomputing a layer costs ~25-35% more compute). QLoRA, the method for training in the
    least memory, recomputes its feed-forward blocks when they would take more than a sixteenth: their
    intermediate tensors are about half of what a layer keeps. Recomputing is not cheap: with the base frozen,
    the feed-forward block is ~3/4 of a layer's matrix products and its forward pass ~1/2 of a step's, so
    it cost 22% more CPU time on the guide200 bench (docs/benchmarks.md): below a sixteenth, nothing is
    recomputed. LoRA and full fine-tuning keep everything below a quarter.
    """
    import torch
    from transformers import AutoConfig

    need = activation_bytes(AutoConfig.from_pretrained(config.base), batch_size=config.batch_size,
                            max_length=config.max_length, dtype_bytes=torch.finfo(loading.compute_dtype()).bits // 8)
    if torch.cuda.is_available():
        free, where = torch.cuda.mem_get_info()[0], "GPU"
    else:
        free, where = psutil.virtual_memory().available, "RAM"
    gib = 1024**3
    why = (f"a batch's activations take ~{need / gib:.2f} GiB of {free / gib:.1f} GiB free {where} "
           f"(batch {config.batch_size} x {config.max_length} tokens)")
    if need > free / 4:
        return True, f"whole layers: {why}"
    if config.method == "qlora" and need > free / MLP_CHECKPOINT_SHARE:
        return "mlp", f"feed-forward blocks only (QLoRA trains in the least memory): {why}"
    return False, why


# QLoRA recomputes its feed-forward blocks when a batch's activations would take more than this share of the free
# memory (whole layers past a quarter, for every method).
MLP_CHECKPOINT_SHARE = 16


def checkpoint_feed_forward(model) -> None:
    """Recompute each decoder layer's feed-forward block (`mlp`) in the backward pass instead of keeping its
    intermediate tensors (gate, up, their product: 3-4 x intermediate_size values per token)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    blocks = [m for name, m in model.named_modules() if name.endswith(".mlp")]
    if not blocks:
        raise StoreError(f"{model.config._name_or_path}: no `mlp` blocks to checkpoint; "
                         "use gradient checkpointing true (whole layers) instead of mlp")
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, _block=block, **kwargs):
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = checkpointed


def trim_memory_callback():
    """Trainer callback (CPU): hand the memory freed by each micro-batch back to the OS.

    Batches grouped by length have a different shape every step, and glibc keeps the freed blocks of one
    shape in fragments that the next shape cannot reuse: on the 10M bench model the peak was 119 MB lower
    with this (1,116 vs 997 MB over 80 micro-batches, docs/benchmarks.md), at no measurable cost in time.
    """
    from transformers import TrainerCallback

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        trim = None

    class Callback(TrainerCallback):
        def on_substep_end(self, args, state, control, **kw):
            if trim is not None:
                trim(0)

        on_step_end = on_substep_end

    return Callback()
