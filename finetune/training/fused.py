"""Two training steps done in fewer passes and less memory than the plain PyTorch/PEFT way, same results.

1. The output head and the cross-entropy, chunk by chunk (`answer_token_loss` with `head_weight`).
   A causal LM's loss needs the logits of every answer token: N x vocabulary floats, plus as many again for
   log-softmax and for each gradient. For Qwen2.5 (152k tokens) and 3,000 answer tokens that is ~1.8 GB per
   copy. Here the head is applied to a few hundred rows at a time, the loss and the gradient of each chunk
   are computed together, and only the gradient with respect to the hidden states (N x hidden) is kept for
   the backward pass. While training, the model's head returns its input (`fuse_output_head`), so the model
   never builds the full logits.

2. LoRA dropout inside lora_A (`fuse_lora_dropout`). PEFT computes lora_B(lora_A(nn.Dropout(x))) in every
   adapted layer, which keeps the dropped copy of x and the mask alive until the backward pass, and on the
   CPU draws the mask with torch's Mersenne-Twister `bernoulli_` (26% of a QLoRA step on the 10M-parameter
   bench model). Here lora_A drops its input itself and keeps only x (held once for q, k and v, which read
   the same tensor) and a seed; the backward pass draws the same mask again from the seed. Masks come from
   numpy's SFC64 on the CPU and from a torch generator on CUDA; the seed comes from torch's default
   generator, so `torch.manual_seed` makes training reproducible and gradient checkpointing (which restores
   torch's RNG state before recomputing a block) recomputes the same masks.

Both swap the class of an existing nn.Linear: parameters and state-dict keys do not change, so checkpoints,
adapters and merged models are the same files. tests/finetune/test_fused.py checks values and gradients
against the unfused computation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.training.data import IGNORE_INDEX

# --- Output head + cross-entropy -----------------------------------------------------------------------

CHUNK_BYTES = 128 * 1024 * 1024  # float32 logits held at once


class _HeadInTheLoss(nn.Linear):
    """The output head while training: returns the hidden states; answer_token_loss applies the head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else F.linear(x, self.weight, self.bias)


def fuse_output_head(model: nn.Module) -> nn.Parameter | None:
    """Make the model's output head pass hidden states through in training mode (eval mode is unchanged).

    Returns the head's weight for answer_token_loss, or None (and changes nothing) when the head is not a
    bias-free linear layer. `unfuse_output_head` undoes it.
    """
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    head.__class__ = _HeadInTheLoss
    return head.weight


def unfuse_output_head(model: nn.Module) -> None:
    head = model.get_output_embeddings()
    if type(head) is _HeadInTheLoss:
        head.__class__ = nn.Linear


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)), a chunk of rows at a time, gradients computed on the way."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, need_grads: bool):
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grads and weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = (h @ weight.T).float()  # (rows, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not need_grads:
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d loss / d logits
            grad_hidden[start : start + rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.T @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_total  # float32; autograd casts it to the weight's dtype
        return grad_hidden, grad_weight, None, None


def answer_token_loss(outputs, labels, num_items_in_batch=None, *, head_weight=None):
    """Cross-entropy over the answer tokens, the Trainer's `compute_loss_func`.

    `outputs.logits` holds one row per position where `logits_to_keep` was True (finetune.training.data's collator):
    logits, or, with `head_weight`, the hidden states the fused head passed through. Summed and divided by
    the number of answer tokens in the whole (accumulated, all-device) batch when the Trainer gives it, so
    that every token weighs the same whatever the batch it landed in.
    """
    rows = outputs["logits"] if isinstance(outputs, dict) else outputs[0]  # (N, V) or (N, H)
    rows = rows.reshape(-1, rows.shape[-1])
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX].to(rows.device)  # (N,), row-major like the rows
    if head_weight is None:
        loss = F.cross_entropy(rows.float(), targets, reduction="sum")
    else:
        need_grads = torch.is_grad_enabled() and (rows.requires_grad or head_weight.requires_grad)
        loss = _LinearCrossEntropy.apply(rows, head_weight, targets, need_grads)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(1, targets.numel())
    if hasattr(denominator, "to"):
        denominator = denominator.to(loss.device)
    return loss / denominator


# --- LoRA dropout ----------------------------------------------------------------------------------------

_LEVELS = 1 << 16  # masks compare 16-bit random integers with round(p * 65536): p is exact to 1e-5


def keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """1.0 where x is kept (probability 1 - p), 0.0 where dropped, in x's shape and dtype; the same seed
    gives the same mask. A float mask, because multiplying by it is several times faster than masked_fill."""
    if x.device.type == "cpu":
        n = x.numel()
        words = np.random.SFC64(seed).random_raw(-(-n // 4))  # 64 random bits = four 16-bit draws
        keep = (words.view(np.uint16)[:n] >= round(p * _LEVELS)).astype(np.float32)
        return torch.from_numpy(keep).view(x.shape).to(x.dtype)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return (torch.rand(x.shape, generator=generator, device=x.device) >= p).to(x.dtype)


class _DropoutLinear(torch.autograd.Function):
    """linear(dropout(x), weight) that keeps x and a seed for the backward pass, not the dropped copy.

    The 1 / (1 - p) scale is applied on the rank-sized side (output and its gradient), which is cheaper
    than scaling x and gives the same result.
    """

    @staticmethod
    def forward(ctx, x, weight, p: float, seed: int):
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return F.linear(x * keep_mask(x, p, seed), weight) * (1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        keep = keep_mask(x, ctx.p, ctx.seed)
        grad_out = grad_out * (1.0 / (1.0 - ctx.p))
        dtype = grad_out.dtype  # under autocast the forward ran in a lower precision than the weight
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_out @ weight.to(dtype)).to(x.dtype) * keep)
        if ctx.needs_input_grad[1]:
            dropped = (x * keep).to(dtype)
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None, None


class DropoutLinear(nn.Linear):
    """A bias-free lora_A that applies its adapter's dropout itself (in training mode only)."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout_p == 0.0:
            return F.linear(x, self.weight)
        seed = int(torch.randint(0, 2**62, ()).item())
        return _DropoutLinear.apply(x, self.weight, self.dropout_p, seed)


def fuse_lora_dropout(model: nn.Module) -> int:
    """Move every LoRA layer's dropout into its lora_A (parameters and state-dict keys unchanged).

    Returns how many adapters were changed. Layers this cannot express exactly (lora_A with a bias, LoRA
    variants such as DoRA, which read the dropout module themselves) keep PEFT's dropout.
    """
    changed = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, dropout in list(dropouts.items()):
            linear = lora_a[name] if name in lora_a else None
            if (not isinstance(dropout, nn.Dropout) or dropout.p == 0.0 or type(linear) is not nn.Linear
                    or linear.bias is not None or name in variants):
                continue
            linear.__class__ = DropoutLinear
            linear.dropout_p = float(dropout.p)
            dropouts[name] = nn.Identity()
            changed += 1
    return changed
