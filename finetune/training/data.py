"""Training data: examples with their retrieved passages, the held-out split, tokenisation and batching.

How one example becomes tokens (the defects of the LoRA guide's recipe, fixed):

    prompt     = tokenizer.apply_chat_template(system + user(passages, question), add_generation_prompt)
    completion = the answer + the end-of-turn token (<|im_end|>), as the template closes an assistant turn
    input_ids  = prompt ids + completion ids
    labels     = -100 for every prompt token, the completion ids otherwise (so <|im_end|> is learned)

Padding is masked by *position* (attention_mask 0, label -100 past each example's length), never by
token id, so a pad token that equals EOS can never hide the real end-of-turn token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.model.prompting import (
    ApprovedAnswer,
    PromptPassage,
    Turn,
    approved_in_prompt,
    build_messages,
    history_within,
    render_prompt,
    standalone_question,
)
from finetune.serving.retrieval import retrieve_passages
from finetune.serving.verified import related_examples
from finetune.training.config import MIN_TRAIN_EXAMPLES
from store import StoreError
from store.interactions import get_interaction, thread_interactions

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainingExample:
    question: str
    input: str
    answer: str
    passages: list[PromptPassage] = field(default_factory=list)
    approved: list[ApprovedAnswer] = field(default_factory=list)  # approved answers to related questions
    history: list[Turn] = field(default_factory=list)  # a follow-up's earlier turns in its Slack thread


def build_training_examples(db, examples: Sequence, *, k: int, team: str | None = None) -> list[TrainingExample]:
    """Store examples -> training examples carrying the passages retrieved for their question and the approved
    answers to related questions (never their own), as a question of `team` gets them (store.teams: the shared
    rows and the team's; None: shared only), so that an adapter never learns from another team's.

    Both lookups are the engine's own (finetune.serving.retrieval, finetune.serving.verified), so a prompt at training time
    has what the same question gets when it is asked.
    """
    n_approved = approved_in_prompt(k)
    out = []
    for ex in examples:
        # A correction made on a follow-up in a Slack thread trains with the thread's earlier turns, and
        # retrieves for the standalone question, as the engine answered it (finetune.model.prompting).
        history = _thread_turns(db, getattr(ex, "interaction_id", None))
        query = standalone_question(ex.question, history)
        passages = retrieve_passages(db, query, k=k, team=team) if k > 0 else []
        related = (related_examples(db, query, k=n_approved, exclude=frozenset({ex.id}), team=team)
                   if n_approved else [])
        out.append(TrainingExample(
            question=ex.question, input=ex.input or "", answer=ex.answer,
            passages=[PromptPassage(title=p.title, content=p.content) for p in passages],
            approved=[ApprovedAnswer(m.example.question, m.example.answer) for m in related],
            history=history,
        ))
    return out


def trained_conversation(ex: TrainingExample) -> list[dict]:
    """The conversation training learns from `ex`: the prompt the engine would build (build_messages) and the answer.
    Before the max-length cut (encode_example), which drops passages and earlier turns of an over-long prompt."""
    return [*build_messages(ex.question, input=ex.input, passages=ex.passages, approved=ex.approved,
                            history=ex.history), {"role": "assistant", "content": ex.answer}]


def as_trained_records(db, fmt: str, *, k: int, team: str | None = None) -> tuple[list[dict], int]:
    """`kbloop data export --as-trained`: the approved examples that train (store.examples.training_examples) as
    the prompts they train with, and how many were left out as flagged. `messages`: the whole conversation,
    system turn first (TRL's conversational format); `sft`: LLaMA-Factory's Alpaca columns with `system` and
    `history` (a follow-up's earlier turns as [question, answer] pairs)."""
    from store.examples import training_examples

    if fmt not in ("sft", "messages"):
        raise StoreError(f"--as-trained writes sft or messages records, not {fmt!r} (dpo and kto are written as "
                         "questions and answers only)")
    examples, withheld = training_examples(db, team=team)
    records = []
    for ex in build_training_examples(db, examples, k=k, team=team):
        conversation = trained_conversation(ex)
        if fmt == "messages":
            records.append({"messages": conversation})
            continue
        system, *turns, question, answer = conversation
        history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns), 2)]
        records.append({"system": system["content"], "instruction": question["content"], "input": "",
                        "output": answer["content"], "history": history})
    return records, len(withheld)


def _thread_turns(db, interaction_id: int | None) -> list[Turn]:
    """The turns before an interaction in its Slack thread (none outside a thread)."""
    if interaction_id is None:
        return []

    try:
        asked = get_interaction(db, interaction_id)
    except StoreError:
        return []
    if not asked.channel_id or not asked.thread_ts:
        return []
    return [Turn(i.question, i.answer) for i in thread_interactions(
        db, channel_id=asked.channel_id, thread_ts=asked.thread_ts, before_id=asked.id)]


def _unit_hash(question: str) -> float:
    digest = hashlib.sha256(" ".join(question.lower().split()).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_heldout(examples: Sequence, *, fraction: float = 0.1, min_train: int = 0) -> tuple[list, list]:
    """(train, heldout), deterministic by question hash: an example stays on its side as the data grows.

    With at least 5 examples the held-out side gets at least one. On a small set the hashes can hold out far more
    than `fraction` (3 of 10); the held-out side then gives examples back to training, highest hash first, until
    `min_train` train or one is left, so that 9 examples are enough to train on 8 and evaluate on 1. Only sets
    that small can see an example go from training to held-out as they grow.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), not {fraction}")
    keyed = [(_unit_hash(ex.question), i) for i, ex in enumerate(examples)]
    held_keys = sorted((h, i) for h, i in keyed if h < fraction)
    while len(held_keys) > 1 and len(examples) - len(held_keys) < min_train:
        held_keys.pop()
    held = {i for _, i in held_keys}
    if fraction > 0 and not held and len(examples) >= 5:
        held = {min(keyed)[1]}
    train = [ex for i, ex in enumerate(examples) if i not in held]
    heldout = [ex for i, ex in enumerate(examples) if i in held]
    return train, heldout


def split_for_training(examples: Sequence, *, fraction: float = 0.1) -> tuple[list, list]:
    """(train, heldout) for every training run: the registry's candidates (rank 0), the helper ranks of a
    multi-process job, and `kbloop train --data`. The one rule, so that every rank trains on the same list
    in the same order.

    An approved correction of a real answer (an example with an `interaction_id`) is exactly what the bot
    must learn: it always trains, after the rest, in the order given. The held-out side is drawn by
    question hash (`split_heldout`) from the rest only, so it stays stable as corrections arrive.
    """
    corrections = [ex for ex in examples if getattr(ex, "interaction_id", None) is not None]
    rest = [ex for ex in examples if getattr(ex, "interaction_id", None) is None]
    train, heldout = split_heldout(rest, fraction=fraction, min_train=MIN_TRAIN_EXAMPLES - len(corrections))
    return train + corrections, heldout


def save_training_examples(path: Path | str, examples: Sequence[TrainingExample]) -> None:
    """JSONL with the passages, for a training run in another process (torchrun, the job worker)."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")


def load_training_examples(path: Path | str) -> list[TrainingExample]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append(TrainingExample(question=d["question"], input=d.get("input", ""), answer=d["answer"],
                                           passages=[PromptPassage(**p) for p in d.get("passages", [])],
                                           approved=[ApprovedAnswer(**a) for a in d.get("approved", [])],
                                           history=[Turn(**t) for t in d.get("history", [])]))
    return out


# --- Tokenisation --------------------------------------------------------------------------------------


@dataclass
class TruncationReport:
    """What max_length cost: examples that lost passages, had their prompt cut, or their answer cut."""

    max_length: int
    examples: int = 0
    passages_dropped: int = 0  # examples that lost one or more retrieved passages
    prompts_cut: int = 0  # examples whose prompt was cut from the left even without passages
    answers_cut: int = 0  # answers longer than half of max_length (trained without their end-of-turn)

    @property
    def affected(self) -> int:
        return self.passages_dropped + self.prompts_cut + self.answers_cut

    def text(self) -> str:
        if not self.affected:
            return f"all {self.examples} examples fit in {self.max_length} tokens"
        parts = []
        if self.passages_dropped:
            parts.append(f"{self.passages_dropped} lost retrieved passages")
        if self.prompts_cut:
            parts.append(f"{self.prompts_cut} had their prompt cut from the start")
        if self.answers_cut:
            parts.append(f"{self.answers_cut} had their answer cut (too long to learn to stop)")
        return f"of {self.examples} examples longer than {self.max_length} tokens: " + "; ".join(parts)


def _completion_text(tokenizer, messages: list[dict], prompt: str, answer: str, eot_text: str) -> str:
    """The answer as the chat template closes an assistant turn, up to and including the end-of-turn token."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if full.startswith(prompt):
        completion = full[len(prompt):]
        cut = completion.find(eot_text)
        if cut >= 0:
            return completion[: cut + len(eot_text)]
    # Templates that rewrite earlier turns (e.g. reasoning markers): the answer followed by the turn's end.
    return answer + eot_text


def encode_example(tokenizer, ex: TrainingExample, *, max_length: int, eot_id: int,
                   report: TruncationReport | None = None) -> dict:
    """input_ids and labels for one example (prompt masked, answer and end-of-turn learned)."""
    eot_text = tokenizer.convert_ids_to_tokens(eot_id)
    passages = list(ex.passages)
    history = history_within(ex.history, tokenizer)  # bounded as the engine bounds it
    dropped = False
    while True:
        messages = build_messages(ex.question, input=ex.input, passages=passages, approved=ex.approved,
                                  history=history)
        prompt = render_prompt(tokenizer, messages)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion = _completion_text(tokenizer, messages, prompt, ex.answer, eot_text)
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(completion_ids) <= max_length or not passages:
            break
        # Too long: the least relevant passage goes first (retrieval returns them best first).
        passages.pop()
        dropped = True
    answer_cut = prompt_cut = False
    if len(completion_ids) > max_length // 2 and len(prompt_ids) + len(completion_ids) > max_length:
        completion_ids = completion_ids[: max(max_length // 2, max_length - len(prompt_ids))]
        answer_cut = True
    if len(prompt_ids) + len(completion_ids) > max_length:
        prompt_ids = prompt_ids[len(prompt_ids) + len(completion_ids) - max_length:]
        prompt_cut = True
    if report is not None:
        report.examples += 1
        report.passages_dropped += dropped
        report.prompts_cut += prompt_cut
        report.answers_cut += answer_cut
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids),
    }


def encode_examples(tokenizer, examples: Sequence[TrainingExample], *, max_length: int,
                    eot_id: int) -> tuple[list[dict], TruncationReport]:
    report = TruncationReport(max_length=max_length)
    encoded = [encode_example(tokenizer, ex, max_length=max_length, eot_id=eot_id, report=report) for ex in examples]
    return encoded, report


class CompletionCollator:
    """Pads a batch to its longest example (right padding), and gives the model no attention mask.

    None is needed: under causal attention a real token only sees the tokens before it, so padding at the
    end is invisible to it, and padding positions carry no label. Without a mask SDPA runs its causal kernel
    and handles grouped-query attention itself instead of copying keys and values to every head (-21 MB
    peak on the bench's 10M model; tests/finetune/test_fused.py checks the gradients are the same).

    It also marks the positions whose next token is a label (`logits_to_keep`, a (B, T) bool mask): the
    model then projects only those hidden states onto the vocabulary. The prompt is most of every sequence,
    so this skips most of the output head's work and memory (the logits of a 150k vocabulary are large).
    """

    def __init__(self, *, pad_id: int, pad_to_multiple_of: int | None = 8):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[row, :length] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(f["labels"], dtype=torch.long)
        keep = torch.zeros((n, longest), dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        return {"input_ids": input_ids, "labels": labels, "logits_to_keep": keep}
