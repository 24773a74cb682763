"""The loop that runs the steps: a Hugging Face `Trainer` set up from the config, with kbloop's callbacks.

Batches are grouped by length (little padding) unless the caller keeps its order; the loss is on answer tokens
through the fused output head (finetune.training.fused); bf16 where the hardware has it, fp32 on the CPU;
per-step progress and cancellation through `on_step` / `should_stop` (`StepInfo`); gloo for data-parallel runs
on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.training.config import TrainConfig
from finetune.training.data import CompletionCollator
from finetune.training.fused import answer_token_loss
from finetune.training.memory import trim_memory_callback


@dataclass(frozen=True)
class StepInfo:
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    eta_s: float | None


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


def build_trainer(config: TrainConfig, model, tokenizer, encoded: list[dict], checkpoints: Path, on_step, should_stop,
                   *, head_weight=None, epochs: float | None = None, in_order: bool = False, extra_callbacks=()):

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
        callbacks=[tracker.callback, *extra_callbacks] + ([] if on_cuda else [trim_memory_callback()]),
        compute_loss_func=functools.partial(answer_token_loss, head_weight=head_weight),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress is the caller's (on_step), not print()
    return trainer, tracker
