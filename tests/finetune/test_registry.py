"""The adapter registry: folders, promote / rollback / audit (fast, real SQLite), and training a candidate end
to end on the tiny base (slow). The gate itself: tests/finetune/test_gate.py."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.evaluation.gate import gate
from finetune.registry.folders import META_FILE, clean_stale_temp, vllm_problems
from finetune.registry.promotion import dataset_unchanged, promote, rollback, stored_verdict
from store import StoreError
from store import adapters as rows
from store.audit import list_audit
from store.examples import NewExample, add_examples, approved_snapshot
from tests.finetune.registry_fixtures import GOOD

# --- folders -------------------------------------------------------------------------------------


def _adapter_folder(path: Path, **config) -> Path:
    path.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": None,
           "bias": "none", "use_dora": False} | config
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    (path / "adapter_model.safetensors").write_bytes(b"\0")
    return path


def test_vllm_problems_names_each_violation(tmp_path):
    assert vllm_problems(_adapter_folder(tmp_path / "ok")) == []
    bad = vllm_problems(_adapter_folder(tmp_path / "bad", r=128, modules_to_save=["lm_head"],
                                        target_modules=["q_proj", "embed_tokens"], use_dora=True))
    text = " | ".join(bad)
    assert "modules_to_save" in text and "rank 128 is above 64" in text and "embed_tokens" in text and "DoRA" in text
    assert vllm_problems(tmp_path / "missing") == [f"{tmp_path / 'missing'}: no adapter_config.json"]


def test_clean_stale_temp_removes_only_folders_whose_writer_died(kbloop_home):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    root = kbloop_home / "adapters"
    dead = root / f".tmp-v3-{dead_pid}-abcd1234"
    mine = root / f".tmp-v4-{os.getpid()}-abcd1234"
    finished = root / "v2"
    for p in (dead, mine, finished):
        p.mkdir(parents=True)
    assert clean_stale_temp(kbloop_home) == [dead]
    assert not dead.exists() and mine.exists() and finished.exists()


# --- promote / rollback / audit (registered rows, real store) ---------------------------------------


def _register(db, home: Path, version: str, metrics: dict, *, against: str = "base", against_metrics=None,
              dataset_hash: str = "h") -> rows.Adapter:
    path = _adapter_folder(home / "adapters" / version)
    verdict = gate(metrics, against_metrics if against_metrics is not None else GOOD, active_label=against)
    full = metrics | {"gate": {"against": against, "against_metrics": against_metrics or GOOD,
                               "passed": verdict.passed, "reasons": verdict.reasons}}
    return rows.register_adapter(db, version=version, path=str(path), base_model="tiny", method="lora",
                                 params={"rank": 8}, dataset_hash=dataset_hash, dataset_size=10, metrics=full)


def test_promote_a_passing_candidate_records_the_actor(db, kbloop_home):
    _register(db, kbloop_home, "v1", GOOD)
    verdict = promote(db, "v1", actor="U_ADMIN")
    assert verdict.passed
    assert rows.active_adapter(db).version == "v1"
    entry = list_audit(db)[0]
    assert (entry["actor"], entry["action"], entry["target"], entry["allowed"]) == ("U_ADMIN", "promote", "v1", True)
    assert entry["detail"]["forced"] is False and entry["detail"]["previous"] is None


def test_promote_refuses_a_failing_candidate_unless_forced(db, kbloop_home):
    _register(db, kbloop_home, "v1", GOOD | {"heldout_loss": 2.0})
    with pytest.raises(StoreError, match=r"v1 not promoted: held-out loss 2\.000 is higher .*--force"):
        promote(db, "v1", actor="U1")
    assert rows.active_adapter(db) is None
    assert list_audit(db)[0]["allowed"] is False
    verdict = promote(db, "v1", actor="U_ADMIN", force=True)
    assert not verdict.passed and rows.active_adapter(db).version == "v1"
    entry = list_audit(db)[0]
    assert entry["allowed"] is True and entry["detail"]["forced"] is True and entry["actor"] == "U_ADMIN"


def test_promote_needs_a_comparison_with_the_adapter_active_now(db, kbloop_home):
    _register(db, kbloop_home, "v1", GOOD)
    _register(db, kbloop_home, "v2", GOOD)  # also compared with the base
    promote(db, "v1", actor="a")
    verdict = stored_verdict(db, rows.get_adapter(db, "v2"))
    assert not verdict.passed and "compared with base, but v1 is active now" in verdict.reasons[0]
    with pytest.raises(StoreError, match="kbloop eval v2"):
        promote(db, "v2", actor="a")


def test_promote_bad_input(db, kbloop_home):
    _register(db, kbloop_home, "v1", GOOD)
    with pytest.raises(StoreError, match=r"no adapter 'v9' \(known: v1\)"):
        promote(db, "v9", actor="a")
    promote(db, "v1", actor="a")
    with pytest.raises(StoreError, match="v1 is already the active adapter"):
        promote(db, "v1", actor="a")
    _register(db, kbloop_home, "v2", GOOD, against="v1")
    promote(db, "v2", actor="a")
    with pytest.raises(StoreError, match="v1 is retired"):  # use rollback, or force
        promote(db, "v1", actor="a")
    # A folder that vanished cannot be promoted, not even by force.
    _register(db, kbloop_home, "v3", GOOD, against="v2")
    (kbloop_home / "adapters" / "v3" / "adapter_model.safetensors").unlink()
    with pytest.raises(StoreError, match="incomplete adapter folder"):
        promote(db, "v3", actor="a", force=True)
    assert rows.active_adapter(db).version == "v2"


def test_rollback_goes_back_step_by_step_to_the_base(db, kbloop_home):
    with pytest.raises(StoreError, match="nothing to roll back"):
        rollback(db, actor="a")
    _register(db, kbloop_home, "v1", GOOD)
    promote(db, "v1", actor="a")
    _register(db, kbloop_home, "v2", GOOD, against="v1")
    promote(db, "v2", actor="a")
    frm, to = rollback(db, actor="U_ADMIN")
    assert (frm.version, to.version) == ("v2", "v1") and rows.active_adapter(db).version == "v1"
    entry = list_audit(db)[0]
    assert (entry["action"], entry["actor"], entry["detail"]) == ("rollback", "U_ADMIN", {"from": "v2", "to": "v1"})
    frm, to = rollback(db, actor="a")
    assert frm.version == "v1" and to is None and rows.active_adapter(db) is None


def test_dataset_unchanged_follows_the_approved_snapshot(db, kbloop_home):
    add_examples(db, [NewExample(question="q1", answer="a1"), NewExample(question="q2", answer="a2")])
    assert not dataset_unchanged(db)  # nothing active yet
    _, digest = approved_snapshot(db)
    _register(db, kbloop_home, "v1", GOOD, dataset_hash=digest)
    promote(db, "v1", actor="a")
    assert dataset_unchanged(db)
    add_examples(db, [NewExample(question="q3", answer="a3")])
    assert not dataset_unchanged(db)


# --- training a candidate on the tiny base (slow) --------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A store seeded with the sample KB and 24 approved QA pairs; one candidate trained (v1).

    Prompts without retrieved passages (k_passages=0) keep sequences short: the point here is the
    registry's lifecycle, not answer quality (retrieval in prompts is covered by the CLI eval test)."""
    from finetune.evaluation.metrics import EvalConfig
    from finetune.registry.candidates import train_candidate
    from finetune.training.config import TrainConfig
    from store import open_db
    from tests.finetune.registry_fixtures import seed_store

    home = tmp_path_factory.mktemp("registry-home")
    db = open_db(home / "kbloop.db")
    seed_store(db, n_examples=24)
    steps = []
    phases = []
    config = TrainConfig(base="tiny", method="lora", epochs=2.0, k_passages=0, max_length=256)
    # Short generation budgets and probe: random weights never stop on their own, so the base's answers
    # always run to the budget.
    eval_config = EvalConfig(train_sample=4, forgetting_tokens=512, new_token_margin=8, max_new_tokens=64)
    result = train_candidate(db, home=home, config=config, on_step=steps.append, on_phase=phases.append,
                             eval_config=eval_config)
    return {"home": home, "db": db, "result": result, "steps": steps, "phases": phases, "config": config,
            "eval_config": eval_config}


@pytest.mark.slow
def test_train_candidate_registers_a_complete_evaluated_candidate(workspace):
    home, db, result = workspace["home"], workspace["db"], workspace["result"]
    adapter = result.adapter
    assert adapter.version == "v1" and adapter.status == "candidate" and result.active is None
    folder = home / "adapters" / "v1"
    assert Path(adapter.path) == folder
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", META_FILE} <= names
    assert not [n for n in os.listdir(home / "adapters") if n.startswith(".tmp-")]
    assert not (folder / "checkpoints").exists()
    assert vllm_problems(folder) == []
    assert workspace["steps"] and workspace["steps"][-1].step == workspace["steps"][-1].total_steps
    assert "training" in workspace["phases"] and "evaluating base on the same held-out set" in workspace["phases"]

    meta = json.loads((folder / META_FILE).read_text())
    snapshot, digest = approved_snapshot(db)
    assert meta["version"] == "v1" and meta["base"] == "tiny" and meta["method"] == "lora"
    assert meta["dataset_hash"] == digest == adapter.dataset_hash and meta["dataset_size"] == 24
    assert meta["n_train"] + meta["n_heldout"] == 24 and meta["n_heldout"] >= 1
    assert meta["params"]["rank"] == 8 and meta["created"]

    m = adapter.metrics
    for key in ("heldout_loss", "heldout_exact_match", "heldout_token_f1", "train_reproduced", "stop_rate",
                "forgetting_base_loss", "forgetting_adapter_loss", "forgetting_delta", "n_heldout", "n_train_sampled"):
        assert key in m, key
    assert m["n_train_sampled"] == 4
    base = m["gate"]["against_metrics"]
    assert m["gate"]["against"] == "base" == result.verdict.against
    # Two epochs on the answers already beat random weights on answers it never saw.
    assert m["heldout_loss"] < base["heldout_loss"]
    assert base["forgetting_delta"] == 0.0 and m["forgetting_base_loss"] == pytest.approx(base["forgetting_base_loss"])
    assert "held-out loss" in result.verdict.table and "v1" in result.verdict.table


@pytest.mark.slow
def test_registered_adapter_loads_with_plain_peft_in_a_fresh_process(workspace):
    home = workspace["home"]
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from peft import PeftModel\n"
        "base = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "model = PeftModel.from_pretrained(base, sys.argv[2])\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "out = model(**tok(['hello'], return_tensors='pt')).logits\n"
        "print('LOADED', tuple(out.shape), len(model.peft_config['default'].target_modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(home / "models" / "tiny"), str(home / "adapters" / "v1")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED (1, " in done.stdout and done.stdout.strip().endswith(" 7")


@pytest.mark.slow
def test_cancelled_or_failed_training_leaves_nothing_behind(workspace, monkeypatch):
    from dataclasses import replace

    from finetune.registry import candidates as registry
    from finetune.registry.candidates import train_candidate
    from finetune.training.trainer import TrainingCancelled

    home, db = workspace["home"], workspace["db"]
    before = sorted(os.listdir(home / "adapters"))
    with pytest.raises(TrainingCancelled):
        train_candidate(db, home=home, config=workspace["config"], should_stop=lambda: True)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry, "evaluate_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_candidate(db, home=home, config=replace(workspace["config"], epochs=0.3))
    assert sorted(os.listdir(home / "adapters")) == before
    assert [a.version for a in rows.list_adapters(db)] == ["v1"]


@pytest.mark.slow
def test_next_candidate_is_compared_with_the_active_adapter(workspace):
    from finetune.registry.candidates import train_candidate

    home, db = workspace["home"], workspace["db"]
    if rows.active_adapter(db) is None:
        promote(db, "v1", actor="test", force=True)
    assert dataset_unchanged(db)
    from tests.finetune.registry_fixtures import sample_qa

    add_examples(db, [NewExample(question=q, answer=a) for q, a in sample_qa(30)[24:]])
    assert not dataset_unchanged(db)
    from dataclasses import replace

    result = train_candidate(db, home=home, config=replace(workspace["config"], epochs=1.0, start_from="base"),
                             eval_config=workspace["eval_config"])
    assert result.adapter.version == "v2" and result.active.version == "v1"
    assert result.verdict.against == "v1" and result.adapter.metrics["gate"]["against"] == "v1"
    assert result.adapter.dataset_size == 30
    # Its stored verdict is the one the worker will promote on.
    assert stored_verdict(db, rows.get_adapter(db, "v2")).passed == result.verdict.passed


def test_approved_corrections_always_train_never_held_out(db):
    """A curator-approved correction must be learned: the held-out split is drawn from the other examples."""
    from finetune.registry.split import training_split
    from finetune.training.data import split_heldout
    from store.examples import NewExample, add_examples, list_examples, review_example
    from store.interactions import record_interaction, record_vote

    add_examples(db, [NewExample(f"Imported question {i}?", f"Answer {i}.") for i in range(40)])
    candidates = [NewExample(f"Corrected question {i}?", "x") for i in range(200)]
    _, would_be_held = split_heldout(candidates)
    question = would_be_held[0].question  # hashes to the held-out side
    iid = record_interaction(db, question=question, answer="wrong", source="slack")
    record_vote(db, interaction_id=iid, user_id="U1", vote=-1, correction="The right answer.")
    review_example(db, list_examples(db, status="pending")[0].id, decision="approved", reviewer="t")

    eval_set = training_split(db, k_passages=0)
    assert question in [ex.question for ex in eval_set.train]
    assert question not in [ex.question for ex in eval_set.heldout]
    assert eval_set.heldout and all(ex.question.startswith("Imported") for ex in eval_set.heldout)


# --- continued training on the tiny base (slow) -----------------------------------------------------


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    """v1: tiny's defaults (full fine-tuning, memorise, stop when reproduced) on 10 approved pairs, promoted;
    then one new approved answer and v2 trained with the default start (continue from the active v1)."""
    from finetune.evaluation.metrics import EvalConfig
    from finetune.registry.candidates import train_candidate
    from finetune.training.config import TrainConfig
    from store import open_db
    from tests.finetune.registry_fixtures import seed_store

    home = tmp_path_factory.mktemp("continue-home")
    db = open_db(home / "kbloop.db")
    seed_store(db, n_examples=10)
    config = TrainConfig(base="tiny", max_length=256)
    eval_config = EvalConfig(train_sample=4, forgetting_tokens=512, new_token_margin=8, max_new_tokens=64)
    first = train_candidate(db, home=home, config=config, eval_config=eval_config)
    promote(db, first.adapter.version, actor="test", force=True)
    new = NewExample(question="What is the guest Wi-Fi network called in the Lisbon office?",
                     answer="KB-Guest-Lisboa; the password is at the reception desk.")
    add_examples(db, [new])
    phases = []
    second = train_candidate(db, home=home, config=config, eval_config=eval_config, on_phase=phases.append)
    return {"home": home, "db": db, "first": first, "second": second, "phases": phases, "config": config,
            "eval_config": eval_config, "new": new}


@pytest.mark.slow
def test_a_continued_run_starts_from_the_active_weights_learns_the_new_answer_and_keeps_the_earlier_ones(continued):
    """The default retrain continues v1 on the new answer and replayed samples of the earlier ones, and stops
    once the new answer is learnt with the earlier ones kept."""
    from finetune.training.continuation import example_key

    first, second = continued["first"], continued["second"]
    meta1 = json.loads((Path(first.adapter.path) / META_FILE).read_text())
    meta2 = json.loads((Path(second.adapter.path) / META_FILE).read_text())
    assert meta1["continued_from"] is None and meta1["start"] == "training from the base: no adapter is active yet"
    assert meta1["training"]["stopped_early"] and meta1["training"]["reproduced"] == 1.0
    # Said where it starts, and why.
    assert "continuing from v1 (active): 1 new or changed example, 8 earlier ones replayed in samples" in continued["phases"]
    assert meta2["continued_from"] == "v1", (meta2["start"], meta2["training"]["notes"])
    notes = meta2["training"]["notes"]
    # Only the new example and replayed samples of the earlier ones: 4 x new + 8 replayed a round.
    assert any("continued run: 60 rounds at most, each 1 new x 4 + 8 replayed" in n for n in notes), notes
    # The starting weights are v1's: they reproduced the 8 earlier answers before the first step.
    stop = next(n for n in notes if n.startswith("stopped at step"))
    assert "of the 8 earlier answers the starting weights reproduced still reproduced" in stop
    assert "all of the 1 new ones learnt" in stop and meta2["training"]["stopped_early"]
    # Not asserted: fewer steps than v1. On 10 pairs v1 memorises in ~45 steps and the continued run, at a
    # twentieth of the rate, needs ~64; the saving shows on larger sets (docs/benchmarks.md).
    m = second.adapter.metrics
    assert m["n_active_reproduced"] == 8 and m["retained_vs_active"] >= 0.95
    assert m["forgetting_vs_active"] is not None
    assert example_key(continued["new"]) in meta2["reproduced_keys"]
    assert "answers kept (vs active)" in second.verdict.table and second.verdict.against == "v1"
    assert {k for k, _ in meta2["trained"]} == {k for k, _ in meta1["trained"]} | {example_key(continued["new"])}


@pytest.mark.slow
def test_from_base_trains_from_scratch(continued):
    from dataclasses import replace

    from finetune.registry.candidates import train_candidate

    home, db = continued["home"], continued["db"]
    phases = []
    result = train_candidate(db, home=home, config=replace(continued["config"], start_from="base"),
                             eval_config=continued["eval_config"], on_phase=phases.append)
    meta = json.loads((Path(result.adapter.path) / META_FILE).read_text())
    assert meta["continued_from"] is None and "training from the base (--from base)" in phases
    assert not any(n.startswith("continued") for n in meta["training"]["notes"])


@pytest.mark.slow
def test_a_different_method_falls_back_to_the_base_with_the_reason(continued):
    from dataclasses import replace

    from finetune.registry.continuing import plan_continuation
    from finetune.registry.split import training_split

    db = continued["db"]
    eval_set = training_split(db, k_passages=0)
    config = replace(continued["config"], k_passages=0)
    active = rows.active_adapter(db)
    plan = plan_continuation(db, replace(config, method="lora"), tiny=True, active=active, train=eval_set.train)
    assert plan.previous is None
    assert plan.reason == "training from the base, not continuing v1 (active): v1 was trained with full, this run uses lora"
    with pytest.raises(StoreError, match="no adapter 'v9'"):
        plan_continuation(db, replace(config, start_from="v9"), tiny=True, active=active, train=eval_set.train)
    named = plan_continuation(db, replace(config, start_from="v1"), tiny=True, active=active, train=eval_set.train)
    assert named.previous.version == "v1" and len(named.new) == 1


@pytest.mark.slow
def test_a_continued_run_that_ends_its_budget_unlearnt_trains_from_the_base_and_says_why(continued, monkeypatch):
    """A continued candidate that has not learnt the new answer with the earlier ones kept would fail the
    gate's retention check, so the same run trains from the base instead and records the attempt."""
    from dataclasses import replace

    from finetune.registry import continuing
    from finetune.registry.candidates import train_candidate
    from finetune.training.continuation import Sizing

    # One round (2 steps at a twentieth of the rate) cannot learn the new answer: the budget ends first.
    monkeypatch.setattr(continuing, "sizing_for", lambda *, tiny, learning_rate: Sizing(
        new_repeats=4, replay_per_round=12, max_rounds=1, learning_rate=0.05 * learning_rate))
    home, db = continued["home"], continued["db"]
    phases = []
    result = train_candidate(db, home=home, config=replace(continued["config"], epochs=1.0),
                             eval_config=continued["eval_config"], on_phase=phases.append)
    meta = json.loads((Path(result.adapter.path) / META_FILE).read_text())
    assert meta["continued_from"] is None
    assert meta["start"].startswith("training from the base: continuing v1 did not keep its answers within the budget")
    assert meta["start"] in phases and phases.index(meta["start"]) > phases.index("training")
    notes = meta["training"]["notes"]
    assert notes[0] == meta["start"]
    assert any(n.startswith("continued attempt: continued run: 1 rounds at most") for n in notes), notes
    assert any(n.startswith("continued attempt: trained the whole budget") for n in notes), notes
    assert not list(Path(home).glob("adapters/.tmp*")) and Path(result.adapter.path).is_dir()


def test_the_next_version_skips_a_folder_a_crash_left(db, kbloop_home):
    from finetune.registry.folders import next_free_version, pick_version

    rows.register_adapter(db, version="v1", path="/x/v1", base_model="tiny", method="lora", params={},
                          dataset_hash=None, dataset_size=3, metrics={})
    assert next_free_version(db, kbloop_home) == "v2"
    (kbloop_home / "adapters" / "v2").mkdir(parents=True)  # renamed into place, never registered
    assert next_free_version(db, kbloop_home) == "v3" == pick_version(db, kbloop_home, None)
    assert pick_version(db, kbloop_home, "mine") == "mine"
    with pytest.raises(StoreError, match="already exists"):
        pick_version(db, kbloop_home, "v2")  # the crash's folder
