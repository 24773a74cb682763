"""Retraining jobs for a team (issue 20): the worker judges the team's snapshot (the shared and the team's approved
examples) against the team's active adapter, before any child starts."""

from __future__ import annotations

from finetune.jobs.protocol import job_dir
from finetune.jobs.queue import describe_job, request_retrain
from finetune.jobs.worker import Worker
from store.adapters import activate_adapter, register_adapter
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
