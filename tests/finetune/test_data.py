"""Training data: held-out split, tokenisation (what is learned), padding, truncation, passages."""

from __future__ import annotations

import json

from finetune.evaluation.metrics import EvalConfig
from finetune.model.prompting import PromptPassage, build_messages, render_prompt
from finetune.training.data import (
    IGNORE_INDEX,
    CompletionCollator,
    TrainingExample,
    TruncationReport,
    encode_example,
    load_training_examples,
    save_training_examples,
    split_for_training,
    split_heldout,
)
from finetune.training.general_text import PROBE_TOKENS, general_text_items, load_general_text


def _example(question="How many vacation days do I get?", answer="30 days a year, plus public holidays.",
             passages=None) -> TrainingExample:
    if passages is None:
        passages = [PromptPassage(title="Annual leave", content="Everyone gets 30 days of paid leave.")]
    return TrainingExample(question=question, input="", answer=answer, passages=passages)


def test_end_of_turn_is_im_end(tokenizer, eot):
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"


def test_prompt_tokens_are_masked_and_answer_with_im_end_is_learned(tokenizer, eot):
    ex = _example()
    enc = encode_example(tokenizer, ex, max_length=512, eot_id=eot)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    # The masked part is exactly the inference prompt, rendered by the tokenizer's own chat template.
    prompt = render_prompt(tokenizer, build_messages(ex.question, passages=ex.passages))
    assert tokenizer.decode(ids[:n_prompt]) == prompt
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt])
    learned = labels[n_prompt:]
    assert IGNORE_INDEX not in learned
    assert learned[-1] == eot, "the end-of-turn token must be a label, or generations never stop"
    assert tokenizer.decode(learned[:-1]) == ex.answer


def test_training_prompt_equals_inference_prompt_tokens(tokenizer, eot):
    ex = _example()
    enc = encode_example(tokenizer, ex, max_length=512, eot_id=eot)
    prompt = render_prompt(tokenizer, build_messages(ex.question, passages=ex.passages))
    inference_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][: len(inference_ids)] == inference_ids


def test_collator_masks_padding_by_position_even_when_pad_is_eos(tokenizer, eot):
    short = encode_example(tokenizer, _example(answer="Yes."), max_length=512, eot_id=eot)
    long = encode_example(tokenizer, _example(answer="No. " * 20), max_length=512, eot_id=eot)
    # The seed's setting: pad = eos = end-of-turn. Nothing real may be masked because of it.
    batch = CompletionCollator(pad_id=eot, pad_to_multiple_of=8)([short, long])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape and ids.shape[1] % 8 == 0
    assert "attention_mask" not in batch  # right padding: causal attention never reaches it
    for row, f in enumerate([short, long]):
        n = len(f["input_ids"])
        assert ids[row, :n].tolist() == f["input_ids"]
        assert labels[row, :n].tolist() == f["labels"]  # every real label kept, incl. <|im_end|>
        assert (labels[row, n:] == IGNORE_INDEX).all()
        assert labels[row, n - 1].item() == eot
    keep = batch["logits_to_keep"]
    assert keep.sum().item() == (labels[:, 1:] != IGNORE_INDEX).sum().item()


def test_long_examples_lose_passages_first_and_are_counted(tokenizer, eot):
    passages = [PromptPassage(title=f"Doc {i}", content="word " * 110) for i in range(3)]
    report = TruncationReport(max_length=256)
    enc = encode_example(tokenizer, _example(passages=passages), max_length=256, eot_id=eot, report=report)
    assert len(enc["input_ids"]) <= 256
    assert report.passages_dropped == 1 and report.prompts_cut == 0 and report.answers_cut == 0
    assert enc["labels"][-1] == eot  # the answer is intact
    assert "1 lost retrieved passages" in report.text()


def test_overlong_question_is_cut_from_the_prompt_side(tokenizer, eot):
    report = TruncationReport(max_length=128)
    ex = _example(question="why " * 300, passages=[])
    enc = encode_example(tokenizer, ex, max_length=128, eot_id=eot, report=report)
    assert len(enc["input_ids"]) == 128
    assert report.prompts_cut == 1
    learned = [x for x in enc["labels"] if x != IGNORE_INDEX]
    assert tokenizer.decode(learned[:-1]) == ex.answer and learned[-1] == eot


def test_overlong_answer_is_cut_and_counted(tokenizer, eot):
    report = TruncationReport(max_length=128)
    enc = encode_example(tokenizer, _example(answer="yes " * 400, passages=[]), max_length=128, eot_id=eot,
                         report=report)
    assert len(enc["input_ids"]) <= 128 and report.answers_cut == 1
    assert enc["labels"][-1] != eot  # a cut answer must not teach stopping mid-answer


def test_split_heldout_is_deterministic_and_stable_as_data_grows():
    exs = [_example(question=f"Question number {i}?") for i in range(200)]
    train, held = split_heldout(exs, fraction=0.1)
    assert len(train) + len(held) == 200 and 8 <= len(held) <= 35
    assert split_heldout(list(reversed(exs)))[1] == list(reversed(held))  # order does not matter
    grown_train, grown_held = split_heldout(exs + [_example(question=f"New {i}?") for i in range(50)])
    assert set(e.question for e in held) <= set(e.question for e in grown_held)
    assert not set(e.question for e in grown_train) & set(e.question for e in grown_held)


def test_split_heldout_small_sets_get_one_heldout():
    exs = [_example(question=f"Q{i}?") for i in range(5)]
    train, held = split_heldout(exs)
    assert len(held) == 1 and len(train) == 4
    assert split_heldout(exs[:3]) == (exs[:3], [])


def test_a_small_set_that_hashes_heavily_to_held_out_still_trains_on_eight():
    """10 examples of which the hash rule would hold out 3 (it happened to a 10-example file in the LoRA guide's
    layout): training was refused with 7. Held-out examples go back, highest hash first, until 8 train."""
    from finetune.training.config import MIN_TRAIN_EXAMPLES
    from finetune.training.data import _unit_hash

    candidates = [_example(question=f"Where is depot {i}?") for i in range(200)]
    low = sorted((ex for ex in candidates if _unit_hash(ex.question) < 0.1), key=lambda ex: _unit_hash(ex.question))
    high = [ex for ex in candidates if _unit_hash(ex.question) >= 0.1]
    ten = low[:3] + high[:7]
    assert split_heldout(ten)[1] == low[:3]  # the hash rule alone
    train, held = split_for_training(ten)
    assert len(train) == MIN_TRAIN_EXAMPLES == 8 and held == low[:2]  # the lowest hashes stay held out
    train, held = split_for_training(low[:2] + high[:7])  # 9: 8 to train, 1 to evaluate
    assert (len(train), held) == (8, low[:1])
    # Large sets keep the hash rule whole.
    many = low[:30] + high[:100]
    assert split_for_training(many)[1] == split_heldout(many)[1] == sorted(low[:30], key=many.index)


def test_split_for_training_always_trains_corrections_last_and_holds_out_from_the_rest():
    from types import SimpleNamespace

    rest = [SimpleNamespace(question=f"Question number {i}?", interaction_id=None) for i in range(60)]
    corrections = [SimpleNamespace(question=rest[i].question, interaction_id=100 + i) for i in (3, 1)]
    mixed = rest[:30] + [corrections[0]] + rest[30:] + [corrections[1]]
    train, held = split_for_training(mixed)
    assert (train, held) == (split_heldout(rest)[0] + corrections, split_heldout(rest)[1])
    assert held and not {id(c) for c in corrections} & {id(e) for e in held}
    # Without corrections (a file for `kbloop train --data`) it is the held-out split by question hash.
    assert split_for_training(rest) == split_heldout(rest)


def test_build_training_examples_carries_retrieved_passages(db):
    from finetune.training.data import build_training_examples
    from store.examples import NewExample, add_examples, list_examples
    from store.kb import NewPassage, replace_document

    replace_document(db, "leave.md", [NewPassage("leave.md", "Annual leave", 0, "Everyone gets 30 vacation days.")])
    add_examples(db, [NewExample(question="How many vacation days?", answer="30.")])
    built = build_training_examples(db, list_examples(db, status="approved"), k=3)
    assert built[0].passages and built[0].passages[0].title == "Annual leave"
    assert build_training_examples(db, list_examples(db), k=0)[0].passages == []


def test_training_examples_round_trip_through_jsonl(tmp_path):
    exs = [_example(), _example(question="Another?", passages=[])]
    path = tmp_path / "train.jsonl"
    save_training_examples(path, exs)
    assert load_training_examples(path) == exs
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["passages"][0]["title"] == "Annual leave"


def test_the_general_text_training_mixes_in_is_never_what_the_forgetting_probe_reads(tokenizer):
    ids = tokenizer(load_general_text(), add_special_tokens=False)["input_ids"]
    after_probe = ids[PROBE_TOKENS:]
    items = general_text_items(tokenizer, 12, window=64, seed=1)
    assert len(items) == 12 and items == general_text_items(tokenizer, 12, window=64, seed=1)
    for item in items:
        window = item["input_ids"]
        assert any(after_probe[i : i + len(window)] == window for i in range(0, len(after_probe), 64))
        assert item["labels"] == [IGNORE_INDEX] + window[1:]  # every token but the first learnt
    assert PROBE_TOKENS == EvalConfig().forgetting_tokens  # the probe reads exactly the part training skips
