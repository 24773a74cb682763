"""Mixed-adapter batches (issue 20, serving): rows of one running batch each on their own LoRA adapter or the base,
on one loaded base (finetune.serving.models, scheduler, kv_cache). Real parts throughout: the tiny base, real PEFT
LoRA adapters with different non-zero weights registered in a real store, the scheduler and the served models the
engine runs, store-side routing and promotion. Every answer is, token for token, what greedy generate() gives its
prompt alone on its own adapter.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from finetune.model.prompting import PromptPassage, build_messages, render_prompt
from finetune.serving.models import ServedModels
from finetune.serving.routing import adapter_key, resolve_version
from finetune.serving.scheduler import BatchScheduler, GenerationRequest
from store import local_db, open_db
from store.adapters import activate_adapter, register_adapter
from store.teams import add_team
from tests.conftest import SAMPLES
from tests.finetune.registry_fixtures import make_lora_adapter

NEW_TOKENS = 12
KB = [PromptPassage(p.stem, p.read_text(encoding="utf-8")) for p in sorted((SAMPLES / "kb").glob("*.md"))]
QUESTIONS = [
    ("VPN?", []),
    ("How many days of parental leave do new parents get, and who approves it?",
     [PromptPassage("Leave policy", "Parents get 30 days of paid leave. Your manager approves the request.")]),
    ("What does the handbook say, in short?", KB[:3]),
    ("报销需要哪些发票？", [PromptPassage("报销制度", "报销需要提供正规发票和审批单，三十天内提交。")]),
]
VERSIONS = {"v1": (1, None), "v2": (2, "eng"), "v3": (3, "eng")}  # version: (seed, team)


@pytest.fixture(scope="module")
def workspace(tiny_path, tmp_path_factory):
    """A store with team eng, three real LoRA adapters on tiny (v1 shared; v2, v3 eng's) and a full fine-tune
    (a model folder of its own: a copy of the base)."""
    home = tmp_path_factory.mktemp("mixed-adapters")
    db_path = home / "kbloop.db"
    db = open_db(db_path)
    add_team(db, "eng", ("C0ENG",))
    for version, (seed, team) in VERSIONS.items():
        path = make_lora_adapter(tiny_path, home / "adapters" / version, seed=seed)
        register_adapter(db, version=version, path=str(path), base_model="tiny", method="lora", params={"r": 8},
                         dataset_hash=None, dataset_size=0, metrics={}, team=team)
    full = shutil.copytree(tiny_path, home / "adapters" / "full1")
    register_adapter(db, version="full1", path=str(full), base_model="tiny", method="full", params={},
                     dataset_hash=None, dataset_size=0, metrics={})
    return {"home": home, "db_path": db_path, "db": db}


@pytest.fixture(scope="module")
def references(tiny_path, workspace):
    """Each version's model on its own, for the reference generations: the base and one PeftModel per adapter."""
    from peft import PeftModel

    from finetune.model.loading import load_base_model

    refs = {None: load_base_model(tiny_path).eval()}
    for version in VERSIONS:
        refs[version] = PeftModel.from_pretrained(load_base_model(tiny_path),
                                                  str(workspace["home"] / "adapters" / version)).eval()
    return refs


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(render_prompt(tokenizer, build_messages(q, passages=ps)), add_special_tokens=False).input_ids
            for q, ps in QUESTIONS]


_ALONE: dict = {}


def alone(references, version: str | None, prompt: list[int], eot: int) -> list[int]:
    """Greedy generate() on the prompt alone on the version's own model, stopping at the end of turn."""
    key = (version, tuple(prompt))
    if key not in _ALONE:
        with torch.inference_mode():
            out = references[version].generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                               do_sample=False, eos_token_id=eot, pad_token_id=0)
        _ALONE[key] = out[0, len(prompt):].tolist()
    return _ALONE[key]


@pytest.fixture
def served(tiny_path, workspace):
    """The engine's served models on a freshly loaded base (no adapter loaded yet)."""
    from finetune.model.loading import load_base_model

    def make(adapter_cache_size: int = 3) -> ServedModels:
        return ServedModels(load_base_model(tiny_path).eval(), base_model="tiny", k=3,
                            adapter_cache_size=adapter_cache_size)

    return make


def scheduler(models: ServedModels, workspace, tokenizer, eot) -> BatchScheduler:
    """The scheduler as the engine builds it: versions resolved from the store, models chosen by `models`."""
    db_path = workspace["db_path"]
    return BatchScheduler(select_model=lambda version: models.choose(local_db(db_path), version),
                          resolve=lambda adapter: resolve_version(local_db(db_path), adapter),
                          batch_key=lambda version: models.batch_key(local_db(db_path), version),
                          tokenizer=tokenizer, stop_ids=[eot], max_new_tokens=NEW_TOKENS, time_limit_s=600.0,
                          max_batch_size=8)


def request(prompt: list[int], adapter: str, at_admission=None) -> GenerationRequest:
    """A request for `prompt`; `at_admission(version)` runs when the scheduler admits it (its prompt is built then,
    on the scheduler's thread): what it submits joins the running batch at the next step."""
    def build(version):
        if at_admission is not None:
            at_admission(version)
        return prompt, None

    return GenerationRequest(adapter, build)


def results(s: BatchScheduler, first: list, later: list = ()) -> list:
    """Start `s`, then the results of `first` and of `later` (filled in while `first` runs), in order."""
    s.start()
    try:
        got = [f.result(timeout=300) for f in first]
        return got + [f.result(timeout=300) for f in later]
    finally:
        s.close(timeout=60)


def test_rows_of_the_base_and_different_adapters_in_one_batch_answer_as_each_alone(
        served, workspace, references, prompts, tokenizer, eot):
    asks = [(prompts[0], "v1"), (prompts[0], "base"), (prompts[0], "v2"), (prompts[1], "v2"), (prompts[2], "base"),
            (prompts[3], "v1"), (prompts[2], "v1"), (prompts[1], "base")]
    expected = [alone(references, None if a == "base" else a, p, eot) for p, a in asks]
    assert len({tuple(e) for e in expected[:3]}) == 3  # the same prompt: each adapter really changes the answer
    s = scheduler(served(), workspace, tokenizer, eot)
    futures = [s.submit(request(p, a)) for p, a in asks]  # all waiting before the scheduler starts
    got = results(s, futures)
    assert [list(g.tokens) for g in got] == expected
    assert [g.adapter_version for g in got] == [None if a == "base" else a for _, a in asks]
    assert all(g.notices == () for g in got)
    assert s.batches_run == 1 and s.largest_batch == len(asks)  # one running batch, decoded together


def test_a_promotion_during_a_mixed_batch_applies_to_newcomers_only(
        served, workspace, references, prompts, tokenizer, eot):
    """eng's v2 is active: eng's question starts on v2 beside a shared one (v1) and a base one; v3 is promoted
    as they start, and eng's next question joins the same running batch on v3, while the first finishes on v2."""
    db = workspace["db"]
    activate_adapter(db, "v1")
    activate_adapter(db, "v2")
    asked = [("v2", prompts[0]), ("v1", prompts[1]), (None, prompts[2]), ("v3", prompts[0]), ("v1", prompts[3])]
    expected = [alone(references, v, p, eot) for v, p in asked]
    assert min(map(len, expected[:3])) > 1  # the first rows still decode when the newcomers join
    s = scheduler(served(), workspace, tokenizer, eot)
    late: list = []

    def promote_and_ask_again(version) -> None:
        activate_adapter(db, "v3")  # what `kbloop promote v3` does
        late.extend([s.submit(request(prompts[0], adapter_key("active", "eng"))),
                     s.submit(request(prompts[3], adapter_key("active", None)))])

    early = [s.submit(request(prompts[0], adapter_key("active", "eng"), at_admission=promote_and_ask_again)),
             s.submit(request(prompts[1], adapter_key("active", None))), s.submit(request(prompts[2], "base"))]
    try:
        got = results(s, early, late)  # `late`: submitted when the first was admitted
    finally:
        activate_adapter(db, "v2")
    assert [g.adapter_version for g in got] == [v for v, _ in asked]
    assert [list(g.tokens) for g in got] == expected
    assert s.batches_run == 1 and s.joined_running == 2  # the newcomers joined the batch under way


def test_an_adapter_a_running_row_uses_is_never_unloaded(served, workspace, references, prompts, tokenizer, eot):
    """A cache of one adapter: rows on v1 and v2 decode, v3 and the base join; all three adapters stay loaded
    while their rows run, and the cache shrinks back to one as they leave."""
    asked = [("v1", prompts[0]), ("v2", prompts[3]), ("v3", prompts[2]), (None, prompts[1])]
    expected = [alone(references, v, p, eot) for v, p in asked]
    assert min(map(len, expected[:2])) > 1  # v1's and v2's rows still decode when v3's joins
    models = served(adapter_cache_size=1)
    s = scheduler(models, workspace, tokenizer, eot)
    late: list = []
    loaded_when_v3_joined: list[str] = []

    def ask_more(version) -> None:
        late.extend([s.submit(request(prompts[2], "v3", at_admission=lambda v: loaded_when_v3_joined.extend(
            models.loaded_adapters))), s.submit(request(prompts[1], "base"))])

    early = [s.submit(request(prompts[0], "v1", at_admission=ask_more)), s.submit(request(prompts[3], "v2"))]
    got = results(s, early, late)  # `late`: submitted when the first was admitted
    assert [list(g.tokens) for g in got] == expected
    assert [g.adapter_version for g in got] == [v for v, _ in asked] and all(g.notices == () for g in got)
    assert s.batches_run == 1 and s.joined_running == 2
    assert sorted(loaded_when_v3_joined) == ["v1", "v2", "v3"]  # beyond the cache's size while in use
    assert models.loaded_adapters == ["v3"]  # the least recently chosen went once idle


def test_a_full_fine_tune_runs_in_a_batch_of_its_own(served, workspace, references, prompts, tokenizer, eot):
    """A full fine-tune is a model of its own: its request waits for the adapters' batch to drain (first come,
    first served), and the adapter request behind it waits for it."""
    s = scheduler(served(), workspace, tokenizer, eot)
    futures = [s.submit(request(prompts[0], "v1")), s.submit(request(prompts[1], "base")),
               s.submit(request(prompts[1], "full1")), s.submit(request(prompts[3], "v2"))]
    got = results(s, futures)
    assert [g.adapter_version for g in got] == ["v1", None, "full1", "v2"]
    asked = [("v1", prompts[0]), (None, prompts[1]), (None, prompts[1]), ("v2", prompts[3])]  # full1: base weights
    assert [list(g.tokens) for g in got] == [alone(references, v, p, eot) for v, p in asked]
    assert s.batches_run == 3 and s.largest_batch == 2


def test_a_row_on_the_base_keeps_no_adapter_when_the_first_adapter_loads_under_it(
        served, workspace, references, prompts, tokenizer, eot):
    """The base answers alone on a base without adapters; an adapter's question joins, and loading the first
    adapter wraps the base in PEFT under the running row, which goes on without the adapter."""
    expected = [alone(references, None, prompts[0], eot), alone(references, "v1", prompts[1], eot)]
    assert len(expected[0]) > 1
    s = scheduler(served(), workspace, tokenizer, eot)
    late: list = []
    first = s.submit(request(prompts[0], "base", at_admission=lambda v: late.append(s.submit(request(prompts[1], "v1")))))
    s.start()
    try:
        got = [first.result(timeout=300)]
        got += [f.result(timeout=300) for f in late]  # submitted when the first was admitted
    finally:
        s.close(timeout=60)
    assert [list(g.tokens) for g in got] == expected
    assert [g.adapter_version for g in got] == [None, "v1"]
    assert s.batches_run == 1 and s.joined_running == 1
