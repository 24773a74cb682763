"""How QLoRA's 4-bit layers compute on this machine: the compute dtype, and weights unpacked once when they fit.

The 4-bit NF4 base (finetune.model.loading) computes in bf16 as the QLoRA recipe has it, except on a CPU whose
bf16 products are slower than fp32, where it computes in fp32 (`qlora_compute_dtype`, measured once per process);
on the CPU the frozen 4-bit weights are unpacked once when they fit in a sixteenth of the free memory
(`keep_dequantized_weights`). The weights are the same NF4 values either way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import psutil

_MATMUL_SHAPE = (512, 384, 1024)  # (tokens, in, out): a small model's feed-forward projection


def qlora_compute_dtype(*, measure: Callable[[object], float] | None = None) -> tuple[object, str]:
    """The dtype QLoRA's 4-bit layers compute in: bf16 (fp16 on GPUs without bf16) as the QLoRA recipe has it,
    except on a CPU whose bf16 matrix products are slower than its fp32 ones.

    Measured, not assumed: on the development machine (AVX512_BF16, PyTorch 2.13 CPU) a bf16 product ran at
    5 GFLOP/s against 40-60 in fp32, and those products were 80% of a QLoRA step; CPUs with AMX run bf16
    faster. The weights are the same 4-bit NF4 values either way: only the precision of the product changes.
    `measure(dtype)` returns seconds per product (tests pass their own); the choice is made once per process.
    """
    import torch

    if torch.cuda.is_available():
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), "the GPU's compute dtype"
    if measure is None:
        if _CPU_CHOICE:
            return _CPU_CHOICE[0]
        measure = _matmul_seconds
    bf16, fp32 = measure(torch.bfloat16), measure(torch.float32)
    speeds = f"bf16 {_gflops(bf16):.1f} vs fp32 {_gflops(fp32):.1f} GFLOP/s on this CPU"
    choice = (torch.bfloat16, f"{speeds}") if bf16 < fp32 else (torch.float32, f"{speeds}, so fp32")
    if measure is _matmul_seconds:
        _CPU_CHOICE.append(choice)
    return choice


_CPU_CHOICE: list = []  # this process's measured choice


def _gflops(seconds: float) -> float:
    m, k, n = _MATMUL_SHAPE
    return 2 * m * k * n / max(seconds, 1e-12) / 1e9


def _matmul_seconds(dtype) -> float:
    """Best of a few timed (tokens x in) @ (in x out) products in `dtype` on the CPU."""
    import torch

    m, k, n = _MATMUL_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    torch.nn.functional.linear(a, w)  # warm up
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t)
    return best


def set_qlora_compute_dtype(model, dtype) -> int:
    """Make every 4-bit layer (bitsandbytes Linear4bit) compute in `dtype`; returns how many it changed."""
    changed = 0
    for module in _four_bit_layers(model):
        if module.compute_dtype != dtype:
            module.compute_dtype = dtype
            module.compute_type_is_set = True  # bitsandbytes would otherwise pick from the first input
            changed += 1
    return changed


def keep_dequantized_when_it_fits(model, dtype) -> str:
    """On the CPU, when the base's 4-bit weights unpacked take at most 1/16 of the free memory, unpack them once
    for the run (`keep_dequantized_weights`) instead of in every forward and backward pass. Returns the note."""
    import torch

    if torch.cuda.is_available():
        return "4-bit weights unpacked in each pass (GPU: QLoRA is there to save its memory)"
    need = sum(m.weight.quant_state.shape.numel() for m in _four_bit_layers(model)) * torch.finfo(dtype).bits // 8
    free = psutil.virtual_memory().available
    if need > free / 16:
        return f"4-bit weights unpacked in each pass: unpacked once they would take {need / 2**20:.0f} MB of " \
               f"{free / 2**30:.1f} GiB free"
    changed = keep_dequantized_weights(model, dtype)
    return (f"the {changed} 4-bit layers' weights unpacked once for the run ({need / 2**20:.0f} MB, "
            f"{free / 2**30:.1f} GiB free): same values, no unpacking in every pass")


def _four_bit_layers(model) -> list:
    try:
        import bitsandbytes as bnb
    except Exception:  # no bitsandbytes: no 4-bit layers
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_dequantized_weights(model, dtype) -> int:
    """Give every 4-bit layer a frozen copy of its weights unpacked to `dtype`, computed once, and make its
    forward a plain linear on that copy. The values are exactly those bitsandbytes unpacks in every pass
    (NF4 codes times their block scales), so outputs and gradients are unchanged; the packed weights stay in
    place for saving. Returns how many layers it changed."""
    import bitsandbytes.functional as bnbf
    import torch
    import torch.nn.functional as F

    layers = _four_bit_layers(model)
    for layer in layers:
        with torch.no_grad():
            unpacked = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        bias = layer.bias

        def forward(x, _w=unpacked, _b=bias):
            b = None if _b is None else _b.to(_w.dtype)
            return F.linear(x.to(_w.dtype), _w, b).to(x.dtype)

        layer.forward = forward
    return len(layers)
