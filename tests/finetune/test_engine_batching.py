"""Continuous batching (finetune.serving.scheduler, kv_cache.RunningBatch) on the real tiny base: every answer is,
token for token, what greedy generation gives its prompt alone, however rows join, stop and leave.

The random tiny base repeats one token per prompt; a LoRA adapter with random weights (registry_fixtures)
says different tokens at different steps, so a stop token can end rows at different steps.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch

from finetune.model.prompting import PromptPassage, build_messages, render_prompt
from finetune.serving.kv_cache import RunningBatch
from finetune.serving.scheduler import BackendClosed, BatchScheduler, GenerationRequest, ModelChoice
from tests.conftest import SAMPLES
from tests.finetune.registry_fixtures import make_lora_adapter

NEW_TOKENS = 16
KB = [PromptPassage(p.stem, p.read_text(encoding="utf-8")) for p in sorted((SAMPLES / "kb").glob("*.md"))]
QUESTIONS = [
    ("VPN?", []),
    ("How many days of parental leave do new parents get, and who approves it?",
     [PromptPassage("Leave policy", "Parents get 30 days of paid leave. Your manager approves the request.")]),
    ("Tell me everything the handbook says.", KB[:9]),
    ("报销需要哪些发票？", [PromptPassage("报销制度", "报销需要提供正规发票和审批单，三十天内提交。")]),
    ("What does the handbook say, in short?", KB[:3]),
]


@pytest.fixture(scope="module")
def models(tiny_path, tmp_path_factory):
    """{"base": the tiny base, "lora": the base with a random LoRA adapter}, each its own model."""
    from peft import PeftModel

    from finetune.model.loading import load_base_model

    adapter = make_lora_adapter(tiny_path, tmp_path_factory.mktemp("lora") / "a", seed=3)
    return {"base": load_base_model(tiny_path).eval(),
            "lora": PeftModel.from_pretrained(load_base_model(tiny_path), str(adapter)).eval()}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    out = [tokenizer(render_prompt(tokenizer, build_messages(q, passages=ps)), add_special_tokens=False).input_ids
           for q, ps in QUESTIONS]
    assert max(map(len, out)) > 8 * min(map(len, out))  # very different lengths
    return out


_REFERENCES: dict = {}


def alone(model, prompt: list[int], *, stop: set[int]) -> list[int]:
    """The reference: greedy generate() on the prompt alone, no padding, transformers' own cache (each
    model, prompt and stop set generated once per run)."""
    key = (id(model), tuple(prompt), tuple(sorted(stop)))
    if key not in _REFERENCES:
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=sorted(stop) or None, pad_token_id=0)
        _REFERENCES[key] = out[0, len(prompt):].tolist()
    return _REFERENCES[key]


@pytest.fixture(scope="module")
def stop(models, prompts) -> set[int]:
    """One or two stop tokens that end the adapter's rows at different steps and leave at least one row
    running to NEW_TOKENS (chosen from what each prompt generates alone without stopping)."""
    import itertools

    free = [alone(models["lora"], p, stop=set()) for p in prompts]

    def steps(tokens):
        return [min((i for i, t in enumerate(row) if t in tokens), default=None) for row in free]

    def score(tokens):
        s = steps(tokens)
        return None in s, len({x for x in s if x is not None})

    candidates = sorted({t for row in free for t in row})
    best = max([{t} for t in candidates] + [set(p) for p in itertools.combinations(candidates, 2)], key=score)
    assert score(best) >= (True, 2), free
    return best


def scheduler(models, tokenizer, stop, **kw) -> BatchScheduler:
    config = dict(max_new_tokens=NEW_TOKENS, time_limit_s=600.0, max_batch_size=8) | kw
    s = BatchScheduler(select_model=lambda version: ModelChoice(models[version], version),
                       resolve=lambda adapter: adapter, tokenizer=tokenizer, stop_ids=sorted(stop), **config)
    s.start()
    return s


def request(prompt: list[int], adapter: str = "lora", on_text=None) -> GenerationRequest:
    return GenerationRequest(adapter, lambda version: (prompt, None), on_text=on_text)


def test_rows_of_very_different_lengths_stop_at_their_own_steps_as_alone(models, tokenizer, prompts, stop):
    expected = [alone(models["lora"], p, stop=stop) for p in prompts]
    assert len({len(e) for e in expected}) >= 3 and max(map(len, expected)) == NEW_TOKENS  # some hit the limit
    s = scheduler(models, tokenizer, stop)
    try:
        pieces: list[list[str]] = [[] for _ in prompts]
        futures = [s.submit(request(p, on_text=pieces[i].append)) for i, p in enumerate(prompts)]
        got = [f.result(timeout=300) for f in futures]
    finally:
        s.close(timeout=60)
    assert [list(g.tokens) for g in got] == expected
    assert s.batches_run == 1 and s.largest_batch == len(prompts)  # one running batch, decoded together
    for g, p in zip(got, pieces):
        assert g.adapter_version == "lora" and g.notices == ()
        assert "".join(p) == g.text  # streaming lost nothing and added nothing


def test_questions_that_join_while_others_decode_answer_as_alone(models, tokenizer, prompts, stop):
    """Two rows start; when the first streams its first text, a longer prompt (the cache widens to the left)
    and a short one (right-aligned) are submitted: they join the batch at its next step."""
    short, medium, long, chinese, _ = prompts
    expected = {name: alone(models["lora"], p, stop=stop)
                for name, p in (("short", short), ("medium", medium), ("long", long), ("chinese", chinese))}
    s = scheduler(models, tokenizer, stop)
    late: list[Future] = []

    def first_text(piece: str) -> None:  # runs on the scheduler's thread, between two decode steps
        if not late:
            late.extend([s.submit(request(long)), s.submit(request(chinese))])

    try:
        early = [s.submit(request(short, on_text=first_text)), s.submit(request(medium))]
        got = [f.result(timeout=300) for f in early]
        assert late, "the first row streamed no text"
        got += [f.result(timeout=300) for f in late]
    finally:
        s.close(timeout=60)
    assert [list(g.tokens) for g in got] == [expected[n] for n in ("short", "medium", "long", "chinese")]
    assert s.joined_running == 2 and s.batches_run == 1


def test_a_request_for_another_version_waits_for_the_batch_to_drain(models, tokenizer, prompts, stop):
    """First come, first served: the base request waits for the adapter's batch to drain, and the adapter
    request behind it waits for the base one."""
    s = scheduler(models, tokenizer, stop)
    try:
        futures = [s.submit(request(prompts[0], "lora")), s.submit(request(prompts[1], "base")),
                   s.submit(request(prompts[3], "lora"))]
        got = [f.result(timeout=300) for f in futures]
    finally:
        s.close(timeout=60)
    assert [g.adapter_version for g in got] == ["lora", "base", "lora"]
    assert [list(g.tokens) for g in got] == [alone(models[v], p, stop=stop) for v, p in
                                            (("lora", prompts[0]), ("base", prompts[1]), ("lora", prompts[3]))]
    assert s.batches_run == 3 and s.largest_batch == 1


def test_the_time_limit_ends_each_answer_on_its_own(models, tokenizer, prompts, stop):
    s = scheduler(models, tokenizer, stop, time_limit_s=0.0)  # every row is past its limit after one step
    try:
        got = [f.result(timeout=300) for f in [s.submit(request(p)) for p in prompts]]
    finally:
        s.close(timeout=60)
    assert [list(g.tokens) for g in got] == [alone(models["lora"], p, stop=stop)[:1] for p in prompts]


def test_a_failing_request_or_batch_never_leaves_a_caller_waiting(models, tokenizer, prompts, stop):
    vocab = models["base"].config.vocab_size
    s = scheduler(models, tokenizer, stop)
    try:
        # A prompt that cannot be built fails its own request only.
        broken = GenerationRequest("lora", lambda version: (_ for _ in ()).throw(ValueError("no prompt")))
        fine = s.submit(request(prompts[0]))
        with pytest.raises(ValueError, match="no prompt"):
            s.submit(broken).result(timeout=300)
        assert list(fine.result(timeout=300).tokens) == alone(models["lora"], prompts[0], stop=stop)
        # A token the model does not have fails the decode step: every row of that batch hears of it...
        gate = threading.Event()
        doomed = [s.submit(request(prompts[1], on_text=lambda piece: gate.set())),
                  s.submit(request(prompts[0][:-1] + [vocab + 5]))]
        for f in doomed:
            with pytest.raises(IndexError):
                f.result(timeout=300)
        # A version no model can serve fails that request only...
        with pytest.raises(KeyError):
            s.submit(request(prompts[1], adapter="missing")).result(timeout=300)
        # ... and the next questions are answered as usual.
        after = s.submit(request(prompts[3]))
        assert list(after.result(timeout=300).tokens) == alone(models["lora"], prompts[3], stop=stop)
    finally:
        s.close(timeout=60)


def test_requests_never_started_are_handed_back_on_close(models, tokenizer, prompts, stop):
    s = BatchScheduler(select_model=lambda version: ModelChoice(models[version], version), resolve=lambda a: a,
                       tokenizer=tokenizer, stop_ids=sorted(stop), max_new_tokens=4, time_limit_s=60,
                       max_batch_size=4)  # not started
    waiting = request(prompts[0])
    s.submit(waiting)
    assert s.close(timeout=1) == [waiting] and not waiting.future.done()
    with pytest.raises(BackendClosed):  # a request that comes after close() is refused, not left waiting
        s.submit(request(prompts[1]))


def test_the_cache_shrinks_to_the_longest_row_left(models, prompts):
    batch = RunningBatch(models["base"], reserve=4)
    rows = [prompts[0], prompts[2], prompts[1]]
    batch.add([batch.prefill(p) for p in rows], [len(p) - 1 for p in rows])
    assert batch.width == len(prompts[2]) - 1
    batch.step([p[-1] for p in rows])
    assert batch.remove([1]) == [0, 2]  # the long row leaves; the last row takes its slot
    assert batch.lengths == [len(prompts[0]), len(prompts[1])] and batch.width == len(prompts[1])
    layer = batch.cache.layers[0]
    assert layer.keys.shape[0] == 2 and not layer.keys[0, :, :len(prompts[1]) - len(prompts[0])].any()
    batch.remove([0, 1])
    assert len(batch) == 0 and batch.cache is None
