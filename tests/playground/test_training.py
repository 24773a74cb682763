"""The training tab's handlers: admin checks server-side, the job queue, the loss log, promote / roll back."""

import json

from playground import training
from store.adapters import active_adapter, register_adapter
from store.audit import list_audit
from store.jobs import get_job, log_train_step


def test_non_admins_are_refused_in_the_handler_and_it_is_recorded(db, bob):
    for outcome in (training.start_retrain(db, bob), training.promote(db, bob, "v1"), training.rollback(db, bob),
                    training.cancel_job(db, bob)):
        assert not outcome.ok and "only KBLOOP_PLAYGROUND_ADMINS" in outcome.message
    assert [e["action"] for e in list_audit(db)] == ["cancel_a_job", "roll_back", "promote", "start_retraining"]
    assert all(not e["allowed"] and e["actor"] == "playground:bob" for e in list_audit(db))
    assert training.current_job_id(db) is None


def test_admin_queues_one_job_at_a_time_and_cancels_it(db, alice):
    out = training.start_retrain(db, alice, overrides={"method": "lora", "rank": 4, "epochs": None})
    assert out.ok, out.message
    job_id = training.current_job_id(db)
    job = get_job(db, job_id)
    assert job.requester == "playground:alice" and job.params == {"train": {"method": "lora", "rank": 4}}
    again = training.start_retrain(db, alice)
    assert not again.ok and f"job {job_id}" in again.message and "queued" in again.message
    assert "is queued" in training.progress_markdown(db, job_id)
    assert training.cancel_job(db, alice).ok
    assert get_job(db, job_id).status == "cancelled"
    assert training.jobs_frame(db)["status"].tolist() == ["cancelled"]


def test_unknown_training_setting_is_refused(db, alice):
    out = training.start_retrain(db, alice, overrides={"colour": "blue"})
    assert not out.ok and "colour" in out.message


def test_loss_frame_follows_the_jobs_step_log(db, alice):
    training.start_retrain(db, alice)
    job_id = training.current_job_id(db)
    for step, loss in [(1, 2.5), (2, 2.1), (3, 1.7)]:
        log_train_step(db, run=f"job-{job_id}", step=step, loss=loss, job_id=job_id)
    frame = training.loss_frame(db, job_id)
    assert frame["step"].tolist() == [1, 2, 3] and frame["loss"].tolist() == [2.5, 2.1, 1.7]
    assert training.loss_frame(db, None).empty


def _register(db, tmp_path, version, metrics):
    folder = tmp_path / version
    folder.mkdir()
    # A full-model folder only needs its config to count as complete for the registry.
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return register_adapter(db, version=version, path=str(folder), base_model="tiny", method="full", params={},
                            dataset_hash="h", dataset_size=10, metrics=metrics)


GOOD = {"n_heldout": 3, "heldout_loss": 1.0, "heldout_exact_match": 0.6, "heldout_token_f1": 0.7, "stop_rate": 1.0}
BASE = {"n_heldout": 3, "heldout_loss": 3.0, "heldout_exact_match": 0.0, "heldout_token_f1": 0.1, "stop_rate": 1.0}


def test_promote_shows_the_gates_verdict_and_rolls_back(db, alice, tmp_path):
    _register(db, tmp_path, "v1", {**GOOD, "gate": {"against": "base", "against_metrics": BASE}})
    worse = {**BASE, "gate": {"against": "base", "against_metrics": GOOD}}
    _register(db, tmp_path, "v2", worse)
    assert "gate **passed**" in training.verdict_markdown(db, "v1")
    out = training.promote(db, alice, "v1")
    assert out.ok and "gate passed" in out.message and active_adapter(db).version == "v1"
    verdict = training.verdict_markdown(db, "v2")
    assert "gate **failed**" in verdict and "held-out loss" in verdict
    refused = training.promote(db, alice, "v2")
    assert not refused.ok and active_adapter(db).version == "v1"
    forced = training.promote(db, alice, "v2", force=True)
    assert forced.ok and "forced" in forced.message and active_adapter(db).version == "v2"
    back = training.rollback(db, alice)
    assert back.ok and back.message == "Rolled back from v2 to v1." and active_adapter(db).version == "v1"
    frame = training.adapters_frame(db)
    assert frame["version"].tolist() == ["v2", "v1"] and frame["exact match"].tolist() == [0.0, 60.0]
    actions = [(e["action"], e["allowed"], e["actor"]) for e in list_audit(db)]
    assert ("promote", True, "playground:alice") in actions and ("rollback", True, "playground:alice") in actions


def test_admin_retrains_on_the_votes_and_the_adapter_list_says_so(db, alice, bob, tmp_path):
    refused = training.start_retrain(db, bob, overrides={"objective": "kto"})
    assert not refused.ok and training.current_job_id(db) is None
    bad = training.start_retrain(db, alice, overrides={"objective": "ppo"})
    assert not bad.ok and "objective must be one of sft, kto, dpo" in bad.message
    out = training.start_retrain(db, alice, overrides={"objective": "kto", "method": ""})
    assert out.ok, out.message
    assert get_job(db, training.current_job_id(db)).params == {"train": {"objective": "kto"}}
    _register(db, tmp_path, "v1", GOOD)
    folder = tmp_path / "v2"
    folder.mkdir()
    register_adapter(db, version="v2", path=str(folder), base_model="tiny", method="full",
                     params={"objective": "kto"}, dataset_hash="h", dataset_size=10, metrics=GOOD)
    frame = training.adapters_frame(db)
    assert dict(zip(frame["version"], frame["objective"])) == {"v1": "sft", "v2": "kto"}


def test_admin_retrains_and_rolls_back_a_teams_adapter_only(db, alice, tmp_path):
    from store.teams import add_team

    add_team(db, "eng", ("C0ENG",))
    missing = training.start_retrain(db, alice, team="ops")
    assert not missing.ok and "no team 'ops'" in missing.message and training.current_job_id(db) is None
    out = training.start_retrain(db, alice, team="eng")
    assert out.ok and "for team eng" in out.message, out.message
    assert get_job(db, training.current_job_id(db)).params == {"team": "eng"}
    assert training.cancel_job(db, alice).ok

    _register(db, tmp_path, "v1", GOOD)
    assert training.promote(db, alice, "v1", force=True).ok  # the shared adapter
    register_adapter(db, version="v2", path=str(tmp_path / "v1"), base_model="tiny", method="full", params={},
                     dataset_hash="h", dataset_size=10, metrics=GOOD, team="eng")
    assert training.promote(db, alice, "v2", force=True).ok
    assert "team eng: **v2**" in training.verdict_markdown(db, None)
    assert dict(zip(training.adapters_frame(db)["version"], training.adapters_frame(db)["team"])) == {
        "v1": "", "v2": "eng"}
    back = training.rollback(db, alice, team="eng")
    assert back.ok and back.message == "Rolled back team eng: from v2 to the shared adapter.", back.message
    assert active_adapter(db, "eng") is None and active_adapter(db).version == "v1"  # the shared one untouched
    assert "team eng: the shared adapter" in training.verdict_markdown(db, None)
    again = training.rollback(db, alice, team="eng")
    assert not again.ok and "team 'eng' has no active adapter of its own" in again.message
    assert not training.rollback(db, alice, team="ops").ok and active_adapter(db).version == "v1"
