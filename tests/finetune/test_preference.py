"""Votes that train (issue 20): which votes a preference run learns from, and KTO on the `tiny` base with TRL's
own trainer, through the registry: the 👎'd answers become less likely, the 👍'd ones do not, the objective is
recorded, and the gate judges it on those likelihoods as well as the held-out set.

Real tiny model, real SQLite file, real TRL `KTOTrainer`; the active adapter is the tiny base's own weights
registered as a full fine-tune (training one with SFT first would take minutes and say nothing more here).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.finetune.registry_fixtures import sample_qa, seed_store

pytestmark = pytest.mark.slow

# An AWS access key id (AWS's own documentation example): the secrets scan flags it (store.sensitive).
SECRET = "AKIAIOSFODNN7EXAMPLE"


def test_trl_trainers_are_the_stable_top_level_imports():
    """pyproject pins trl>=1.16,<2; finetune.training.preference imports exactly these names."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    assert KTOTrainer.__module__.startswith("trl.trainer") and DPOTrainer.__module__.startswith("trl.trainer")
    assert KTOConfig and DPOConfig


def test_no_kto_batch_leaves_a_row_alone():
    """TRL pairs each KTO row with the next row's answer within the batch: a row alone would be paired with itself."""
    from finetune.training.preference import kto_batch_size

    assert kto_batch_size(17, 4) == 3 and kto_batch_size(25, 8) == 7 and kto_batch_size(16, 4) == 4
    assert kto_batch_size(5, 8) == 5 and kto_batch_size(7, 2) == 4
    for rows in range(4, 200):
        for wanted in (2, 4, 8, 16):
            batch = kto_batch_size(rows, wanted)
            assert 2 <= batch <= max(2, rows) and rows % batch != 1, (rows, wanted, batch)


def _vote(db, question: str, answer: str, vote: int, *, user: str = "U1", correction: str | None = None) -> int:
    from store.interactions import record_interaction, record_vote

    iid = record_interaction(db, question=question, answer=answer, source="slack", channel_id="C1")
    record_vote(db, interaction_id=iid, user_id=user, vote=vote, correction=correction)
    return iid


def seed_votes(db) -> dict:
    """Six 👍 on right answers, six 👎 on wrong ones (another question's answer), a 👎 with a correction, a 👎 on
    an answer holding a secret, and a 👎 whose correction a curator rejected."""
    from store.examples import list_examples, review_example

    qa = sample_qa(40)
    ids: dict = {"up": [], "down": []}
    for i in range(6):
        q, a = qa[i]
        ids["up"].append(_vote(db, q, a, +1))
    for i in range(6, 12):
        q, _ = qa[i]
        wrong = qa[(i + 7) % len(qa)][1]
        ids["down"].append(_vote(db, q, wrong, -1, user="U2"))
    q, a = qa[12]
    ids["corrected"] = _vote(db, q, qa[20][1], -1, user="U3", correction=a)
    ids["secret"] = _vote(db, "What is the deploy key?", f"It is {SECRET}.", -1)
    ids["rejected"] = _vote(db, qa[13][0], "Ask HR.", -1, user="U4", correction="Nobody knows.")
    pending = next(e for e in list_examples(db, status="pending") if e.interaction_id == ids["rejected"])
    review_example(db, pending.id, decision="rejected", reviewer="curator")
    return ids


def test_votes_that_train_exclude_flagged_and_rejected(db):
    from store.export import export_records
    from store.preferences import voted_answers

    seed_store(db, n_examples=12)
    ids = seed_votes(db)
    votes, left_out = voted_answers(db, corrections=True)
    by_interaction = {v.interaction_id for v in votes}
    assert ids["secret"] not in by_interaction and ids["rejected"] not in by_interaction
    assert left_out == 2
    assert sum(v.desirable for v in votes) == 6 + 1  # the six 👍 and the correction
    assert sum(not v.desirable for v in votes) == 6 + 1  # the six 👎 and the corrected answer
    correction = next(v for v in votes if v.kind == "correction")
    assert correction.interaction_id == ids["corrected"] and correction.answer == sample_qa(40)[12][1]
    # The export is the same selection, votes only.
    records, export_left_out = export_records(db, "kto")
    assert len(records) == 13 and export_left_out == 2
    assert not any(SECRET in r["completion"] for r in records)


def _register_tiny_as_active(db, home: Path) -> None:
    """The tiny base's weights, registered and active as a full fine-tune trained without passages."""
    from finetune.model.loading import resolve_base
    from store.adapters import activate_adapter, register_adapter

    folder = home / "adapters" / "v1"
    shutil.copytree(resolve_base("tiny", home=home, db=db), folder)
    register_adapter(db, version="v1", path=str(folder), base_model="tiny", method="full",
                     params={"k_passages": 0, "method": "full"}, dataset_hash="x", dataset_size=12, metrics={})
    activate_adapter(db, "v1")


def test_a_kto_job_moves_the_voted_answers_likelihoods_and_records_its_objective(db, db_path, kbloop_home):
    """/kb-retrain objective=kto's path: the job's params -> the training child (a real process) -> KTO with
    TRL on tiny -> evaluation against v1 on the same held-out set and votes -> the registry -> the gate."""
    from finetune.jobs.queue import request_retrain
    from finetune.jobs.worker import Worker, WorkerConfig
    from finetune.registry.folders import adapter_objective, read_metadata
    from finetune.registry.promotion import dataset_unchanged
    from store.adapters import get_adapter

    seed_store(db, n_examples=12)
    seed_votes(db)
    _register_tiny_as_active(db, kbloop_home)
    db["adapters"].update("v1", {"dataset_hash": approved_hash(db)})
    assert dataset_unchanged(db)  # an SFT job would do nothing: a preference job learns from the votes instead
    job = request_retrain(db, requester="U_ADMIN", params={"train": {"objective": "kto"}})
    done = Worker(db_path=db_path, home=kbloop_home, config=WorkerConfig(base_model="tiny")).run_once()
    assert done.id == job.id and done.status == "succeeded", done.error
    adapter = get_adapter(db, done.result["version"])
    assert adapter_objective(adapter) == "kto" and adapter.params["objective"] == "kto"
    assert adapter.method == "full" and adapter.params["k_passages"] == 0
    meta = read_metadata(Path(adapter.path))
    assert meta["objective"] == "kto" and meta["continued_from"] == "v1"
    m, against = adapter.metrics, adapter.metrics["gate"]["against_metrics"]
    # After KTO the 👎'd answers are less likely and the 👍'd ones not less likely than under v1.
    assert m["pref_undesirable_loglik"] < against["pref_undesirable_loglik"]
    assert m["pref_desirable_loglik"] >= against["pref_desirable_loglik"]
    assert m["n_pref_desirable"] == 7 and m["n_pref_undesirable"] == 7
    assert "log-likelihood, downvoted answers" in done.result["table"]
    assert not any("👎'd" in r or "👍'd" in r for r in done.result["reasons"])


def approved_hash(db) -> str:
    from store.examples import approved_snapshot

    return approved_snapshot(db)[1]


def test_dpo_on_approved_corrections_widens_the_margin_over_the_replaced_answers(db, kbloop_home, tmp_path):
    """TRL's DPOTrainer on (approved correction, the answer it replaced), continuing a full fine-tune on tiny:
    the corrections gain on the answers they replaced."""
    from finetune.evaluation.metrics import answer_log_likelihood
    from finetune.model.loading import load_model_for_inference, resolve_base
    from finetune.training.config import TrainConfig
    from finetune.training.preference import preference_data, train_preference
    from store.examples import list_examples, review_example

    seed_store(db, n_examples=8)
    qa = sample_qa(40)
    for i in range(20, 26):  # 👎 on another question's answer, corrected with the right one, approved
        _vote(db, qa[i][0], qa[i + 10][1], -1, correction=qa[i][1])
    for ex in list_examples(db, status="pending"):
        review_example(db, ex.id, decision="approved", reviewer="curator")
    data = preference_data(db, "dpo", k_passages=0)
    assert len(data) == 6 and data.desirable[0].answer == qa[20][1] and data.undesirable[0].answer == qa[30][1]
    base = resolve_base("tiny", home=kbloop_home, db=db)

    def margin(folder) -> float:
        model, tok = load_model_for_inference(base, adapter_path=folder)
        return answer_log_likelihood(model, tok, data.desirable) - answer_log_likelihood(model, tok, data.undesirable)

    out = tmp_path / "dpo"
    outcome = train_preference(TrainConfig(base=base, objective="dpo"), data, out, init_from=Path(base),
                               method="full")
    assert outcome.steps >= 1 and (out / "config.json").exists() and not (out / "trl").exists()
    assert margin(out) > margin(base)


def test_kto_continues_a_lora_adapter_and_saves_it_alone(db, kbloop_home, tmp_path):
    """On a LoRA adapter TRL's reference is a frozen copy of it ("ref"); the saved folder holds the trained
    adapter only, loadable by PEFT and by vLLM, and it changed."""
    from safetensors.torch import load_file

    from finetune.model.loading import resolve_base
    from finetune.registry.folders import vllm_problems
    from finetune.training.config import TrainConfig
    from finetune.training.preference import preference_data, train_preference
    from tests.finetune.registry_fixtures import make_lora_adapter

    seed_store(db, n_examples=8)
    seed_votes(db)
    base = resolve_base("tiny", home=kbloop_home, db=db)
    start = make_lora_adapter(base, tmp_path / "v1", rank=4)
    data = preference_data(db, "kto", k_passages=0)
    out = tmp_path / "kto"
    outcome = train_preference(TrainConfig(base=base, objective="kto", epochs=1.0), data, out, init_from=start,
                               method="lora")
    assert outcome.method == "lora" and outcome.steps >= 1
    assert vllm_problems(out) == [] and not (out / "ref").exists()
    before, after = load_file(start / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)
