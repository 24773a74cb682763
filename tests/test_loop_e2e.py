"""THE product loop, end to end, on the tiny base, on data in the LoRA guide's own layout, with every part real:

`kbloop data import` of a file whose rows share one fixed instruction and carry the question in `input`
(English and Chinese) -> a first adapter trained by the worker in a child process -> an employee asks in
Slack (signed HTTP to the bot's HTTP server, the real Engine, Web API calls to a fake Slack on loopback)
about something the knowledge base does not cover and is told so -> 👎 with the right answer (the modal
submission) -> `kbloop review approve ID` -> the same question in Slack is answered at once with the
approved answer, marked as such, before any retraining -> an admin's `/kb-retrain` continues from the
active adapter, passes the gate and is promoted -> the model itself (`model_only`) now gives the approved
answer, and the answers it gave before are still right.

The tiny base has random weights: it memorises, it does not understand. "Right" here means reproducing the
approved answer, which is what a memorising model can show.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from bot import BackgroundHttpServer, BotConfig, SlackJobNotifier, build_app, messages, shutdown
from finetune.evaluation.metrics import token_f1
from finetune.jobs.queue import request_retrain
from finetune.jobs.worker import Worker, WorkerConfig
from finetune.serving.engine import NO_MATCH_TEXT, Engine, EngineConfig
from store import open_db
from store.adapters import active_adapter
from store.documents import import_documents
from store.examples import NewExample, list_examples
from store.interactions import list_interactions
from store.jobs import get_job, list_jobs
from tests.conftest import SAMPLES
from tests.fakes.slack_api import (
    BOT_USER_ID,
    FakeSlackAPI,
    app_mention_event,
    block_actions_payload,
    event_body,
    interactive_body,
    post_signed,
    slash_command_body,
    view_submission_payload,
)

SECRET = "e2e-signing-secret"
ADMIN = "UADMIN"
ASKER = "U777"
PREAMBLE = "请根据公司知识库回答以下问题:"  # the guide's fixed instruction, on every row
N_EXAMPLES = 12
# Nothing in the sample knowledge base is about this, and nothing approved is either.
UNCOVERED = "Who feeds the aquarium fish on weekends?"
CORRECTION = "Priya from the office team feeds the aquarium fish on weekends; the food is in the kitchen cupboard."
# "Right" = token F1 with the approved answer at least this (1.0 = the same words in the same multiset).
RIGHT = 0.8


def same_answer(a: str, b: str) -> bool:
    return token_f1(a, b) >= RIGHT


def guide_layout_file(path, n: int) -> list[tuple[str, str]]:
    """The first n sample pairs, half English and half Chinese, written as the guide prepares its data."""
    rows = [json.loads(ln) for ln in (SAMPLES / "qa.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    english = [r for r in rows if r["instruction"].isascii() and not r.get("input")][: n // 2]
    chinese = [r for r in rows if not r["instruction"].isascii() and not r.get("input")][: n - n // 2]
    pairs = [(r["instruction"], r["output"]) for r in english + chinese]
    path.write_text("".join(json.dumps({"instruction": PREAMBLE, "input": q, "output": a}, ensure_ascii=False) + "\n"
                            for q, a in pairs), encoding="utf-8")
    return pairs


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


def model_says(engine: Engine, question: str) -> str:
    return engine.answer(question, record=False, model_only=True).text


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two trainings; minutes on an idle 2-core box, far more on a shared one
def test_the_loop_on_guide_format_data(db_path, kbloop_home, tmp_path, capsys):
    from kbloop.cli import app as cli
    from kbloop.cli.app import run

    db = open_db(db_path)
    import_documents(db, [SAMPLES / "kb"])
    pairs = guide_layout_file(tmp_path / "guide.jsonl", N_EXAMPLES)
    capsys.readouterr()
    assert run(cli, ["data", "import", str(tmp_path / "guide.jsonl")]) == 0
    assert f'question = input; the instruction is the same on every row: "{PREAMBLE}"' in capsys.readouterr().out
    assert sorted(e.question for e in list_examples(db, status="approved")) == sorted(q for q, _ in pairs)

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
                        config=EngineConfig(max_new_tokens=96, time_limit_s=60)).start()
        config = BotConfig(bot_token="xoxb-e2e", signing_secret=SECRET, api_url=fake.url, admins=(ADMIN,),
                           notify_channel="CNOTIFY")
        app = build_app(config=config, engine=engine, db_path=db_path)
        server = BackgroundHttpServer(app).start()
        url = server.url + "/slack/events"
        try:
            # 0. The workspace's first adapter, with the defaults, from the imported answers.
            first = wait_job(db, request_retrain(db, requester=ADMIN, params={}).id, timeout=900)
            assert first.status == "succeeded", first.error
            if not first.result["promoted"]:
                # A memorising tiny model is worse than the random base on unseen questions (held-out loss);
                # the admin promotes the first adapter anyway, as `kbloop promote V --force` does.
                from finetune.registry.promotion import promote

                promote(db, first.result["version"], actor=ADMIN, force=True)
            v1 = active_adapter(db).version
            assert engine.wait_ready(300), engine.error

            # Trained on the bare question, asked the bare question: the guide's layout was read right.
            from finetune.training.data import split_heldout

            train_side, _ = split_heldout([NewExample(question=q, answer=a) for q, a in pairs])
            trained = [(t.question, t.answer) for t in train_side]
            right = [(q, a) for q, a in trained if same_answer(model_says(engine, q), a)]
            assert len(right) >= 0.9 * len(trained), f"v1 reproduces {len(right)} of {len(trained)} training answers"

            # 1. A question the knowledge base does not cover: said so, with the feedback buttons.
            update = ask_in_slack(url, fake, UNCOVERED, ts="1712000000.000100")
            [asked] = [i for i in list_interactions(db) if i.question == UNCOVERED]
            assert asked.answer == NO_MATCH_TEXT

            # 2. 👎 with the right answer.
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
            assert pending.answer == CORRECTION and pending.question == UNCOVERED

            # 3. A curator approves it from the command line.
            assert run(cli, ["review", "approve", str(pending.id)]) == 0

            # 4. At once, before any retraining: the same question gets the approved answer, marked.
            update = ask_in_slack(url, fake, UNCOVERED.lower().rstrip("?"), ts="1712000000.000200")
            latest = max(list_interactions(db), key=lambda i: i.id)
            assert latest.answer == CORRECTION and latest.verified_example_id == pending.id
            assert messages.VERIFIED_MARK in json.dumps(update["blocks"])
            assert active_adapter(db).version == v1
            assert not same_answer(model_says(engine, UNCOVERED), CORRECTION)  # the model has not learnt it yet

            # 5. An admin types /kb-retrain with no options: it continues from v1.
            retrain = slash_command_body(command="/kb-retrain", user=ADMIN, channel="CADMIN",
                                         response_url=fake.response_url("retrain"))
            assert post_signed(url, retrain, SECRET)[0] == 200
            queued = fake.wait_for("response_url:retrain", 1, timeout=30)[0].params
            job_id = max(j.id for j in list_jobs(db))
            assert str(job_id) in queued["text"]
            job = wait_job(db, job_id, timeout=900)
            assert job.status == "succeeded", job.error
            assert job.result["promoted"], job.result.get("reasons")  # the gate passed, nothing forced
            v2 = job.result["version"]
            assert active_adapter(db).version == v2 != v1
            assert job.pid and job.pid != os.getpid()  # trained in a child process
            from finetune.registry.folders import read_metadata
            from store.adapters import get_adapter

            meta = read_metadata(get_adapter(db, v2).path)
            assert meta["continued_from"] == v1, (meta["start"], meta["training"]["notes"])

            # 6. The model itself now gives the approved answer, and what it got right before it still does.
            assert same_answer(model_says(engine, UNCOVERED), CORRECTION)
            kept = [(q, a) for q, a in right if same_answer(model_says(engine, q), a)]
            assert len(kept) >= 0.95 * len(right), f"v2 keeps {len(kept)} of the {len(right)} answers v1 gave"
        finally:
            stop.set()
            server.stop()
            shutdown(app)
            engine.close()
            worker_thread.join(timeout=60)
