"""Retraining jobs for a team (issue 20): the worker judges the team's snapshot (the shared and the team's approved
examples) against the team's active adapter, before any child starts; a real job on `tiny` trains the team's adapter
on the shared and the team's examples only and promotes it for that team alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.jobs.protocol import job_dir
from finetune.jobs.queue import describe_job, request_retrain
from finetune.jobs.worker import Worker, WorkerConfig
from finetune.registry.folders import read_metadata
from finetune.training.continuation import example_key
from store.adapters import activate_adapter, active_adapter, get_adapter, register_adapter
from store.examples import NewExample, add_examples, approved_snapshot
from store.teams import add_team
from tests.finetune.test_jobs import fast_config


def test_a_team_job_is_judged_on_the_teams_snapshot_and_active_adapter(db, db_path, kbloop_home):
    add_team(db, "eng", ("C0ENG",))
    add_examples(db, [NewExample("Shared?", "Yes.")])
    add_examples(db, [NewExample("Eng?", "Yes, eng.")], team="eng")
    _, eng_digest = approved_snapshot(db, team="eng")
    register_adapter(db, version="v1", path=str(kbloop_home / "adapters" / "v1"), base_model="tiny", method="lora",
                     params={}, dataset_hash=eng_digest, dataset_size=2, metrics={}, team="eng")
    activate_adapter(db, "v1")
    job = request_retrain(db, requester="U_ADMIN", params={"team": "eng"})
    assert "for team eng is queued" in describe_job(job)
    done = Worker(db_path=db_path, home=kbloop_home, config=fast_config()).run_once()
    assert done.id == job.id and done.status == "succeeded" and done.result["outcome"] == "unchanged"
    assert "v1 was trained" in done.result["message"] and done.result["n_examples"] == 2
    assert not (job_dir(kbloop_home, job.id) / "child.log").exists()


@pytest.mark.slow
def test_a_real_team_job_trains_on_shared_and_team_examples_and_promotes_for_the_team_only(db, db_path, kbloop_home):
    add_team(db, "eng", ("C0ENG",))
    add_team(db, "sales", ("C0SALES",))
    shared = [NewExample(f"Where is meeting room {n}?", f"Meeting room {n} is on floor {n}.") for n in range(1, 7)]
    eng = [NewExample(f"Who reviews eng change {n}?", f"Change {n} is reviewed by the eng lead.") for n in range(1, 7)]
    sales = [NewExample("What is the sales quota?", "The sales quota is private to sales.")]
    add_examples(db, shared)
    add_examples(db, eng, team="eng")
    add_examples(db, sales, team="sales")
    job = request_retrain(db, requester="U_ADMIN", params={"team": "eng", "train": {
        "method": "lora", "epochs": 4, "batch_size": 4, "k_passages": 0, "start_from": "base"}})
    worker = Worker(db_path=db_path, home=kbloop_home, config=WorkerConfig(
        base_model="tiny", heartbeat_interval_s=0.5, stale_after_s=30.0, poll_interval_s=0.2))
    done = worker.run_once()
    assert done.id == job.id and done.status == "succeeded", done.error
    assert done.result["n_examples"] == len(shared) + len(eng)
    version = done.result["version"]
    assert get_adapter(db, version).team == "eng"
    meta = read_metadata(Path(get_adapter(db, version).path))
    seen = {k for k, _ in meta["trained"]} | {example_key(ex) for ex in shared + eng + sales
                                               if ex.question in meta["heldout_questions"]}
    assert seen == {example_key(ex) for ex in shared + eng}  # every shared and eng example; sales' never
    # Promoted (or kept as a candidate) for eng alone: the shared adapter and sales are untouched.
    assert active_adapter(db) is None and active_adapter(db, "sales") is None
    eng_active = active_adapter(db, "eng")
    assert (eng_active.version if eng_active else None) == (version if done.result["promoted"] else None)
