"""THE product loop, end to end, on the tiny base, with every part real:

ask in Slack (signed HTTP to the bot's HTTP server, answered by the real Engine, Web API calls to a fake
Slack on loopback) -> 👎 with a correction (the modal submission) -> `kbloop review approve ID` -> an admin's
`/kb-retrain` -> the worker trains in a child process, evaluates against the active adapter, promotes ->
the same question in Slack now gets the corrected answer, and answers that were right before still are.

The tiny base has random weights: it memorises, it does not understand. "Right" here means reproducing the
approved answer exactly, which is what a memorising model can show.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from bot import BackgroundHttpServer, BotConfig, SlackJobNotifier, build_app, shutdown
from finetune.engine import Engine, EngineConfig
from finetune.evaluation import token_f1
from finetune.jobs import Worker, WorkerConfig, request_retrain
from store import open_db
from store.adapters import active_adapter
from store.documents import import_documents
from store.examples import NewExample, add_examples, list_examples
from store.interactions import list_interactions
from store.jobs import get_job, list_jobs
from tests.conftest import SAMPLES
from tests.fakes.slack_api import (
    BOT_USER_ID, FakeSlackAPI, app_mention_event, block_actions_payload, event_body, interactive_body,
    post_signed, slash_command_body, view_submission_payload,
)

SECRET = "e2e-signing-secret"
ADMIN = "UADMIN"
ASKER = "U777"
N_EXAMPLES = 12
# The tiny base must memorise a small approved set. Measured on this 12-example set (k_passages=0, 60
# full-batch steps): LoRA with the tiny defaults ends at answer loss ~4.9 (0 of 9 answers reproduced), LoRA
# at lr 1e-2 does not learn (7.8), a full fine-tune at lr 2e-3 reaches 0.44. So the admin asks for a full
# fine-tune of the tiny base (`/kb-retrain method=full epochs=100 …`). One retrieved passage per prompt, in
# training and in the engine alike (k=0 would make the engine refuse: no passages, no answer), keeps the
# steps short on two CPU cores.
TRAIN = {"method": "full", "epochs": 100, "batch_size": 16, "learning_rate": 3e-3, "warmup": 0.05, "k_passages": 1}
# "Right" = token F1 with the approved answer at least this (1.0 = the same words in the same multiset).
RIGHT = 0.8
CORRECTION = "Since the new policy, ask the IT helpdesk in the it-help channel; they answer within one working day."


def same_answer(a: str, b: str) -> bool:
    return token_f1(a, b) >= RIGHT


def sample_pairs(n: int) -> list[NewExample]:
    import json

    rows = [json.loads(ln) for ln in (SAMPLES / "qa.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    english = [r for r in rows if r["instruction"].isascii() and not r.get("input")]
    return [NewExample(question=r["instruction"], answer=r["output"]) for r in english[:n]]


def wait_job(db, job_id: int, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(db, job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {get_job(db, job_id).status} after {timeout}s: {get_job(db, job_id).progress}")


def ask_in_slack(bot_url: str, fake: FakeSlackAPI, question: str, *, ts: str) -> dict:
    """A signed app_mention in #CQA; returns the chat.update that carried the answer (job notices also
    edit messages, in other channels)."""
    def answers() -> list:
        return [r.params for r in fake.requests("chat.update") if r.params.get("channel") == "CQA"]

    before = len(answers())
    body = event_body(app_mention_event(text=f"<@{BOT_USER_ID}> {question}", user=ASKER, channel="CQA", ts=ts))
    status, _ = post_signed(bot_url, body, SECRET)
    assert status == 200
    deadline = time.monotonic() + 120
    while len(answers()) <= before:
        assert time.monotonic() < deadline, "no answer in Slack within 120 s"
        time.sleep(0.1)
    return answers()[before]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two trainings; minutes on an idle 2-core box, far more on a shared one
def test_the_loop_ask_correct_approve_retrain_answer(db_path, kbloop_home):
    db = open_db(db_path)
    import_documents(db, [SAMPLES / "kb"])
    pairs = sample_pairs(N_EXAMPLES)
    add_examples(db, pairs, status="approved", source="import", reviewer="import")

    with FakeSlackAPI() as fake:
        from slack_sdk import WebClient

        notifier = SlackJobNotifier(client=WebClient(token="xoxb-e2e", base_url=fake.url), notify_channel="CNOTIFY",
                                    progress_interval_s=1.0)
        worker = Worker(db_path=db_path, home=kbloop_home, notifier=notifier,
                        config=WorkerConfig(base_model="tiny", heartbeat_interval_s=1.0, stale_after_s=30.0,
                                            poll_interval_s=0.5, progress_notify_interval_s=1.0))
        stop = threading.Event()
        worker_thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
        worker_thread.start()
        engine = Engine(db_path=db_path, home=kbloop_home, base_model="tiny",
                        config=EngineConfig(k=1, max_new_tokens=96, time_limit_s=60)).start()
        config = BotConfig(bot_token="xoxb-e2e", signing_secret=SECRET, api_url=fake.url, admins=(ADMIN,),
                           notify_channel="CNOTIFY")
        app = build_app(config=config, engine=engine, db_path=db_path)
        server = BackgroundHttpServer(app).start()
        url = server.url + "/slack/events"
        try:
            # 0. The workspace's first adapter, from the imported answers (what `kbloop demo` does).
            first = request_retrain(db, requester=ADMIN, params={"train": TRAIN})
            first = wait_job(db, first.id, timeout=600)
            assert first.status == "succeeded", first.error
            if not first.result["promoted"]:
                # A memorising tiny model is worse than the random base on unseen questions (held-out loss);
                # the admin promotes the first adapter anyway, as `kbloop promote V --force` does.
                from finetune.registry import promote

                promote(db, first.result["version"], actor=ADMIN, force=True)
            v1 = active_adapter(db).version
            assert v1 == first.result["version"]
            assert engine.wait_ready(300), engine.error

            # What v1 gets right: training questions it reproduces exactly.
            from finetune.data import split_heldout

            train_side, _ = split_heldout(pairs)
            right = [p for p in train_side
                     if same_answer(engine.answer(p.question, record=False).text, p.answer)]
            assert len(right) >= 3, f"v1 reproduces only {len(right)} of {len(train_side)} training answers"
            target, keep = right[0], right[1:4]

            # 1. Ask in Slack: answered by v1, in the thread of the mention.
            update = ask_in_slack(url, fake, target.question, ts="1712000000.000100")
            [asked] = list_interactions(db)
            assert asked.adapter_version == v1 and same_answer(asked.answer, target.answer)

            # 2. 👎 with a correction: the policy changed.
            values = [el["value"] for b in update["blocks"] if b["type"] == "actions" for el in b["elements"]]
            press = block_actions_payload(action_id="feedback_down", value=values[1], user=ASKER, channel="CQA",
                                          message_ts=update["ts"], response_url=fake.response_url("vote"))
            assert post_signed(url, interactive_body(press), SECRET)[0] == 200
            view = fake.wait_for("views.open", 1)[0].params["view"]
            submit = view_submission_payload(
                callback_id="feedback_correction", private_metadata=view["private_metadata"], user=ASKER,
                values={"correction": {"correction_text": {"type": "plain_text_input", "value": CORRECTION}}})
            assert post_signed(url, interactive_body(submit), SECRET)[0] == 200
            fake.wait_for("response_url:vote", 1)
            [pending] = list_examples(db, status="pending")
            assert pending.answer == CORRECTION and pending.question == target.question

            # 3. A curator approves it from the command line.
            from kbloop.cli import app as cli
            from kbloop.cli.app import run

            assert run(cli, ["review", "approve", str(pending.id)]) == 0
            assert list_examples(db, status="pending") == []

            # 4. An admin types /kb-retrain; the reply names the job; a second request is told it runs.
            retrain = slash_command_body(command="/kb-retrain", text=" ".join(f"{k}={v}" for k, v in TRAIN.items()),
                                         user=ADMIN, channel="CADMIN", response_url=fake.response_url("retrain"))
            assert post_signed(url, retrain, SECRET)[0] == 200
            queued = fake.wait_for("response_url:retrain", 1, timeout=30)[0].params
            job_id = max(j.id for j in list_jobs(db))
            assert str(job_id) in queued["text"]
            again = slash_command_body(command="/kb-retrain", user=ADMIN, channel="CADMIN",
                                       response_url=fake.response_url("again"))
            assert post_signed(url, again, SECRET)[0] == 200
            assert str(job_id) in fake.wait_for("response_url:again", 1, timeout=30)[0].params["text"]

            # 5. The job trains in a child process, passes the gate against v1, and is promoted.
            job = wait_job(db, job_id, timeout=600)
            assert job.status == "succeeded", job.error
            assert job.result["promoted"], job.result.get("reasons")
            v2 = job.result["version"]
            assert active_adapter(db).version == v2 != v1
            assert job.pid and job.pid != os.getpid()  # trained in a child process
            finished = [m for m in fake.requests("chat.postMessage")
                        if m.params.get("channel") == "CADMIN" and "passed the evaluation gate" in m.params.get("text", "")]
            assert finished, "the requester was told the outcome in Slack"

            # 6. The same question in Slack now gets the corrected answer, from v2.
            ask_in_slack(url, fake, target.question, ts="1712000000.000200")
            latest = max(list_interactions(db), key=lambda i: i.id)
            assert latest.adapter_version == v2
            assert same_answer(latest.answer, CORRECTION), latest.answer
            assert token_f1(latest.answer, CORRECTION) > token_f1(latest.answer, target.answer)

            # 7. What was right before is still right.
            for p in keep:
                got = engine.answer(p.question, record=False)
                assert got.adapter_version == v2 and same_answer(got.text, p.answer), (p.question, got.text)
        finally:
            stop.set()
            server.stop()
            shutdown(app)
            engine.close()
            worker_thread.join(timeout=60)
