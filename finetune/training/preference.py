"""Votes that train (issue 20): KTO on the employees' 👍 / 👎, DPO on (correction, replaced answer) pairs.

    data = preference_data(db, "kto", k_passages=0)          # the votes, as training prompts
    outcome = train_preference(config, data, out_dir, init_from=Path(active.path), method=active.method)

The losses are TRL's (`KTOTrainer`, `DPOTrainer`, imported from `trl` itself, pinned `trl>=1.16,<2`), not
written here. What is ours:

- **the data**: `store.preferences.voted_answers` chooses the votes (the selection `kbloop data export --format
  kto` writes): latest vote per user, none on an answer a curator rejected, none whose text the secrets scan
  flags; a 👎's correction is a desirable answer too. DPO reads approved corrections with the answer they
  replaced (`store.preferences.correction_pairs`, the selection of `--format dpo`).
- **the prompts**: every vote becomes a `TrainingExample` through `finetune.training.data.build_training_examples`
  (the passages retrieved for its question, a follow-up's thread turns) and is encoded by `encode_example`
  (the tokenizer's chat template through `finetune.model.prompting`, passages dropped first when too long,
  the answer closed by the end-of-turn token): the prompt the engine answers with. TRL gets that prompt and
  that completion as text and tokenises them again (it checks that the prompt is a prefix).
- **the start**: a preference run continues an adapter (the active one by default): a LoRA / QLoRA adapter
  loaded trainable, or a full fine-tune's model folder. The reference model is that starting point: a frozen
  copy of the full model, or, for an adapter, TRL's frozen "ref" copy of it (deleted before saving, so the
  folder holds one adapter, as vLLM wants).

Assumptions: one process (no torchrun); the tokenizer's chat template closes an assistant turn with one
special token (<|im_end|>), which TRL treats as the end of the completion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from finetune.model import loading
from finetune.model.loading import load_base_model
from finetune.training.config import TrainConfig
from finetune.training.data import IGNORE_INDEX, TrainingExample, build_training_examples, encode_example
from finetune.training.trainer import StepInfo, TrainingCancelled, TrainOutcome
from store import StoreError
from store.preferences import correction_pairs, voted_answers

PREFERENCE_OBJECTIVES = ("kto", "dpo")
# TRL's default strength of the pull towards the reference model (both papers use 0.1).
BETA = 0.1
# A KTO batch needs at least two rows (its KL estimate pairs each prompt with another row's answer).
MIN_VOTES = 4


def kto_batch_size(rows: int, wanted: int) -> int:
    """The batch for KTO: `wanted` (at most `rows`, at least 2), made smaller, or else larger, where it would
    leave one row alone in an epoch's last batch: TRL builds the KL estimate's mismatched pairs by giving each
    row the next row's answer within the batch, so a row alone is paired with its own answer."""
    batch = max(2, min(wanted, rows))
    return next(b for b in [*range(batch, 1, -1), *range(batch + 1, rows + 1)] if rows % b != 1)

# The run's defaults. `tiny` (random weights, full fine-tuning) needs larger steps than a pretrained base;
# a real base continues a LoRA adapter with a rate between SFT's 2e-4 and TRL's full-model 1e-6.
# Measured in docs/benchmarks.md ("Votes that train"); `--epochs`, `--lr`, `--batch` override.
TINY_PREFERENCE = dict(learning_rate=5e-5, epochs=4.0, batch_size=8, grad_accum=1, warmup=0.0, max_length=512)
SEED_PREFERENCE = dict(learning_rate=5e-5, epochs=2.0, batch_size=4, grad_accum=1, warmup=0.1, max_length=1024)


@dataclass
class PreferenceData:
    """What a preference run learns from, as training prompts."""

    objective: str
    # kto: (the prompt with the voted answer as its answer, desirable?)
    labelled: list[tuple[TrainingExample, bool]] = field(default_factory=list)
    # dpo: (the prompt with the correction as its answer, the answer it replaced)
    pairs: list[tuple[TrainingExample, str]] = field(default_factory=list)
    left_out: int = 0  # votes (or pairs) the selection left out: flagged by the scan, or rejected by a curator

    @property
    def desirable(self) -> list[TrainingExample]:
        """The answers the run should make likelier (👍 and corrections; DPO's chosen)."""
        if self.objective == "dpo":
            return [ex for ex, _ in self.pairs]
        return [ex for ex, good in self.labelled if good]

    @property
    def undesirable(self) -> list[TrainingExample]:
        """The answers it should make less likely (👎; DPO's rejected)."""
        if self.objective == "dpo":
            return [replace(ex, answer=bad) for ex, bad in self.pairs]
        return [ex for ex, good in self.labelled if not good]

    def __len__(self) -> int:
        return len(self.pairs) if self.objective == "dpo" else len(self.labelled)

    def describe(self) -> str:
        left = f"; {self.left_out} left out (flagged by the secrets scan or rejected by a curator)" if self.left_out else ""
        if self.objective == "dpo":
            return f"{len(self.pairs)} (correction, replaced answer) pairs{left}"
        return f"{len(self.desirable)} desirable answers (👍 and corrections), {len(self.undesirable)} 👎{left}"


def preference_data(db, objective: str, *, k_passages: int, team: str | None = None) -> PreferenceData:
    """The votes (kto) or correction pairs (dpo) that may train the adapter of `team` (shared and the team's; None:
    the shared adapter, shared only), built into prompts with `k_passages` passages.
    StoreError (one line, saying what to do) when there is nothing to train on."""
    if objective == "kto":
        votes, left_out = voted_answers(db, corrections=True, team=team)
        if len(votes) < MIN_VOTES or all(v.desirable for v in votes) or not any(v.desirable for v in votes):
            raise StoreError(
                f"KTO needs at least {MIN_VOTES} votes with both 👍 and 👎 among them; there are "
                f"{sum(v.desirable for v in votes)} desirable and {sum(not v.desirable for v in votes)} undesirable"
                + (f" ({left_out} left out: flagged by the secrets scan or rejected by a curator)" if left_out else ""))
        rows = [SimpleNamespace(id=v.example_id, question=v.question, input="", answer=v.answer,
                                interaction_id=v.interaction_id) for v in votes]
        built = build_training_examples(db, rows, k=k_passages, team=team)
        return PreferenceData("kto", labelled=[(ex, v.desirable) for ex, v in zip(built, votes)], left_out=left_out)
    if objective == "dpo":
        pairs, left_out = correction_pairs(db, team=team)
        if not pairs:
            raise StoreError("no correction pairs to train DPO on: approve 👎 corrections in review first "
                             "(`kbloop review`, the playground), or train on the votes with --objective kto"
                             + (f" ({left_out} left out: flagged by the secrets scan)" if left_out else ""))
        built = build_training_examples(db, pairs, k=k_passages, team=team)
        return PreferenceData("dpo", pairs=[(ex, p.rejected_answer) for ex, p in zip(built, pairs)],
                              left_out=left_out)
    raise StoreError(f"objective must be kto or dpo for a preference run, not {objective!r}")


def resolve_preference_config(config: TrainConfig, *, tiny: bool) -> tuple[TrainConfig, list[str]]:
    """The run's settings: the config's where given, else the preference defaults for the base."""
    defaults = TINY_PREFERENCE if tiny else SEED_PREFERENCE
    updates = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    notes = [f"{config.objective} defaults{' (tiny)' if tiny else ''}: " + ", ".join(f"{k}={v:g}" for k, v in
                                                                                     updates.items())] if updates else []
    return replace(config, **updates), notes


# --- Data as TRL reads it -----------------------------------------------------------------------------------


def _prompt_and_completion(tokenizer, ex: TrainingExample, *, max_length: int, eot_id: int) -> tuple[str, str]:
    """The training prompt and completion of `ex` as text, exactly as SFT encodes them (encode_example)."""
    encoded = encode_example(tokenizer, ex, max_length=max_length, eot_id=eot_id)
    cut = sum(1 for label in encoded["labels"] if label == IGNORE_INDEX)
    ids = encoded["input_ids"]
    return (tokenizer.decode(ids[:cut], skip_special_tokens=False),
            tokenizer.decode(ids[cut:], skip_special_tokens=False))


def kto_rows(tokenizer, labelled: Sequence[tuple[TrainingExample, bool]], *, max_length: int,
             eot_id: int) -> list[dict]:
    """TRL's unpaired preference format: prompt, completion, label."""
    rows = []
    for ex, good in labelled:
        prompt, completion = _prompt_and_completion(tokenizer, ex, max_length=max_length, eot_id=eot_id)
        rows.append({"prompt": prompt, "completion": completion, "label": bool(good)})
    return rows


def dpo_rows(tokenizer, pairs: Sequence[tuple[TrainingExample, str]], *, max_length: int, eot_id: int) -> list[dict]:
    """TRL's paired preference format: prompt, chosen, rejected (one prompt: the one the longer answer fits with)."""
    rows = []
    for ex, rejected in pairs:
        longer = ex if len(ex.answer) >= len(rejected) else replace(ex, answer=rejected)
        prompt, _ = _prompt_and_completion(tokenizer, longer, max_length=max_length, eot_id=eot_id)
        chosen = _prompt_and_completion(tokenizer, ex, max_length=max_length, eot_id=eot_id)[1]
        bad = _prompt_and_completion(tokenizer, replace(ex, answer=rejected), max_length=max_length, eot_id=eot_id)[1]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": bad})
    return rows


# --- Training -----------------------------------------------------------------------------------------------


def _load_policy(base: str, init_from: Path, method: str):
    """The starting weights, trainable: a full fine-tune's folder, or the base with the adapter loaded trainable."""
    if method == "full":
        model = load_base_model(str(init_from))
        for p in model.parameters():
            p.requires_grad = True
        return model
    from peft import PeftModel

    model = load_base_model(base, quantize=method == "qlora")
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(model, str(init_from), is_trainable=True)


def _callback(on_step, should_stop, state: dict):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            state["t0"] = time.monotonic()

        def on_log(self, args, st, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            state["losses"].append((st.global_step, loss))
            eta = None
            if st.global_step and state.get("t0") is not None:
                eta = (time.monotonic() - state["t0"]) / st.global_step * max(st.max_steps - st.global_step, 0)
            if on_step is not None:
                on_step(StepInfo(step=st.global_step, total_steps=st.max_steps, epoch=float(st.epoch or 0.0),
                                 loss=loss, learning_rate=logs.get("learning_rate"), eta_s=eta))

        def on_step_end(self, args, st, control, **kw):
            if should_stop is not None and should_stop():
                state["cancelled"] = True
                control.should_training_stop = True

    return Progress()


def train_preference(config: TrainConfig, data: PreferenceData, out_dir: Path, *, init_from: Path, method: str,
                     on_step: Callable[[StepInfo], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> TrainOutcome:
    """Continue the adapter (or full model) at `init_from` with TRL's KTO or DPO trainer on `data`; write the
    result (one PEFT adapter, or a model folder for method "full") and its tokenizer into `out_dir`.

    `config.base` is the resolved base (a folder or HF id); `config.objective` is "kto" or "dpo". Raises
    TrainingCancelled when should_stop() says so, StoreError for data TRL cannot train on."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    started = time.monotonic()
    out_dir = Path(out_dir)
    tiny = loading.is_tiny_base(config.base)
    config, notes = resolve_preference_config(config, tiny=tiny)
    config = replace(config, method=method)
    source = init_from if (Path(init_from) / "tokenizer_config.json").exists() else config.base
    tokenizer = loading.load_tokenizer(str(source))
    eot_id = loading.end_of_turn_id(tokenizer)
    # TRL ends every completion with the tokenizer's EOS; ours already end with the end-of-turn token, which
    # must be what it sees as EOS (it is for Qwen's instruct models and tiny), or it would add a second.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eot_id)
    if data.objective == "kto":
        rows = kto_rows(tokenizer, data.labelled, max_length=config.max_length, eot_id=eot_id)
    else:
        rows = dpo_rows(tokenizer, data.pairs, max_length=config.max_length, eot_id=eot_id)
    notes.append(f"{data.objective} on {data.describe()}, beta {BETA}, continuing {Path(init_from).name}")

    model = _load_policy(config.base, Path(init_from), method)
    on_cuda = torch.cuda.is_available()
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    batch = (kto_batch_size(len(rows), config.batch_size) if data.objective == "kto"
             else max(2, min(config.batch_size, len(rows))))
    if batch != config.batch_size and len(rows) > config.batch_size:
        notes.append(f"batch {batch}, not {config.batch_size}: {len(rows)} rows would leave one alone in the last batch")
    common = dict(
        output_dir=str(out_dir / "trl"), num_train_epochs=config.epochs, per_device_train_batch_size=batch,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.learning_rate,
        lr_scheduler_type="linear", warmup_steps=config.warmup, weight_decay=config.weight_decay,
        max_length=config.max_length, beta=BETA, bf16=bf16, fp16=on_cuda and not bf16, use_cpu=not on_cuda,
        gradient_checkpointing=config.gradient_checkpointing is True, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=config.seed, data_seed=config.seed, dataloader_num_workers=0,
    )
    dataset = Dataset.from_list(rows)
    from datasets.utils import logging as datasets_logging

    bars = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # TRL's dataset preparation: five bars for a few rows; progress is on_step's
    try:
        # A frozen copy of the starting point is the reference (TRL copies an adapter itself, as "ref").
        ref_model = loading.load_base_model(str(init_from)) if method == "full" else None
        if data.objective == "kto":
            trainer = KTOTrainer(model=model, ref_model=ref_model, args=KTOConfig(**common), train_dataset=dataset,
                                 processing_class=tokenizer)
        else:
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**common), train_dataset=dataset,
                                 processing_class=tokenizer)
    finally:
        if bars:
            datasets_logging.enable_progress_bar()
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    state: dict = {"losses": [], "cancelled": False}
    trainer.add_callback(_callback(on_step, should_stop, state))
    trainer.train()
    if state["cancelled"]:
        raise TrainingCancelled(f"training cancelled at step {trainer.state.global_step}")

    trained = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(trained, "peft_config") and "ref" in trained.peft_config:
        trained.delete_adapter("ref")  # TRL's frozen reference copy: not part of the result
    out_dir.mkdir(parents=True, exist_ok=True)
    trained.save_pretrained(out_dir, safe_serialization=True)
    loading.load_tokenizer(str(source)).save_pretrained(out_dir)  # as loaded: without the EOS set above
    import shutil

    shutil.rmtree(out_dir / "trl", ignore_errors=True)
    losses = state["losses"]
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trained.parameters())
    return TrainOutcome(
        out_dir=out_dir, config=config, notes=notes, method=method, n_examples=len(rows),
        steps=trainer.state.global_step, epochs=float(trainer.state.epoch or 0.0),
        final_loss=losses[-1][1] if losses else None, losses=losses, runtime_s=time.monotonic() - started,
        trainable_params=trainable, total_params=total, budget_steps=trainer.state.max_steps,
    )
