"""Supervised fine-tuning: LoRA, QLoRA or full, on chat-formatted question/answer examples.

    train_adapter(config, train_examples, out_dir)            # in-process
    torchrun --nproc_per_node 2 -m finetune.training.trainer \\
        --config cfg.json --data train.jsonl --out DIR        # the same code, data-parallel

Supports: QLoRA (4-bit NF4, double quantisation, bf16 compute, via bitsandbytes on CUDA or CPU; on a CPU whose
bf16 products are slower than fp32 it computes in fp32, and unpacks the frozen 4-bit weights once when they fit
in a sixteenth of the free memory: `qlora_compute_dtype`, `keep_dequantized_weights`), LoRA and
full fine-tuning; loss on answer tokens only, the end-of-turn token learned (finetune.training.data); batches
grouped by length (little padding); the output head, the loss and LoRA dropout fused (finetune.training.fused: no
full logits, no dropout copies); gradient checkpointing compatible with PEFT (non-reentrant, input
grads enabled); freed memory handed back to the OS after each micro-batch on the CPU; bf16 where the
hardware has it; per-step callbacks, cancellation, checkpoints and resume;
data-parallel training under `torchrun` / `accelerate launch` (gloo on CPU, NCCL on GPUs).

Sizing: a run lasts `epochs`, but at least `min_steps` optimiser steps, and stops early at the first check
where `stop_reproduced` of the answers are reproduced exactly (`reproduced_examples`: one teacher-forced
forward pass, no generation). Checks run at epoch ends (or every `check_every_steps`) once the loss is low.
Continued training (`init_from`): the run starts from a previous adapter (loaded trainable, its own rank and
targets) or a previous full fine-tune's model folder instead of the bare base.

Assumptions: checkpoints hold the adapter (or model) and the optimiser state and are kept in
out_dir/checkpoints until training finishes; a finished run leaves only the final adapter and tokenizer in
out_dir. Nothing here registers or renames anything: the caller (finetune.registry.candidates) trains into a
temporary folder and renames it when evaluation is done, so an interrupted run leaves nothing usable.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune.evaluation.reproduction import reproduced_examples
from finetune.training.config import ALL_LINEAR, TrainConfig, resolve_config
from finetune.training.data import CompletionCollator, TrainingExample, TruncationReport, encode_examples
from finetune.training.fused import answer_token_loss, fuse_lora_dropout, fuse_output_head, unfuse_output_head
from store import StoreError

CHECKPOINTS = "checkpoints"


class TrainingCancelled(Exception):
    """should_stop() returned True: training stopped, nothing was written to out_dir except checkpoints."""


@dataclass(frozen=True)
class StepInfo:
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    eta_s: float | None


@dataclass
class TrainOutcome:
    out_dir: Path
    config: TrainConfig  # the resolved config: what was actually used
    notes: list[str]  # defaults applied and why, truncation, resume
    method: str
    n_examples: int
    steps: int
    epochs: float
    final_loss: float | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    runtime_s: float = 0.0
    truncation: TruncationReport | None = None
    resumed_from_step: int | None = None
    trainable_params: int = 0
    total_params: int = 0
    # The last reproduction check (None when none ran): share of the checked answers reproduced exactly.
    reproduced: float | None = None
    stopped_early: bool = False  # stopped at a check, before the end of its step budget
    budget_steps: int = 0  # the steps the run was sized for


def train_adapter(
    config: TrainConfig,
    train: Sequence[TrainingExample],
    out_dir: Path,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    init_from: Path | None = None,
    check_examples: Sequence[TrainingExample] | None = None,
    new_examples: Sequence[TrainingExample] = (),
    check_every_steps: int | None = None,
    general_items: int = 0,
    in_order: bool = False,
) -> TrainOutcome:
    """Train on `train` and write a PEFT adapter folder (or, for method "full", a model folder) into out_dir.

    `config.base` is an HF id or a model folder (resolve `tiny` first with finetune.model.loading.resolve_base).
    `init_from`: a previous adapter folder (or full model folder, method "full") to continue from.
    The stop check (`config.stop_reproduced` > 0) measures `check_examples` (default: `train`, each once);
    `new_examples` must all be reproduced too, and are checked first (cheap) before the whole set. When
    continuing (`init_from`), the share counted is of the check answers the starting weights reproduced
    (retention), not of all of them.
    `general_items`: windows of general text (finetune/assets/general.txt, after the part the forgetting probe
    reads) mixed into the data with every token learnt, against forgetting the base's language.
    `in_order`: read `train` in the order given (a continued run's rounds, each already mixed), instead of
    batching examples of similar length together: that would put every copy of a new example into a few
    consecutive batches, which then pull the model away from the earlier answers.
    Raises store.StoreError for bad input (too few examples, unknown base, rank too large, disk full) and
    TrainingCancelled when should_stop() says so.
    """
    from finetune.model import loading
    from finetune.training.recommend import profile_examples

    started = time.monotonic()
    out_dir = Path(out_dir)
    tiny = loading.is_tiny_base(config.base)
    config, notes = resolve_config(config, tiny=tiny, n_examples=len(train),
                                   profile=profile_examples(train) if config.rank == "auto" else None)
    tokenizer = loading.load_tokenizer(config.base)
    eot_id = loading.end_of_turn_id(tokenizer)
    encoded, truncation = encode_examples(tokenizer, train, max_length=config.max_length, eot_id=eot_id)
    if truncation.affected:
        notes.append(truncation.text())
    if general_items:
        general = general_text_items(tokenizer, general_items, seed=config.seed)
        encoded = _spread(encoded, general) if in_order else encoded + general
        notes.append(f"{general_items} windows of general text mixed in, against forgetting")

    if config.gradient_checkpointing == "auto":
        mode, why = choose_checkpointing(config)
        config = replace(config, gradient_checkpointing=mode)
        notes.append(f"gradient checkpointing {'off' if mode is False else 'on'}: {why}")
    model = _prepare_model(config, init_from=init_from)
    if config.method == "qlora":
        dtype, why = qlora_compute_dtype()
        set_qlora_compute_dtype(model, dtype)
        notes.append(f"QLoRA computes in {str(dtype).removeprefix('torch.')}: {why}")
        notes.append(_keep_dequantized(model, dtype))
    if init_from is not None:
        notes.append(f"continued from {Path(init_from).name}: its weights are the starting point")
    head_weight = fuse_output_head(model)  # the loss applies the head chunk by chunk: no full logits
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = out_dir / CHECKPOINTS
    resume_from = _latest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        notes.append("no checkpoint to resume from: training from the start")
    budget = run_budget(config, len(encoded))
    if budget.note:
        notes.append(budget.note)
    stopper = None
    if config.stop_reproduced > 0:
        check = _unique(check_examples if check_examples is not None else train)
        stopper = _ReproductionStop(
            model, head_weight, pad_id=tokenizer.pad_token_id, target=config.stop_reproduced,
            check=encode_examples(tokenizer, check, max_length=config.max_length, eot_id=eot_id)[0],
            new=encode_examples(tokenizer, _unique(new_examples), max_length=config.max_length, eot_id=eot_id)[0],
            every_steps=check_every_steps, retention=init_from is not None)
    trainer, tracker = _build_trainer(config, model, tokenizer, encoded, checkpoints, on_step, should_stop,
                                      head_weight=head_weight, epochs=budget.epochs, in_order=in_order,
                                      extra_callbacks=[stopper.callback] if stopper else [])
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if stopper is not None and not stopper.stopped and not tracker.cancelled:
            stopper.final_check()  # what the whole budget achieved, for the notes
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_error(exc, checkpoints) from exc
        raise
    finally:
        unfuse_output_head(model)
    if tracker.cancelled:
        raise TrainingCancelled(f"training cancelled at step {trainer.state.global_step}")
    resumed_step = _checkpoint_step(resume_from) if resume_from else None
    if resumed_step is not None:
        notes.append(f"resumed from the checkpoint at step {resumed_step}")

    _save_final(trainer, tokenizer, out_dir, full=config.method == "full")
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        shutil.rmtree(checkpoints, ignore_errors=True)
    losses = tracker.losses
    if stopper is not None:
        notes.append(stopper.summary(steps=trainer.state.global_step, budget=budget.steps))
    return TrainOutcome(
        out_dir=out_dir, config=config, notes=notes, method=config.method, n_examples=len(train),
        steps=trainer.state.global_step, epochs=float(trainer.state.epoch or 0.0),
        final_loss=losses[-1][1] if losses else None, losses=losses, runtime_s=time.monotonic() - started,
        truncation=truncation, resumed_from_step=resumed_step, trainable_params=trainable, total_params=total,
        reproduced=stopper.last_share if stopper else None, stopped_early=bool(stopper and stopper.stopped),
        budget_steps=budget.steps,
    )


# --- Sizing the run and stopping when the answers are reproduced -----------------------------------------


@dataclass(frozen=True)
class RunBudget:
    epochs: float
    steps: int
    note: str  # why the epochs differ from the config's, or ""


def run_budget(config: TrainConfig, n_encoded: int, *, world: int | None = None) -> RunBudget:
    """The run's length: `config.epochs`, raised to reach `config.min_steps` optimiser steps on small sets."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, math.ceil(n_encoded / (config.batch_size * config.grad_accum * world)))
    epochs = config.epochs
    note = ""
    if config.min_steps and per_epoch * epochs < config.min_steps:
        epochs = math.ceil(config.min_steps / per_epoch)
        note = (f"{n_encoded} examples make {per_epoch} step{'s' if per_epoch > 1 else ''} per epoch: "
                f"{config.epochs:g} epochs would be {math.ceil(per_epoch * config.epochs)} steps, fewer than the "
                f"minimum {config.min_steps}; training up to {epochs:g} epochs ({per_epoch * epochs} steps)")
    return RunBudget(epochs=float(epochs), steps=max(1, math.ceil(per_epoch * epochs)), note=note)


def general_text_items(tokenizer, n: int, *, window: int = 128, seed: int = 42) -> list[dict]:
    """n training items of plain general text (every token but the first learnt), drawn with replacement from
    the windows of finetune/assets/general.txt that come after the part the forgetting probe reads, so that
    the probe still measures text the model was not trained on."""
    import random

    from finetune.evaluation.metrics import EvalConfig, load_general_text
    from finetune.training.data import IGNORE_INDEX

    ids = tokenizer(load_general_text(), add_special_tokens=False)["input_ids"][EvalConfig().forgetting_tokens:]
    windows = [ids[i : i + window] for i in range(0, len(ids) - window // 2, window)]
    if not windows:
        return []
    rng = random.Random(seed)
    picked = [rng.choice(windows) for _ in range(n)]
    return [{"input_ids": list(w), "labels": [IGNORE_INDEX] + list(w[1:])} for w in picked]


def _spread(items: list, extra: list) -> list:
    """`items` with `extra` inserted at even intervals (in-order runs meet them throughout, not at the end)."""
    if not extra:
        return list(items)
    out, every = [], len(items) / len(extra)
    for i, item in enumerate(extra):
        out += items[round(i * every) : round((i + 1) * every)] + [item]
    return out


def _unique(examples: Sequence[TrainingExample]) -> list[TrainingExample]:
    seen, out = set(), []
    for ex in examples:
        key = (ex.question, ex.input, ex.answer)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


class _ReproductionStop:
    """Trainer callback: at each epoch end (or every `every_steps`), once the loss is low, check which answers
    are reproduced; stop when all `new` ones and `target` of `check` are.

    The new examples (a continued run's) are checked first, alone: until they are learnt, the whole set
    need not be read.
    """

    LOSS_TO_CHECK = 0.5  # mean training loss since the last check; above it, answers cannot all be exact yet

    def __init__(self, model, head_weight, *, pad_id: int, target: float, check: list[dict], new: list[dict],
                 every_steps: int | None, retention: bool = False):
        from transformers import TrainerCallback

        self.model, self.head_weight, self.pad_id = model, head_weight, pad_id
        self.target, self.check, self.new, self.every_steps = target, check, new, every_steps
        self.last_share: float | None = None
        self.new_learnt: float | None = None  # share of the new answers reproduced at the final check
        self.checks = 0
        self.check_s = 0.0
        self.stopped = False
        self._losses: list[float] = []
        # Continuing: which check answers the starting weights reproduce; the share is of those kept.
        self.retention = retention
        self.baseline: list[bool] | None = None
        stop = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if stop.retention and stop.baseline is None:
                    stop.baseline = stop._hits(stop.check)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    stop._losses.append(float(logs["loss"]))

            def on_step_end(self, args, state, control, **kw):
                if stop.every_steps and state.global_step % stop.every_steps == 0 \
                        and state.global_step < state.max_steps:
                    stop._maybe_stop(control)

            def on_epoch_end(self, args, state, control, **kw):
                if not stop.every_steps and state.global_step < state.max_steps:
                    stop._maybe_stop(control)

        self.callback = Callback()

    def _maybe_stop(self, control) -> None:
        losses, self._losses = self._losses, []
        if not losses or sum(losses) / len(losses) > self.LOSS_TO_CHECK:
            return
        t0 = time.monotonic()
        self.checks += 1
        try:
            if self.new and not all(reproduced_examples(self.model, self.new, pad_id=self.pad_id,
                                                        head_weight=self.head_weight)):
                return
            self.last_share = self._share(self._hits(self.check))
            if self.last_share >= self.target:
                self.stopped = control.should_training_stop = True
        finally:
            self.check_s += time.monotonic() - t0

    def final_check(self) -> None:
        t0 = time.monotonic()
        self.last_share = self._share(self._hits(self.check))
        if self.new:
            self.new_learnt = sum(self._hits(self.new)) / len(self.new)
        self.checks += 1
        self.check_s += time.monotonic() - t0

    def _hits(self, encoded: list[dict]) -> list[bool]:
        return reproduced_examples(self.model, encoded, pad_id=self.pad_id, head_weight=self.head_weight)

    def _share(self, hits: list[bool]) -> float:
        if self.baseline is not None:
            kept = [h for h, b in zip(hits, self.baseline) if b]
            return sum(kept) / len(kept) if kept else 1.0
        return sum(hits) / len(hits) if hits else 1.0

    def summary(self, *, steps: int, budget: int) -> str:
        share = "n/a" if self.last_share is None else f"{100 * self.last_share:.1f}%"
        if self.baseline is not None:
            what = (f"{share} of the {sum(self.baseline)} earlier answers the starting weights reproduced "
                    f"still reproduced")
        else:
            what = f"{share} of the {len(self.check)} training answers reproduced exactly"
        if self.new:
            learnt = "all" if self.stopped else ("n/a" if self.new_learnt is None else f"{100 * self.new_learnt:.0f}%")
            what += f", {learnt} of the {len(self.new)} new ones learnt"
        how = f"target {100 * self.target:.0f}%; {self.checks} checks, {self.check_s:.0f} s"
        if self.stopped:
            return f"stopped at step {steps} of {budget}: {what} ({how})"
        return f"trained the whole budget ({steps} steps): at the end {what} ({how})"


# --- Model -----------------------------------------------------------------------------------------------


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
    import psutil
    import torch
    from transformers import AutoConfig

    from finetune.model import loading

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


def _keep_dequantized(model, dtype) -> str:
    """On the CPU, when the base's 4-bit weights unpacked take at most 1/16 of the free memory, unpack them once
    for the run (`keep_dequantized_weights`) instead of in every forward and backward pass. Returns the note."""
    import psutil
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


def _prepare_model(config: TrainConfig, *, init_from: Path | None = None):
    """Load the base for the method, wrap it in LoRA where asked, and set up gradient checkpointing.

    `init_from`: full fine-tuning loads that model folder instead of the base; LoRA / QLoRA load that adapter,
    trainable, with its own rank, alpha and targets."""
    from finetune.model import loading

    quantize = config.method == "qlora"
    full_from = init_from is not None and config.method == "full"
    model = loading.load_base_model(str(init_from) if full_from else config.base, quantize=quantize)
    model.config.use_cache = False  # the KV cache is for generation; with checkpointing it only wastes memory
    gc_kwargs = {"use_reentrant": False}  # reentrant checkpointing loses gradients of frozen-input LoRA layers
    whole_layers = config.gradient_checkpointing is True
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=whole_layers, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif whole_layers:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    if config.gradient_checkpointing == "mlp":
        _checkpoint_feed_forward(model)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model

    if init_from is not None:
        from peft import PeftModel

        if whole_layers and not quantize:
            model.enable_input_require_grads()
        model = PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
        fuse_lora_dropout(model)
        return model

    from peft import LoraConfig, get_peft_model

    targets = _target_modules(model, config.targets)
    smallest = min(features for _, features in targets.values())
    if config.rank > smallest:
        raise StoreError(
            f"rank {config.rank} is larger than the smallest targeted layer of {config.base} ({smallest} features); "
            f"choose a rank of at most {smallest}"
        )
    if whole_layers and not quantize:
        # Frozen embeddings produce inputs without grad; checkpointed blocks then need this to backprop.
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=sorted(targets),
        bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    fuse_lora_dropout(model)  # same dropout, without PEFT's extra copies and slow CPU masks
    return model


def _checkpoint_feed_forward(model) -> None:
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


def _target_modules(model, targets) -> dict[str, tuple[str, int]]:
    """Leaf names of the linear layers to adapt -> (an example module, min(in, out) features)."""
    import torch

    linear_types = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except Exception:  # bitsandbytes absent or without a backend: plain linear layers only
        pass
    output_head = model.get_output_embeddings()
    found: dict[str, tuple[str, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, linear_types) or module is output_head:
            continue
        leaf = name.rsplit(".", 1)[-1]
        size = min(module.in_features, module.out_features)
        if leaf in found:
            size = min(size, found[leaf][1])
        found[leaf] = (name, size)
    if targets in (None, ALL_LINEAR):
        if not found:
            raise StoreError(f"{model.config._name_or_path}: no linear layers to adapt")
        return found
    missing = [t for t in targets if t not in found]
    if missing:
        raise StoreError(
            f"target module(s) {', '.join(missing)} not in the model; it has: {', '.join(sorted(found))}"
        )
    return {t: found[t] for t in targets}


# --- Trainer ---------------------------------------------------------------------------------------------


class _Tracker:
    """Trainer callback: per-step loss to on_step, ETA, and cancellation through should_stop."""

    def __init__(self, on_step, should_stop):
        from transformers import TrainerCallback

        tracker = self
        self.on_step, self.should_stop = on_step, should_stop
        self.losses: list[tuple[int, float]] = []
        self.cancelled = False
        self._t0: float | None = None
        self._step0 = 0

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                tracker._t0, tracker._step0 = time.monotonic(), state.global_step

            def on_log(self, args, state, control, logs=None, **kw):
                if not logs or "loss" not in logs or not state.is_world_process_zero:
                    return
                loss = float(logs["loss"])
                tracker.losses.append((state.global_step, loss))
                done = state.global_step - tracker._step0
                eta = None
                if done > 0 and tracker._t0 is not None:
                    eta = (time.monotonic() - tracker._t0) / done * max(state.max_steps - state.global_step, 0)
                if tracker.on_step is not None:
                    tracker.on_step(StepInfo(step=state.global_step, total_steps=state.max_steps,
                                             epoch=float(state.epoch or 0.0), loss=loss,
                                             learning_rate=logs.get("learning_rate"), eta_s=eta))

            def on_step_end(self, args, state, control, **kw):
                if tracker.should_stop is not None and tracker.should_stop():
                    tracker.cancelled = True
                    control.should_training_stop = True
                    control.should_save = False

        self.callback = Callback()


def _trim_memory_callback():
    """Trainer callback (CPU): hand the memory freed by each micro-batch back to the OS.

    Batches grouped by length have a different shape every step, and glibc keeps the freed blocks of one
    shape in fragments that the next shape cannot reuse: on the 10M bench model the peak was 119 MB lower
    with this (1,116 vs 997 MB over 80 micro-batches, docs/benchmarks.md), at no measurable cost in time.
    """
    import ctypes
    import ctypes.util

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


def _build_trainer(config: TrainConfig, model, tokenizer, encoded: list[dict], checkpoints: Path, on_step, should_stop,
                   *, head_weight=None, epochs: float | None = None, in_order: bool = False, extra_callbacks=()):
    import functools

    import torch
    from transformers import Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    epochs = epochs if epochs is not None else config.epochs
    steps_per_epoch = max(1, math.ceil(len(encoded) / (config.batch_size * config.grad_accum * world)))
    total_steps = max(1, math.ceil(steps_per_epoch * epochs))
    save_steps = config.save_steps or max(1, total_steps // 5)
    on_cuda = torch.cuda.is_available()
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,  # a float < 1 is a fraction of the steps (transformers 5)
        # bf16 on GPUs that have it; fp16 on older GPUs; fp32 on the CPU (never fp16 there).
        bf16=bf16,
        fp16=on_cuda and not bf16,
        # batches of similar length: little padding (see train_adapter for `in_order`)
        train_sampling_strategy="sequential" if in_order else "group_by_length",
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_backend=None if on_cuda or world == 1 else "gloo",
        ddp_find_unused_parameters=False if world > 1 else None,
        use_cpu=not on_cuda,
    )
    tracker = _Tracker(on_step, should_stop)
    trainer = Trainer(
        model=model, args=args, train_dataset=encoded, processing_class=tokenizer,
        data_collator=CompletionCollator(pad_id=tokenizer.pad_token_id),
        callbacks=[tracker.callback, *extra_callbacks] + ([] if on_cuda else [_trim_memory_callback()]),
        compute_loss_func=functools.partial(answer_token_loss, head_weight=head_weight),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress is the caller's (on_step), not print()
    return trainer, tracker


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    if not checkpoints.is_dir():
        return None
    found = [p for p in checkpoints.glob("checkpoint-*") if _checkpoint_step(p) is not None
             and (p / "trainer_state.json").exists()]
    return max(found, key=_checkpoint_step) if found else None


def _checkpoint_step(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _disk_error(exc: OSError, where: Path) -> StoreError:
    return StoreError(f"disk full while writing {where}: free some space and train again (nothing was registered)")


def _save_final(trainer, tokenizer, out_dir: Path, *, full: bool) -> None:
    """Write the adapter (or model) and tokenizer: into a sibling folder first, then moved into out_dir."""
    if not trainer.is_world_process_zero():
        return
    staging = out_dir / ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, out_dir / item.name)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            for name in os.listdir(out_dir):
                if name != CHECKPOINTS:
                    target = out_dir / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            raise _disk_error(exc, out_dir) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not full:
        _check_adapter_folder(out_dir)


def _check_adapter_folder(out_dir: Path) -> None:
    cfg = json.loads((out_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("modules_to_save"):
        raise StoreError(f"{out_dir}: the adapter would carry modules_to_save, which vLLM cannot load")


# --- Command line (torchrun / accelerate launch) ---------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.training.trainer --config C --data D --out O [--resume]`, also under torchrun."""
    import argparse

    from finetune.training.data import load_training_examples

    parser = argparse.ArgumentParser(prog="python -m finetune.training.trainer", description=main.__doc__)
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    parser.add_argument("--data", required=True, help="JSONL of training examples (finetune.training.data.save_training_examples)")
    parser.add_argument("--out", required=True, help="output folder for the adapter")
    parser.add_argument("--resume", action="store_true")
    a = parser.parse_args(argv)
    raw = json.loads(Path(a.config).read_text(encoding="utf-8"))
    if isinstance(raw.get("targets"), list):
        raw["targets"] = tuple(raw["targets"])
    outcome = train_adapter(TrainConfig(**raw), load_training_examples(a.data), Path(a.out), resume=a.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": outcome.steps, "final_loss": outcome.final_loss, "out_dir": str(outcome.out_dir),
                          "world_size": int(os.environ.get("WORLD_SIZE", "1"))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
