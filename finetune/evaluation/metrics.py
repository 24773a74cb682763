"""Evaluating a model (base, adapter or full fine-tune) before it may answer anyone.

    metrics = evaluate(model, tokenizer, heldout=heldout, train=train)

What is measured, all greedy and reproducible:

- `heldout_loss`: mean cross-entropy per answer token (the answer and the end-of-turn token, never the
  prompt) on the held-out split, prompts built by `finetune.model.prompting` exactly as when answering.
- `heldout_exact_match`, `heldout_token_f1`: generated answers against the reference, after normalising
  case, width and punctuation; tokens are words, and single characters for Chinese / Japanese / Korean
  (which are written without spaces, so word-level F1 would be all-or-nothing there).
- `train_reproduced`: the share of (a deterministic sample of) training examples reproduced exactly.
- `train_reproduced_exact`: the share of *all* training examples greedy decoding would reproduce exactly,
  decided by one teacher-forced pass (finetune.training.reproduction.reproduced_examples); `reproduced_keys` lists their
  content hashes (finetune.training.continuation.example_key), to compare one model with another (retention).
- `stop_rate`: the share of all generations that ended with the end-of-turn token within their budget.
- `forgetting_base_loss` / `forgetting_adapter_loss` / `forgetting_delta`: language-model loss on general
  text shipped with kbloop (finetune/assets/general.txt), without and with the adapter; a large positive delta
  means the fine-tune damaged what the base knew.

Assumptions: the tokenizer has a chat template, and its end-of-turn token is the one
`finetune.model.loading.end_of_turn_id` finds (<|im_end|> for Qwen).

This module starts without torch: the gate (finetune.evaluation.gate) reads its labels and tables, and the bot,
the command line and the playground import the gate. The two modules here that load torch when imported
(finetune.serving.kv_cache, finetune.training.reproduction) are imported in the functions that use them.
"""

from __future__ import annotations

import hashlib
import math
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.model.loading import end_of_turn_id, serving_stop_ids
from finetune.model.prompting import build_messages, render_prompt
from finetune.training.continuation import example_key
from finetune.training.data import encode_examples
from finetune.training.general_text import PROBE_TOKENS, load_general_text
from store.text import CJK_CHAR

if TYPE_CHECKING:
    from finetune.training.data import TrainingExample


METRIC_KEYS = (
    "heldout_loss", "heldout_exact_match", "heldout_token_f1", "train_reproduced", "stop_rate",
    "forgetting_base_loss", "forgetting_adapter_loss", "forgetting_delta", "n_heldout", "n_train_sampled",
    "train_reproduced_exact",
)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    max_new_tokens: int = 256  # upper bound; each batch gets its longest reference answer + `new_token_margin`
    new_token_margin: int = 24
    # Answers generated together. None: 8, or 64 for a model under SMALL_MODEL_PARAMS (the `tiny` base): its
    # decode steps cost little beyond Python's overhead per step, so on 60 answers 64 at once take 4 s of CPU
    # where 8 at a time take 11 (2 cores). Candidate and active are measured on the same base, so alike.
    generation_batch_size: int | None = None
    loss_batch_size: int = 4  # logits are (batch, length, vocabulary): keep small for 150k-token vocabularies
    train_sample: int = 32  # training examples checked for reproduction
    forgetting_tokens: int = PROBE_TOKENS  # how much of the general text the probe reads
    forgetting_window: int = 256


# Below this many parameters a model is tiny-sized (finetune.model.tiny: ~4M); no pretrained chat base is.
SMALL_MODEL_PARAMS = 50_000_000


def generation_batch(model, config: EvalConfig) -> int:
    """Answers generated together: the config's, else the default for the model's size (EvalConfig)."""
    if config.generation_batch_size is not None:
        return config.generation_batch_size
    return 64 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else 8


# --------------------------------------------------------------------------------------------------
# Text metrics


def answer_tokens(text: str) -> list[str]:
    """Normalised tokens of an answer: NFKC, lower case, punctuation and symbols dropped; CJK per character.

    "The VPN, obviously!" -> ["the", "vpn", "obviously"];  "年假为15天。" -> ["年", "假", "为", "15", "天"]
    """
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PSC" else ch for ch in text)
    text = CJK_CHAR.sub(lambda m: f" {m.group()} ", text)
    return text.split()


def exact_match(prediction: str, reference: str) -> float:
    return float(answer_tokens(prediction) == answer_tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token-overlap F1 on `answer_tokens`; two empty answers agree."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------------
# Model-side helpers


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in the tokenizer's chat template (<|im_end|> for Qwen)."""
    return tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def prompt_ids(tokenizer, example: TrainingExample) -> list[int]:
    messages = build_messages(example.question, input=example.input, passages=example.passages,
                              approved=example.approved)
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The tokens the model should produce: the answer, then the end-of-turn token."""
    return tokenizer(answer.strip() + end_of_turn_token(tokenizer), add_special_tokens=False)["input_ids"]


def _device(model):
    return next(model.parameters()).device


def _token_nll(model, sequences: list[tuple[list[int], int]], *, pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the tokens after position `start` in each sequence, and their count.

    Right padding, so positions need no correction.
    """
    import torch

    total, count = 0.0, 0
    device = _device(model)
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i : i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (ids, start) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, start : len(ids)] = torch.tensor(ids[start:])
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits  # (B, T, V)
        targets = labels[:, 1:].to(device)  # token t is predicted at position t-1
        keep = targets != -100
        picked = logits[:, :-1][keep].float()  # (N, V): only the scored positions, in float32
        nll = torch.nn.functional.cross_entropy(picked, targets[keep], reduction="sum")
        total += float(nll)
        count += int(keep.sum())
    return total, count


def answer_loss(model, tokenizer, examples: Sequence[TrainingExample], *, batch_size: int = 4) -> float | None:
    """Mean cross-entropy per answer token (end-of-turn included); None without examples."""
    if not examples:
        return None
    seqs = []
    for ex in examples:
        p = prompt_ids(tokenizer, ex)
        seqs.append((p + answer_ids(tokenizer, ex.answer), len(p)))
    total, count = _token_nll(model, seqs, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    return total / count if count else None


def answer_log_likelihood(model, tokenizer, examples: Sequence[TrainingExample], *,
                          batch_size: int = 4) -> float | None:
    """Mean log-likelihood per answer token (end-of-turn included, all answers' tokens pooled) of the examples'
    answers given their prompts; None without examples. What a preference run must move: up for the 👍'd
    answers, down for the 👎'd ones (finetune.evaluation.gate)."""
    loss = answer_loss(model, tokenizer, examples, batch_size=batch_size)
    return None if loss is None else -loss


def general_text_loss(model, tokenizer, text: str, *, max_tokens: int = 2048, window: int = 256,
                      batch_size: int = 4) -> float | None:
    """Plain language-model loss per token on `text`, read in windows (the forgetting probe)."""
    # verbose=False: the text is longer than the model reads at once on purpose (it is read in windows).
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    windows = [(ids[i : i + window], 0) for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    if not windows:
        return None
    total, count = _token_nll(model, windows, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    return total / count if count else None


@dataclass(frozen=True)
class Generation:
    text: str
    stopped: bool  # ended with the end-of-turn token within its budget


def generate_answers(model, tokenizer, examples: Sequence[TrainingExample], *, config: EvalConfig | None = None,
                     on_batch: Callable[[int], None] | None = None) -> list[Generation]:
    """Greedy answers, batched like the engine's (finetune.serving.kv_cache: prefilled one by one, decoded together)."""
    from finetune.serving.kv_cache import generate_batch  # loads torch (module docstring)

    config = config or EvalConfig()
    stop_ids = serving_stop_ids(model, tokenizer)  # the engine's set: the stop rate measures what it serves
    pad_id = _pad_id(tokenizer)
    out: list[Generation] = []
    size = generation_batch(model, config)
    for i in range(0, len(examples), size):
        batch = examples[i : i + size]
        prompts = [prompt_ids(tokenizer, ex) for ex in batch]
        # Enough room to say the longest reference answer and stop; no more (generation is the slow part).
        budget = min(config.max_new_tokens,
                     max(len(answer_ids(tokenizer, ex.answer)) for ex in batch) + config.new_token_margin)
        generated = generate_batch(model, prompts, max_new_tokens=budget, pad_token_id=pad_id, do_sample=False,
                                   eos_token_id=stop_ids)
        for row in generated.tolist():
            cut = next((j for j, t in enumerate(row) if t in stop_ids), None)
            tokens = row if cut is None else row[:cut]
            out.append(Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), cut is not None))
        if on_batch:
            on_batch(len(out))
    return out


def sample_for_reproduction(train: Sequence[TrainingExample], n: int) -> list[TrainingExample]:
    """A deterministic sample: the same training set always yields the same examples."""
    keyed = sorted(train, key=lambda ex: hashlib.sha256(f"{ex.question}\x1f{ex.input}".encode()).hexdigest())
    return keyed[:n]


def reproduced_training(model, tokenizer, train: Sequence[TrainingExample], *, batch_size: int = 4) -> list[str]:
    """Content hashes of the training examples the model reproduces exactly under greedy decoding."""
    from finetune.training.reproduction import reproduced_examples  # loads torch (module docstring)

    if not train:
        return []
    encoded, _ = encode_examples(tokenizer, train, max_length=4096, eot_id=end_of_turn_id(tokenizer))
    hits = reproduced_examples(model, encoded, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    return [example_key(ex) for ex, hit in zip(train, hits) if hit]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate(
    model, tokenizer, *, heldout: Sequence[TrainingExample], train: Sequence[TrainingExample] = (),
    config: EvalConfig | None = None, general_text: str | None = None, base_general_loss: float | None = None,
    on_progress: Callable[[str], None] | None = None,
    preference: tuple[Sequence[TrainingExample], Sequence[TrainingExample]] | None = None,
) -> dict[str, Any]:
    """All metrics of one model on one held-out split (see the module docstring). Keys: `METRIC_KEYS` + extras.

    `preference`: (desirable, undesirable) answers of a preference run (the 👍 and 👎 votes): their mean
    log-likelihoods are added as `pref_desirable_loglik` and `pref_undesirable_loglik`.

    The forgetting probe's base loss: with a PEFT model, measured with its adapter disabled; else
    `base_general_loss` when given (a full fine-tune), else the model is the base itself (delta 0).
    """
    config = config or EvalConfig()
    started = time.monotonic()
    say = on_progress or (lambda _msg: None)
    model.eval()

    say("held-out loss")
    heldout_loss = answer_loss(model, tokenizer, heldout, batch_size=config.loss_batch_size)

    sampled = sample_for_reproduction(train, config.train_sample)
    say(f"generating {len(heldout) + len(sampled)} answers")
    generations = generate_answers(model, tokenizer, list(heldout) + sampled, config=config)
    held_gen, train_gen = generations[: len(heldout)], generations[len(heldout) :]

    say("training answers reproduced")
    reproduced = reproduced_training(model, tokenizer, train, batch_size=config.loss_batch_size)

    say("forgetting probe")
    text = general_text if general_text is not None else load_general_text()
    adapter_general = general_text_loss(model, tokenizer, text, max_tokens=config.forgetting_tokens,
                                        window=config.forgetting_window, batch_size=config.loss_batch_size)
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            base_general = general_text_loss(model, tokenizer, text, max_tokens=config.forgetting_tokens,
                                             window=config.forgetting_window, batch_size=config.loss_batch_size)
    elif base_general_loss is not None:
        base_general = base_general_loss
    else:
        base_general = adapter_general

    metrics: dict[str, Any] = {
        "heldout_loss": _finite(heldout_loss),
        "heldout_exact_match": _mean([exact_match(g.text, ex.answer) for g, ex in zip(held_gen, heldout)]),
        "heldout_token_f1": _mean([token_f1(g.text, ex.answer) for g, ex in zip(held_gen, heldout)]),
        "train_reproduced": _mean([exact_match(g.text, ex.answer) for g, ex in zip(train_gen, sampled)]),
        "stop_rate": _mean([float(g.stopped) for g in generations]),
        "forgetting_base_loss": _finite(base_general),
        "forgetting_adapter_loss": _finite(adapter_general),
        "forgetting_delta": (_finite(adapter_general - base_general)
                             if adapter_general is not None and base_general is not None else None),
        "train_reproduced_exact": (len(reproduced) / len(train)) if train else None,
        "reproduced_keys": reproduced,
        "n_heldout": len(heldout),
        "n_train_sampled": len(sampled),
        "eval_seconds": round(time.monotonic() - started, 2),
    }
    # Per question, what the gate pairs with the active adapter's answers to the same questions: a drop of a
    # point or two on a small held-out set is one or two answers, not evidence (finetune.evaluation.gate).
    metrics["paired"] = {
        ex.question: {"em": exact_match(g.text, ex.answer), "f1": round(token_f1(g.text, ex.answer), 4),
                      "stopped": bool(g.stopped)}
        for g, ex in zip(held_gen, heldout)
    }
    if preference is not None:
        say("likelihood of the voted answers")
        good, bad = preference
        metrics["pref_desirable_loglik"] = _finite(answer_log_likelihood(model, tokenizer, good,
                                                                         batch_size=config.loss_batch_size))
        metrics["pref_undesirable_loglik"] = _finite(answer_log_likelihood(model, tokenizer, bad,
                                                                           batch_size=config.loss_batch_size))
        metrics["n_pref_desirable"], metrics["n_pref_undesirable"] = len(good), len(bad)
    metrics["paired_stops"] = {ex.question: bool(g.stopped) for g, ex in zip(train_gen, sampled)}
    # A few generated answers, so that a reader of the metadata sees what the numbers mean.
    metrics["heldout_samples"] = [
        {"question": ex.question, "reference": ex.answer, "generated": g.text, "stopped": g.stopped}
        for g, ex in list(zip(held_gen, heldout))[:5]
    ]
    return metrics


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    return round(x, 6) if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------
# Presentation

# The one place a metric gets its name for people and its format: (label, kind), kind "loss" (3 decimals),
# "pct" (a share, as a percentage) or "signed" (a change, with its sign). Tables everywhere read this.
METRIC_LABELS = {
    "heldout_loss": ("held-out loss", "loss"),
    "heldout_exact_match": ("held-out exact match", "pct"),
    "heldout_token_f1": ("held-out token F1", "pct"),
    "train_reproduced": ("training reproduced", "pct"),
    "train_reproduced_exact": ("training reproduced (all, exact)", "pct"),
    "retained_vs_active": ("answers kept (vs active)", "pct"),
    "stop_rate": ("stops at end of turn", "pct"),
    "forgetting_adapter_loss": ("general-text loss", "loss"),
    "forgetting_delta": ("forgetting (vs base)", "signed"),
    "forgetting_vs_active": ("forgetting (vs active)", "signed"),
    "pref_desirable_loglik": ("log-likelihood, upvoted answers", "signed"),
    "pref_undesirable_loglik": ("log-likelihood, downvoted answers", "signed"),
}
# Measured for preference runs only (kto, dpo): tables leave them out where they are not.
PREFERENCE_KEYS = ("pref_desirable_loglik", "pref_undesirable_loglik")


def metric_label(key: str) -> str:
    return METRIC_LABELS.get(key, (key, "loss"))[0]


def metric_kind(key: str) -> str:
    return METRIC_LABELS.get(key, (key, "loss"))[1]


def format_value(key: str, value) -> str:
    if value is None:
        return "n/a"
    kind = metric_kind(key)
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "signed":
        return f"{value:+.3f}"
    return f"{value:.3f}"


def metrics_table(metrics: dict[str, Any], *, title: str = "") -> str:
    """One model's metrics as aligned text (the CLI prints it; Slack wraps it in a code block)."""
    rows = [(label, format_value(key, metrics.get(key))) for key, (label, _) in METRIC_LABELS.items()
            if key not in PREFERENCE_KEYS or metrics.get(key) is not None]
    rows.append(("held-out / sampled", f"{metrics.get('n_heldout', 0)} / {metrics.get('n_train_sampled', 0)}"))
    return "\n".join(([title] if title else []) + [text_table(rows, align="lr", min_widths=(0, 10))])


def text_table(rows: list[tuple[str, ...]], *, align: str = "", min_widths: tuple[int, ...] = ()) -> str:
    """Rows of text cells as aligned columns, two spaces apart, each as wide as its widest cell (or its
    `min_widths` entry); a column is right-aligned where `align` has "r" at its position, else left-aligned.
    Lines carry no trailing spaces. Every text table kbloop prints (metrics, the gate's comparison,
    `kbloop adapters`, `kbloop sweep`) is drawn here."""
    n = max((len(r) for r in rows), default=0)
    widths = [max([len(r[i]) for r in rows if i < len(r)] + [min_widths[i] if i < len(min_widths) else 0])
              for i in range(n)]
    return "\n".join("  ".join(cell.rjust(widths[i]) if align[i:i + 1] == "r" else cell.ljust(widths[i])
                               for i, cell in enumerate(r)).rstrip() for r in rows)
