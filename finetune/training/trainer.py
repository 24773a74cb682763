"""Supervised fine-tuning: LoRA, QLoRA or full, on chat-formatted question/answer examples.

    train_adapter(config, train_examples, out_dir)            # in-process
    torchrun --nproc_per_node 2 -m finetune.training.trainer \\
        --config cfg.json --data train.jsonl --out DIR        # the same code, data-parallel

Supports: QLoRA (4-bit NF4, double quantisation, bf16 compute, via bitsandbytes on CUDA or CPU; on a CPU whose
bf16 products are slower than fp32 it computes in fp32, and unpacks the frozen 4-bit weights once when they fit
in a sixteenth of the free memory: finetune.training.qlora), LoRA and full fine-tuning
(finetune.training.model_setup); loss on answer tokens only, the end-of-turn token learned
(finetune.training.data); batches grouped by length (little padding); the output head, the loss and LoRA dropout
fused (finetune.training.fused: no full logits, no dropout copies); gradient checkpointing compatible with PEFT
(non-reentrant, input grads enabled) and freed memory handed back to the OS after each micro-batch on the CPU
(finetune.training.memory); bf16 where the hardware has it; per-step callbacks, cancellation
(finetune.training.loop), checkpoints and resume (finetune.training.checkpoints); data-parallel training under
`torchrun` / `accelerate launch` (gloo on CPU, NCCL on GPUs).

Sizing (finetune.training.sizing): a run lasts `epochs`, but at least `min_steps` optimiser steps, and stops early
at the first check where `stop_reproduced` of the answers are reproduced exactly (`reproduced_examples`: one
teacher-forced forward pass, no generation). Checks run at epoch ends (or every `check_every_steps`) once the loss
is low. Continued training (`init_from`): the run starts from a previous adapter (loaded trainable, its own rank
and targets) or a previous full fine-tune's model folder instead of the bare base.

Assumptions: checkpoints hold the adapter (or model) and the optimiser state and are kept in
out_dir/checkpoints until training finishes; a finished run leaves only the final adapter and tokenizer in
out_dir. Nothing here registers or renames anything: the caller (finetune.registry.candidates) trains into a
temporary folder and renames it when evaluation is done, so an interrupted run leaves nothing usable.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune.model import loading
from finetune.training.checkpoints import CHECKPOINTS, checkpoint_step, disk_full_error, latest_checkpoint, save_final
from finetune.training.config import TrainConfig, resolve_config
from finetune.training.data import TrainingExample, TruncationReport, encode_examples, load_training_examples
from finetune.training.fused import fuse_output_head, unfuse_output_head
from finetune.training.general_text import general_text_items
from finetune.training.loop import StepInfo, build_trainer
from finetune.training.memory import choose_checkpointing
from finetune.training.model_setup import prepare_model
from finetune.training.qlora import keep_dequantized_when_it_fits, qlora_compute_dtype, set_qlora_compute_dtype
from finetune.training.recommend import profile_examples
from finetune.training.sizing import ReproductionStop, run_budget, spread, unique_examples


class TrainingCancelled(Exception):
    """should_stop() returned True: training stopped, nothing was written to out_dir except checkpoints."""


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
        encoded = spread(encoded, general) if in_order else encoded + general
        notes.append(f"{general_items} windows of general text mixed in, against forgetting")

    if config.gradient_checkpointing == "auto":
        mode, why = choose_checkpointing(config)
        config = replace(config, gradient_checkpointing=mode)
        notes.append(f"gradient checkpointing {'off' if mode is False else 'on'}: {why}")
    model = prepare_model(config, init_from=init_from)
    if config.method == "qlora":
        dtype, why = qlora_compute_dtype()
        set_qlora_compute_dtype(model, dtype)
        notes.append(f"QLoRA computes in {str(dtype).removeprefix('torch.')}: {why}")
        notes.append(keep_dequantized_when_it_fits(model, dtype))
    if init_from is not None:
        notes.append(f"continued from {Path(init_from).name}: its weights are the starting point")
    head_weight = fuse_output_head(model)  # the loss applies the head chunk by chunk: no full logits
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = out_dir / CHECKPOINTS
    resume_from = latest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        notes.append("no checkpoint to resume from: training from the start")
    budget = run_budget(config, len(encoded))
    if budget.note:
        notes.append(budget.note)
    stopper = None
    if config.stop_reproduced > 0:
        check = unique_examples(check_examples if check_examples is not None else train)
        stopper = ReproductionStop(
            model, head_weight, pad_id=tokenizer.pad_token_id, target=config.stop_reproduced,
            check=encode_examples(tokenizer, check, max_length=config.max_length, eot_id=eot_id)[0],
            new=encode_examples(tokenizer, unique_examples(new_examples), max_length=config.max_length, eot_id=eot_id)[0],
            every_steps=check_every_steps, retention=init_from is not None)
    trainer, tracker = build_trainer(config, model, tokenizer, encoded, checkpoints, on_step, should_stop,
                                      head_weight=head_weight, epochs=budget.epochs, in_order=in_order,
                                      extra_callbacks=[stopper.callback] if stopper else [])
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if stopper is not None and not stopper.stopped and not tracker.cancelled:
            stopper.final_check()  # what the whole budget achieved, for the notes
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(exc, checkpoints) from exc
        raise
    finally:
        unfuse_output_head(model)
    if tracker.cancelled:
        raise TrainingCancelled(f"training cancelled at step {trainer.state.global_step}")
    resumed_step = checkpoint_step(resume_from) if resume_from else None
    if resumed_step is not None:
        notes.append(f"resumed from the checkpoint at step {resumed_step}")

    save_final(trainer, tokenizer, out_dir, full=config.method == "full")
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


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.training.trainer --config C --data D --out O [--resume]`, also under torchrun."""
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
