"""Retraining jobs: the queue's front door, the worker's mechanics (child process, heartbeat, cancel, stale
recovery, exactly-once) and, in the slow tests at the end, real retraining jobs on the tiny base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from finetune.jobs.protocol import job_dir
from finetune.jobs.queue import describe_job, format_duration, job_eta_s, request_retrain
from finetune.jobs.worker import Worker, WorkerConfig
from store import ConfigError, open_db
from store.jobs import (
    JobAlreadyActive,
    claim_next_job,
    enqueue_job,
    get_job,
    heartbeat,
    list_jobs,
    request_cancel,
    train_steps,
)
from store.text import now
from tests.conftest import REPO

CHILD = (sys.executable, "-m", "tests.finetune.jobs_child")


class RecordingNotifier:
    """A JobNotifier that keeps what it was told (the Slack one is tested in tests/bot)."""

    def __init__(self):
        self.events: list[tuple] = []
        self.lock = threading.Lock()

    def job_started(self, job):
        with self.lock:
            self.events.append(("started", job.id, None))

    def job_progress(self, job, progress):
        with self.lock:
            self.events.append(("progress", job.id, dict(progress)))

    def job_finished(self, job, outcome):
        with self.lock:
            self.events.append(("finished", job.id, dict(outcome)))

    def of(self, kind: str, job_id: int | None = None) -> list:
        return [e[2] for e in self.events if e[0] == kind and (job_id is None or e[1] == job_id)]


def fast_config(**kw) -> WorkerConfig:
    values = dict(child_command=CHILD, heartbeat_interval_s=0.2, stale_after_s=2.0, poll_interval_s=0.1,
                  cancel_grace_s=1.0, progress_notify_interval_s=0.0)
    values.update(kw)
    return WorkerConfig(**values)


def scripted(db, **params):
    return enqueue_job(db, kind="scripted", requester="U_TEST", params=params, exclusive=False)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# --------------------------------------------------------------------------------------------------
# The queue's front door (fast)
# --------------------------------------------------------------------------------------------------

def test_request_retrain_queues_one_and_refuses_a_second_naming_the_first(db):
    job = request_retrain(db, requester="U_ADMIN", reply_channel="C1", reply_thread_ts="123.4")
    assert (job.kind, job.status, job.requester, job.reply_channel) == ("retrain", "queued", "U_ADMIN", "C1")
    with pytest.raises(JobAlreadyActive) as info:
        request_retrain(db, requester="U_OTHER")
    assert info.value.job.id == job.id
    assert f"job {job.id} (requested by U_ADMIN) is queued" == describe_job(info.value.job)
    assert len(list_jobs(db)) == 1


def test_a_running_job_is_described_with_its_progress_and_eta(db):
    job = request_retrain(db, requester="U_ADMIN")
    claim_next_job(db, worker_id="w1")
    heartbeat(db, job.id, progress={"phase": "training", "step": 12, "total": 40, "loss": 1.2345, "eta_s": 125.0,
                                    "updated_at": now()})
    running = get_job(db, job.id)
    assert 120 <= job_eta_s(running) <= 125
    text = describe_job(running)
    assert text.startswith(f"job {job.id} (requested by U_ADMIN) is running: training step 12/40, loss 1.234; about 2 min")
    with pytest.raises(JobAlreadyActive) as info:
        request_retrain(db, requester="U_OTHER")
    assert "about 2 min" in describe_job(info.value.job)


def test_eta_counts_down_from_the_last_report_and_is_unknown_without_one(db):
    import datetime as dt

    job = request_retrain(db, requester="U")
    claim_next_job(db, worker_id="w1")
    stamp = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=100)).isoformat()
    heartbeat(db, job.id, progress={"phase": "training", "eta_s": 30.0, "updated_at": stamp})
    assert job_eta_s(get_job(db, job.id)) == 0.0
    heartbeat(db, job.id, progress={"phase": "preparing"})
    assert job_eta_s(get_job(db, job.id)) is None
    assert "end time not known yet" in describe_job(get_job(db, job.id))
    assert format_duration(59) == "59s" and format_duration(125) == "2 min 05s" and format_duration(3700) == "1 h 01 min"


def test_request_retrain_refuses_unknown_parameters(db):
    with pytest.raises(ConfigError, match="unknown retrain parameter.*colour"):
        request_retrain(db, requester="U", params={"colour": "red"})
    with pytest.raises(ConfigError, match="`train` must be an object"):
        request_retrain(db, requester="U", params={"train": 3})
    # The playground and `kbloop jobs` queue through here: the rules `kbloop train` applies, before queueing.
    with pytest.raises(ConfigError, match="epochs"):
        request_retrain(db, requester="U", params={"train": {"epochs": 1e9}})
    with pytest.raises(ConfigError, match="max length must be from 64"):
        request_retrain(db, requester="U", params={"train": {"max_length": 100_000_000}})
    assert list_jobs(db) == []


def test_a_retrain_job_starts_where_kbloop_train_does_unless_told():
    """No `start_from` in the job: TrainConfig's default (continue from the active adapter), as `kbloop train`
    and the playground's Train; /kb-retrain's `from=base` reaches the job as start_from."""
    from bot.commands import parse_retrain_args
    from finetune.training.config import TrainConfig

    assert TrainConfig(base="tiny").start_from is None
    assert parse_retrain_args("from=base") == {"train": {"start_from": "base"}}
    assert parse_retrain_args("force from=v3") == {"force": True, "train": {"start_from": "v3"}}


def test_request_retrain_accepts_a_start(db):
    job = request_retrain(db, requester="U", params={"train": {"start_from": "base"}})
    assert job.params == {"train": {"start_from": "base"}}


@pytest.mark.parametrize("kw, message", [
    ({"launcher": "mpirun"}, "launcher must be one of python, accelerate, torchrun"),
    ({"nproc": 0}, "nproc must be at least 1"),
    ({"nproc": 2}, "nproc > 1 needs launcher accelerate or torchrun"),
    ({"heartbeat_interval_s": 10, "stale_after_s": 15}, "more than twice heartbeat_interval_s"),
])
def test_worker_config_refuses_settings_that_cannot_work(kw, message):
    with pytest.raises(ConfigError, match=message):
        WorkerConfig(**kw)


# --------------------------------------------------------------------------------------------------
# The protocol between the worker and its child (fast)
# --------------------------------------------------------------------------------------------------

def test_the_job_messages_survive_a_json_round_trip():
    from finetune.jobs.protocol import ChildResult, JobOutcome, JobProgress

    progress = JobProgress(phase="training", step=12, total=40, loss=1.25, epoch=0.5, eta_s=30.0,
                           updated_at=now(), dataset_hash="abc", n_examples=9, extra={"gpu": "none"})
    assert JobProgress.from_json(progress.to_json()) == progress
    # What is stored: the documented keys (`total`, not `total_steps`), None fields left out.
    assert set(progress.to_dict()) == {"phase", "step", "total", "loss", "epoch", "eta_s", "updated_at",
                                       "dataset_hash", "n_examples", "gpu"}
    assert JobProgress(phase="preparing").to_dict() == {"phase": "preparing"}
    child = ChildResult(status="succeeded", version="v3", passed=True, reasons=["ok"], table="t",
                        metrics={"loss": 1.0}, active_version="v2", dataset_hash="abc", n_examples=9,
                        start="continued from v2", elapsed_s=1.5, extra={"steps": 5})
    assert ChildResult.from_json(child.to_json()) == child
    assert child.to_dict()["steps"] == 5  # a runner's own keys sit beside the known ones
    outcome = JobOutcome.from_child(child, status="succeeded", outcome="promoted", promoted=True, message="m")
    assert JobOutcome.from_json(outcome.to_json()) == outcome
    assert (outcome.version, outcome.start, outcome.extra, outcome.error) == ("v3", "continued from v2",
                                                                             {"steps": 5}, None)
    failed = JobOutcome.failed("no data")
    assert failed.to_dict() == {**JobOutcome().to_dict(), "reasons": ["no data"], "message": "failed: no data",
                                "error": "no data"}


def test_the_child_and_the_worker_speak_one_vocabulary_of_statuses(db, db_path, kbloop_home):
    """The child reports the statuses the store's jobs table uses (not "done"); anything else is refused."""
    from finetune.jobs.protocol import FINAL_STATUSES, ChildResult, JobOutcome, read_child_result, write_child_result
    from store.jobs import finish_job

    assert FINAL_STATUSES == ("succeeded", "failed", "cancelled")
    for status in ("done", "finished"):
        with pytest.raises(ValueError, match="succeeded, failed, cancelled"):
            ChildResult(status=status)
        with pytest.raises(ValueError):
            JobOutcome(status=status)
    # Every final status of the protocol is one the store accepts.
    for status in FINAL_STATUSES:
        job = enqueue_job(db, kind="scripted", requester="U", exclusive=False)
        claim_next_job(db, worker_id="w")
        assert finish_job(db, job.id, status=status, result={}).status == status
    # The child's result file round-trips through the worker's reader; a missing or broken one reads None.
    write_child_result(kbloop_home, 7, ChildResult(status="failed", error="boom"))
    assert read_child_result(job_dir(kbloop_home, 7)) == ChildResult(status="failed", error="boom")
    assert read_child_result(kbloop_home, 7).error == "boom"
    (job_dir(kbloop_home, 7) / "outcome.json").write_text("{not json")
    assert read_child_result(kbloop_home, 7) is None and read_child_result(kbloop_home, 8) is None


def test_the_worker_and_its_child_import_the_protocol_not_each_other():
    import ast

    def imports(module: str) -> set[str]:
        tree = ast.parse((REPO / "finetune" / f"{module}.py").read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    jobs, jobrun = imports("jobs/worker"), imports("jobs/child")
    assert "finetune.jobs.child" not in jobs and not {"finetune.jobs.worker", "finetune.jobs.queue"} & jobrun
    assert "finetune.jobs.protocol" in jobs and "finetune.jobs.protocol" in jobrun
    assert not {m for m in imports("jobs/protocol") if m.startswith(("finetune", "bot", "playground", "kbloop"))}


def test_rank_0_and_a_helper_rank_train_on_the_same_list_once_a_correction_exists(db, kbloop_home, tiny_path,
                                                                                   monkeypatch):
    """Under torchrun / accelerate every rank runs finetune.jobs.child; DDP needs each rank's training list to be
    rank 0's, item for item and in order, or the ranks train different models (issue 17)."""
    import finetune.training.trainer
    from finetune.jobs import child as jobrun
    from store.examples import list_examples, review_example
    from store.interactions import record_interaction, record_vote
    from tests.finetune.registry_fixtures import seed_store

    seed_store(db, n_examples=24)
    # A correction: an answer voted down with the right one, approved by a curator.
    asked = record_interaction(db, question="Where is the Berlin office?", answer="No idea.", source="playground")
    record_vote(db, interaction_id=asked, user_id="U1", vote=-1, correction="Ask the office team in #berlin-office.",
                source="playground")
    [pending] = list_examples(db, status="pending")
    review_example(db, pending.id, decision="approved", reviewer="curator")
    request_retrain(db, requester="U")
    job = claim_next_job(db, worker_id="w")

    class Captured(Exception):
        pass

    lists = {}

    def capture(config, examples, out_dir, **kw):  # train_adapter, as both ranks call it
        lists[os.environ["RANK"]] = list(examples)
        raise Captured

    # Rank 0 trains through the registry, which binds the name when it is imported; helper ranks look it up.
    import finetune.registry.candidates

    monkeypatch.setattr(finetune.training.trainer, "train_adapter", capture)
    monkeypatch.setattr(finetune.registry.candidates, "train_adapter", capture, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(Captured):
            jobrun.run_retrain(db, job, home=kbloop_home, base=tiny_path, should_stop=lambda: False,
                               reporter=jobrun.ProgressReporter(db, job, is_main=rank == "0"))
    assert lists["0"] == lists["1"] and len(lists["0"]) > 1
    assert (lists["0"][-1].question, lists["0"][-1].answer) == ("Where is the Berlin office?",
                                                                 "Ask the office team in #berlin-office.")


def test_launchers_run_the_same_module_with_n_processes(db_path, kbloop_home, monkeypatch):
    import finetune.jobs.launch

    monkeypatch.setattr(finetune.jobs.launch, "has_gpu", lambda: False)
    job = enqueue_job(open_db(db_path), kind="retrain", requester="U")
    args = [str(job.id), "--db", str(db_path), "--home", str(kbloop_home), "--base", "tiny"]

    def cmd(**kw):
        return Worker(db_path=db_path, home=kbloop_home, config=WorkerConfig(**kw)).child_command(job)

    assert cmd()[:3] == [sys.executable, "-m", "finetune.jobs.child"] and cmd()[3:10] == args
    wrap = [sys.executable, "-m", "finetune.jobs.child", "--exec"]
    torchrun = cmd(launcher="torchrun", nproc=2)
    assert torchrun[:7] == wrap + [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in torchrun and torchrun[torchrun.index("-m", 6):][:2] == ["-m", "finetune.jobs.child"]
    assert torchrun[-9:-2] == args
    accel = cmd(launcher="accelerate", nproc=2)
    assert accel[:7] == wrap + [sys.executable, "-m", "accelerate.commands.launch"] and "--num_processes=2" in accel
    assert accel[accel.index("-m", 6):][:2] == ["-m", "finetune.jobs.child"] and "--cpu" in accel
    monkeypatch.setattr(finetune.jobs.launch, "has_gpu", lambda: True)
    gpu = cmd(launcher="accelerate", nproc=2)
    assert "--multi_gpu" in gpu and "--cpu" not in gpu


def test_a_job_of_a_dead_local_worker_is_failed_at_once_and_the_requester_told(db, db_path, kbloop_home):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    job = request_retrain(db, requester="U_ADMIN")
    claim_next_job(db, worker_id=f"{socket.gethostname()}:{dead.pid}:abc123")
    notifier = RecordingNotifier()
    w = Worker(db_path=db_path, home=kbloop_home, config=fast_config(stale_after_s=600), notifier=notifier)
    failed = w.recover_abandoned()
    assert [j.id for j in failed] == [job.id]
    job = get_job(db, job.id)
    assert job.status == "failed" and f"process {dead.pid} is gone" in job.error
    assert w.flush_notices(timeout=10)
    [outcome] = notifier.of("finished", job.id)
    assert outcome["status"] == "failed" and outcome["promoted"] is False and "died" in outcome["reasons"][0]


def test_a_job_of_a_remote_worker_is_failed_only_once_its_heartbeat_is_stale(db, db_path, kbloop_home):
    job = request_retrain(db, requester="U_ADMIN")
    claim_next_job(db, worker_id="other-host:123:abc")
    w = Worker(db_path=db_path, home=kbloop_home, config=fast_config(heartbeat_interval_s=0.1, stale_after_s=0.5))
    assert w.recover_abandoned() == [] and get_job(db, job.id).status == "running"
    time.sleep(0.6)
    assert [j.id for j in w.recover_abandoned()] == [job.id]
    assert "stopped responding" in get_job(db, job.id).error


class BlockingNotifier(RecordingNotifier):
    """A Slack that hangs: every notice blocks until `release` is set (or `block_s` passes)."""

    def __init__(self, block_s: float = 60.0):
        super().__init__()
        self.release = threading.Event()
        self.block_s = block_s
        self.calls = 0

    def _block(self):
        with self.lock:
            self.calls += 1
        self.release.wait(self.block_s)

    def job_started(self, job):
        self._block()
        super().job_started(job)

    def job_progress(self, job, progress):
        self._block()
        super().job_progress(job, progress)

    def job_finished(self, job, outcome):
        self._block()
        super().job_finished(job, outcome)


def _age_heartbeat(db, job_id: int, seconds: float = 3600) -> None:
    import datetime as dt

    stamp = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)).isoformat(timespec="microseconds")
    from store.db import write_transaction

    with write_transaction(db):
        db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", [stamp, job_id])


def test_a_stale_job_of_a_live_local_worker_is_left_running(db, db_path, kbloop_home):
    """Issue 16 #3: a stale heartbeat alone does not prove a worker on this host dead; its process says."""
    job = request_retrain(db, requester="U_ADMIN")
    owner = WorkerConfig().worker_id  # names this (live) process, as a worker in it would
    claim_next_job(db, worker_id=owner)
    _age_heartbeat(db, job.id)
    w = Worker(db_path=db_path, home=kbloop_home, config=fast_config(heartbeat_interval_s=0.1, stale_after_s=0.5))
    assert w.recover_abandoned() == []
    assert get_job(db, job.id).status == "running"


def test_a_job_whose_worker_pid_now_belongs_to_another_process_is_failed_at_once(db, db_path, kbloop_home):
    """The pid is alive but started at another time than the worker that claimed the job: pid reuse."""
    from store.processes import process_start_ticks

    ticks = process_start_ticks(os.getpid())
    assert ticks is not None  # Linux: /proc tells when a process started
    owner = WorkerConfig().worker_id
    assert f":{os.getpid()}@{ticks}:" in owner
    job = request_retrain(db, requester="U_ADMIN")
    claim_next_job(db, worker_id=owner.replace(f"@{ticks}:", f"@{ticks + 1}:"))
    w = Worker(db_path=db_path, home=kbloop_home, config=fast_config(stale_after_s=600))
    assert [j.id for j in w.recover_abandoned()] == [job.id]
    assert "is gone" in get_job(db, job.id).error


def test_fail_stale_jobs_spares_jobs_whose_owner_is_known_alive(db):
    from store.jobs import fail_stale_jobs

    live = request_retrain(db, requester="U")
    claim_next_job(db, worker_id="here:1:live")
    _age_heartbeat(db, live.id)
    assert fail_stale_jobs(db, stale_after_s=1, owner_alive=lambda worker_id: worker_id == "here:1:live") == []
    assert get_job(db, live.id).status == "running"
    [failed] = fail_stale_jobs(db, stale_after_s=1, owner_alive=lambda worker_id: False)
    assert failed.id == live.id and failed.status == "failed" and "stopped responding" in failed.error


def test_notices_never_wait_for_the_notifier_and_stay_bounded_and_in_order(db, db_path, kbloop_home):
    """A hung Slack must not hold up the worker: notices queue (bounded) and go out in order from another thread."""
    job = request_retrain(db, requester="U_ADMIN")
    slack = BlockingNotifier()
    w = Worker(db_path=db_path, home=kbloop_home, config=fast_config(max_pending_notices=4), notifier=slack)
    t0 = time.monotonic()
    w._notify("job_started", job)
    for step in range(50):
        w._notify("job_progress", job, {"phase": "training", "step": step})
    w._notify("job_finished", job, {"status": "succeeded"})
    assert time.monotonic() - t0 < 0.5  # nothing waited for the blocked notifier
    assert w.pending_notices() <= 4
    slack.release.set()
    assert w.flush_notices(timeout=10)
    kinds = [e[0] for e in slack.events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds) == {"started", "progress", "finished"}
    steps = [p["step"] for p in slack.of("progress")]
    assert steps == sorted(steps) and steps[-1] == 49  # older progress gave way to newer, never the reverse


def test_an_empty_dataset_fails_the_job_with_a_clear_reason_without_starting_a_child(db, db_path, kbloop_home):
    job = request_retrain(db, requester="U_ADMIN")
    notifier = RecordingNotifier()
    done = Worker(db_path=db_path, home=kbloop_home, config=fast_config(), notifier=notifier).run_once()
    assert done.id == job.id and done.status == "failed"
    assert "no approved examples" in done.error
    assert not (job_dir(kbloop_home, job.id) / "child.log").exists()
    assert [e[0] for e in notifier.events] == ["started", "finished"]


def test_cli_jobs_retrain_list_show_and_cancel(db, kbloop_home):
    from kbloop.cli import app
    from kbloop.cli.app import run

    assert run(app, ["jobs", "retrain"]) == 0
    [job] = list_jobs(db)
    assert job.kind == "retrain" and job.requester.startswith("cli:")
    assert run(app, ["jobs", "retrain"]) == 1  # one at a time, and the refusal names the job
    assert run(app, ["jobs"]) == 0
    assert run(app, ["jobs", "show", str(job.id)]) == 0
    assert run(app, ["jobs", "cancel", str(job.id)]) == 0
    assert get_job(db, job.id).status == "cancelled"
    assert run(app, ["jobs", "cancel", str(job.id)]) == 1
    assert run(app, ["jobs", "--status", "bogus"]) == 1
    assert run(app, ["worker", "--once", "--launcher", "mpirun"]) == 1


def test_cli_messages(db, capsys):
    from kbloop.cli import app
    from kbloop.cli.app import run

    run(app, ["jobs", "retrain"])
    capsys.readouterr()
    assert run(app, ["jobs", "retrain"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kbloop: not queued: job 1 (requested by cli:") and "is queued" in err
    assert run(app, ["worker", "--once", "--nproc", "2"]) == 1
    assert "nproc > 1 needs launcher accelerate or torchrun" in capsys.readouterr().err


def test_kbloop_worker_once_reports_to_slack_when_a_bot_token_is_set(db, monkeypatch, capsys):
    from kbloop.cli import app
    from kbloop.cli.app import run
    from kbloop.cli.worker import build_job_notifier
    from kbloop.settings import load_settings
    from tests.fakes.slack_api import FakeSlackAPI

    assert build_job_notifier(load_settings()) is None
    assert run(app, ["worker", "--once"]) == 0 and "No queued jobs." in capsys.readouterr().out
    with FakeSlackAPI() as fake:
        monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test")
        monkeypatch.setenv("KBLOOP_SLACK_API_URL", fake.url)
        monkeypatch.setenv("KBLOOP_NOTIFY_CHANNEL", "CNOTIFY")
        job = request_retrain(db, requester="U_ADMIN", reply_channel="CADMIN", reply_thread_ts="1700000000.000100")
        assert run(app, ["worker", "--once"]) == 1  # the job failed: nothing approved to train on
        assert f"job {job.id} failed: there are no approved examples" in capsys.readouterr().err
        posts = fake.wait_for("chat.postMessage", 4, timeout=10)  # started + finished, in two places
        told = [p.params for p in posts if "no approved examples" in p.params.get("text", "")]
        assert {p["channel"] for p in told} == {"CADMIN", "CNOTIFY"}
        assert [p.get("thread_ts") for p in told if p["channel"] == "CADMIN"] == ["1700000000.000100"]


# --------------------------------------------------------------------------------------------------
# The worker's mechanics with a scripted child (spawn processes: slow marker, but seconds each)
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_job_runs_in_a_child_process_reporting_progress_through_the_store(db, db_path, kbloop_home, tmp_path):
    marker = tmp_path / "marker.txt"
    job = scripted(db, steps=5, step_s=0.3, marker=str(marker))
    notifier = RecordingNotifier()
    done = Worker(db_path=db_path, home=kbloop_home, config=fast_config(), notifier=notifier).run_once()
    assert done.id == job.id and done.status == "succeeded", done.error
    child_pid = int(marker.read_text().split()[1])
    assert child_pid != os.getpid() and done.pid == child_pid
    assert [s["step"] for s in train_steps(db, f"job-{job.id}")] == [1, 2, 3, 4, 5]
    assert done.progress["step"] == 5 and done.progress["total"] == 5
    kinds = [e[0] for e in notifier.events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "progress" in kinds
    assert notifier.of("progress")[0]["phase"] == "training"
    assert notifier.of("finished")[0]["status"] == "succeeded"
    assert json.loads((job_dir(kbloop_home, job.id) / "outcome.json").read_text())["steps"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("fail, reason", [
    ("error", "RuntimeError: scripted failure"),
    ("config", "the scripted setting cannot work"),
    ("kill", "killed by SIGKILL (out of memory?)"),
])
def test_a_crashing_child_fails_its_job_and_the_worker_runs_the_next(db, db_path, kbloop_home, fail, reason):
    bad = scripted(db, steps=4, fail=fail)
    good = scripted(db, steps=2)
    notifier = RecordingNotifier()
    w = Worker(db_path=db_path, home=kbloop_home, config=fast_config(), notifier=notifier)
    first = w.run_once()
    assert first.id == bad.id and first.status == "failed" and reason in first.error
    if fail == "config":  # a KbloopError is the user's to fix: its message alone, as the CLI prints it
        assert first.error == reason
    assert reason in notifier.of("finished", bad.id)[0]["reasons"][0]
    second = w.run_once()
    assert second.id == good.id and second.status == "succeeded"


@pytest.mark.slow
@pytest.mark.parametrize("ignore_term", [False, True])
def test_cancelling_a_running_job_stops_the_child(db, db_path, kbloop_home, tmp_path, ignore_term):
    marker = tmp_path / "marker.txt"
    job = scripted(db, steps=200, step_s=0.1, marker=str(marker), ignore_term=ignore_term)
    notifier = RecordingNotifier()
    w = Worker(db_path=db_path, home=kbloop_home, config=fast_config(cancel_grace_s=1.0), notifier=notifier)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("job", w.run_once()))
    t.start()
    wait_until(lambda: get_job(db, job.id).progress.get("step", 0) >= 2)
    request_cancel(db, job.id)
    t.join(timeout=30)
    assert not t.is_alive()
    done = result["job"]
    assert done.status == "cancelled" and "cancelled by an admin" in done.error
    child_pid = int(marker.read_text().split()[1])
    assert not _alive(child_pid)
    assert "done" not in marker.read_text()
    assert notifier.of("finished", job.id)[0]["status"] == "cancelled"


@pytest.mark.slow
def test_a_notifier_blocking_past_stale_after_does_not_let_a_second_worker_fail_the_live_job(db, db_path, kbloop_home):
    """Issue 16 #3: Slack hangs for longer than stale_after_s on every notice while a job runs; the job's
    heartbeat stays fresh, and a second worker polling all along fails nothing."""
    stale_after_s = 1.0
    job = scripted(db, steps=12, step_s=0.25)  # about 3 s of "training"
    slack = BlockingNotifier(block_s=3 * stale_after_s)
    # A names another host, so B cannot ask the process: only the heartbeat speaks for the job.
    a = Worker(db_path=db_path, home=kbloop_home, notifier=slack,
               config=fast_config(heartbeat_interval_s=0.2, stale_after_s=stale_after_s, notice_flush_s=0.5,
                                  worker_id="far-host:1:a"))
    b = Worker(db_path=db_path, home=kbloop_home,
               config=fast_config(heartbeat_interval_s=0.2, stale_after_s=stale_after_s))
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("job", a.run_once()))
    runner.start()
    failed_by_b, oldest_beat = [], 0.0
    import datetime as dt

    while runner.is_alive():
        failed_by_b += b.recover_abandoned()
        current = get_job(db, job.id)
        if current.status == "running" and current.heartbeat_at:
            age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(current.heartbeat_at)).total_seconds()
            oldest_beat = max(oldest_beat, age)
        time.sleep(0.05)
    runner.join()
    slack.release.set()
    assert failed_by_b == []
    assert result["job"].status == "succeeded", result["job"].error
    assert oldest_beat < stale_after_s
    assert slack.calls >= 1  # the notifier was called, and blocked, while the job ran
    assert a.flush_notices(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


WORKER_SCRIPT = """
import os, signal, socket, sys, threading
from finetune.jobs.worker import Worker, WorkerConfig
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
child = None if sys.argv[4] == "real" else (sys.executable, "-m", "tests.finetune.jobs_child")
cfg = WorkerConfig(child_command=child, base_model="tiny", heartbeat_interval_s=0.2,
                   stale_after_s=2.0, poll_interval_s=0.05, cancel_grace_s=1.0, worker_id=f"{socket.gethostname()}:{os.getpid()}:{sys.argv[3]}")
Worker(db_path=sys.argv[1], home=sys.argv[2], config=cfg).run_forever(stop)
"""


def start_worker_process(db_path, home, name: str, *, child: str = "scripted") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(db_path), str(home), name, child], env=env,
                            cwd=str(REPO))


@pytest.mark.slow
def test_two_workers_started_at_once_run_every_job_exactly_once(db, db_path, kbloop_home, tmp_path):
    marker = tmp_path / "marker.txt"
    jobs = [scripted(db, steps=2, step_s=0.05, marker=str(marker)) for _ in range(6)]
    workers = [start_worker_process(db_path, kbloop_home, name) for name in ("a", "b")]
    try:
        wait_until(lambda: all(get_job(db, j.id).status in ("succeeded", "failed") for j in jobs), timeout=90)
    finally:
        for p in workers:
            p.send_signal(signal.SIGTERM)
        for p in workers:
            p.wait(timeout=30)
    lines = marker.read_text().split("\n")
    started = sorted(int(ln.split()[0]) for ln in lines if ln and not ln.startswith("done"))
    finished = sorted(int(ln.split()[1]) for ln in lines if ln.startswith("done"))
    assert started == finished == [j.id for j in jobs]
    statuses = {get_job(db, j.id).status for j in jobs}
    assert statuses == {"succeeded"}
    assert len({get_job(db, j.id).worker_id for j in jobs}) >= 1


@pytest.mark.slow
def test_kill_9_of_the_worker_takes_its_child_along_and_the_next_worker_fails_the_job(db, db_path, kbloop_home, tmp_path):
    marker = tmp_path / "marker.txt"
    job = scripted(db, steps=300, step_s=0.1, marker=str(marker))
    proc = start_worker_process(db_path, kbloop_home, "doomed")
    wait_until(lambda: get_job(db, job.id).progress.get("step", 0) >= 2)
    child_pid = int(marker.read_text().split()[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not _alive(child_pid), timeout=10)  # the death signal took the training along
    nxt = scripted(db, steps=2, marker=str(marker))
    notifier = RecordingNotifier()
    w = Worker(db_path=db_path, home=kbloop_home, config=fast_config(stale_after_s=600), notifier=notifier)
    done = w.run_once()
    dead = get_job(db, job.id)
    assert dead.status == "failed" and "died while running the job" in dead.error
    assert notifier.of("finished", job.id)[0]["status"] == "failed"
    assert done.id == nxt.id and done.status == "succeeded"
    assert f"done {job.id}" not in marker.read_text()


# --------------------------------------------------------------------------------------------------
# Real retraining jobs on the tiny base (train: slow). One workspace for the module, used in order.
# --------------------------------------------------------------------------------------------------

N_EXAMPLES = 16
# Enough steps for the candidate to beat the base clearly on the held-out loss; not a memorisation run.
# No passages in the prompts: 5x fewer tokens per step on two CPU cores (the engine uses the same k).
# From the base every time: these tests are about jobs, not continued training (tests/finetune/test_registry.py).
TRAIN = {"method": "lora", "epochs": 8, "batch_size": 4, "k_passages": 0, "start_from": "base"}


class Workspace:
    def __init__(self, home: Path):
        self.home = home
        self.db_path = home / "kbloop.db"
        self.notifier = RecordingNotifier()

    @property
    def db(self):
        return open_db(self.db_path)

    def worker(self, **kw) -> Worker:
        cfg = dict(base_model="tiny", heartbeat_interval_s=0.5, stale_after_s=5.0, poll_interval_s=0.2,
                   progress_notify_interval_s=0.0)
        cfg.update(kw)
        return Worker(db_path=self.db_path, home=self.home, config=WorkerConfig(**cfg), notifier=self.notifier)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from store.documents import import_documents
    from store.examples import NewExample, add_examples
    from tests.conftest import SAMPLES

    ws = Workspace(tmp_path_factory.mktemp("jobs") / "home")
    db = ws.db
    import_documents(db, [SAMPLES / "kb"])
    rows = [json.loads(ln) for ln in (SAMPLES / "qa.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    add_examples(db, [NewExample(question=r["instruction"], answer=r["output"]) for r in rows[:N_EXAMPLES]])
    ws.spare = [NewExample(question=r["instruction"], answer=r["output"]) for r in rows[N_EXAMPLES:N_EXAMPLES + 3]]
    ws.first = request_retrain(db, requester="U_ADMIN", reply_channel="C1", params={"train": TRAIN})
    ws.first = ws.worker().run_once()
    return ws


@pytest.mark.slow
def test_a_retraining_job_trains_in_a_child_evaluates_and_promotes(workspace):
    from store.adapters import active_adapter

    job, db = workspace.first, workspace.db
    assert job.status == "succeeded", job.error
    r = job.result
    assert r["outcome"] == "promoted" and r["promoted"] is True and r["version"] == active_adapter(db).version
    assert r["n_examples"] == N_EXAMPLES and r["dataset_hash"] and r["active_version"] is None
    assert "held-out loss" in r["table"] and "base" in r["table"]
    assert job.pid != os.getpid()
    steps = train_steps(db, f"job-{job.id}")
    assert steps and steps[-1]["step"] == job.progress["total"] and all(s["loss"] is not None for s in steps)
    progress = workspace.notifier.of("progress", job.id)
    assert any(p.get("phase") == "training" and p.get("eta_s") is not None and p.get("loss") for p in progress)
    assert any(p.get("phase") == "evaluating" for p in progress)
    [finished] = workspace.notifier.of("finished", job.id)
    assert finished["promoted"] and finished["table"] == r["table"]


@pytest.mark.slow
def test_an_unchanged_dataset_is_not_trained_again(workspace):
    from store.adapters import list_adapters

    db = workspace.db
    before = len(list_adapters(db))
    job = request_retrain(db, requester="U_ADMIN")
    done = workspace.worker().run_once()
    assert done.id == job.id and done.status == "succeeded"
    assert done.result["outcome"] == "unchanged" and "have not changed" in done.result["message"]
    assert len(list_adapters(db)) == before
    assert not (job_dir(workspace.home, job.id) / "child.log").exists()


@pytest.mark.slow
def test_a_candidate_worse_than_the_active_adapter_is_kept_and_the_requester_told_why(workspace):
    from store.adapters import active_adapter, get_adapter
    from store.examples import add_examples

    db = workspace.db
    v1 = active_adapter(db).version
    add_examples(db, workspace.spare[:1])  # the data changed: a new job trains
    # One pass at a vanishing learning rate: the candidate is the base in all but name.
    job = request_retrain(db, requester="U_ADMIN", reply_channel="C1",
                          params={"train": {**TRAIN, "epochs": 1, "learning_rate": 1e-7}})
    done = workspace.worker().run_once()
    assert done.id == job.id and done.status == "succeeded", done.error
    r = done.result
    assert r["outcome"] == "candidate" and r["promoted"] is False and r["active_version"] == v1
    assert active_adapter(db).version == v1
    candidate = get_adapter(db, r["version"])
    assert candidate.status == "candidate" and candidate.note.startswith("not promoted: ")
    [told] = workspace.notifier.of("finished", job.id)
    assert told["promoted"] is False and told["table"]
    reasons = " ".join(told["reasons"])
    assert f"higher than {v1}'s" in reasons and any(ch.isdigit() for ch in reasons)
    assert "not promoted" in told["message"] and f"{v1} stays active" in told["message"]


@pytest.mark.slow
def test_torchrun_launcher_trains_the_same_job_with_two_cpu_processes(workspace):
    from store.adapters import get_adapter

    db = workspace.db
    job = request_retrain(db, requester="U_ADMIN", params={"force": True, "train": {**TRAIN, "epochs": 2}})
    done = workspace.worker(launcher="torchrun", nproc=2).run_once()
    log = (job_dir(workspace.home, job.id) / "child.log").read_text(errors="replace")
    assert done.id == job.id and done.status == "succeeded", (done.error, log[-2000:])
    assert "rank 0" in log and "rank 1" in log  # two training processes ran the job
    steps = train_steps(db, f"job-{job.id}")
    # 16 examples minus the held-out ones, batch 4 per process x 2 processes: half the single-process steps.
    n_train = done.result["n_examples"] - get_adapter(db, done.result["version"]).metrics["n_heldout"]
    assert steps[-1]["step"] == done.progress["total"] == 2 * -(-n_train // 8)


# Last in the module: its engine reads the sample KB's embeddings from the run's embedding cache, which
# tests/cli/test_demo.py (started beside this module under xdist) fills in its first two minutes.
@pytest.mark.slow
def test_kill_9_during_training_fails_the_job_keeps_the_active_adapter_and_the_next_job_succeeds(workspace):
    from finetune.serving.engine import Engine, EngineConfig
    from store.adapters import active_adapter, list_adapters

    db = workspace.db
    v_active = active_adapter(db).version
    n_adapters = len(list_adapters(db))
    job = request_retrain(db, requester="U_ADMIN", params={"force": True, "train": TRAIN})
    proc = start_worker_process(workspace.db_path, workspace.home, "doomed", child="real")
    try:
        running = wait_until(lambda: (j := get_job(db, job.id)).progress.get("phase") == "training"
                             and j.progress.get("step", 0) >= 1 and j, timeout=300, interval=0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_until(lambda: not _alive(running.pid), timeout=15)  # the training died with its worker

    nxt = workspace.worker(stale_after_s=600).run_once()  # a restarted worker
    dead = get_job(db, job.id)
    assert dead.status == "failed" and "died while running the job" in dead.error
    assert workspace.notifier.of("finished", job.id)[-1]["status"] == "failed"
    assert nxt is None  # nothing else was queued
    assert len(list_adapters(db)) == n_adapters and active_adapter(db).version == v_active
    # What the killed child had written is only a temporary folder, which no one reads.
    assert sorted(p.name for p in (workspace.home / "adapters").iterdir() if not p.name.startswith(".tmp-")) == \
        sorted(a.version for a in list_adapters(db))

    with Engine(db_path=workspace.db_path, home=workspace.home, base_model="tiny",
                config=EngineConfig(max_new_tokens=16, time_limit_s=60)).start() as engine:
        assert engine.wait_ready(300), engine.error
        answer = engine.answer("How do I connect to the VPN?", record=False)
        assert answer.adapter_version == v_active and answer.text

    again = request_retrain(db, requester="U_ADMIN", params={"force": True, "train": {**TRAIN, "epochs": 1}})
    done = workspace.worker().run_once()
    assert done.id == again.id and done.status == "succeeded", done.error
    assert len(list_adapters(db)) == n_adapters + 1
