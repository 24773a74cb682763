"""The bot over real HTTP: signed requests in, calls to the fake Slack Web API out.

Payload shapes follow Slack's docs (events API envelope, form-encoded slash commands, interactive
payload=<json>); the fake server is polled (wait_for), never slept on. The engine here is scripted so a
test can choose what "the model" says; tests/bot/test_real_engine.py runs the real Engine.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from store.audit import list_audit
from store.examples import list_examples
from store.interactions import list_interactions, votes_for
from store.jobs import active_jobs, list_jobs
from store.slack_events import count_slack_answers, list_bot_errors
from tests.bot.conftest import ADMIN, SECRET, SETTLE_S
from tests.fakes.engine import ScriptedEngine
from tests.fakes.slack_api import (
    BOT_ID,
    BOT_USER_ID,
    app_mention_event,
    block_actions_payload,
    event_body,
    interactive_body,
    message_event,
    post_signed,
    slash_command_body,
    view_submission_payload,
)

MENTION = f"<@{BOT_USER_ID}> how do I get VPN access?"


def _answers(slack, channel="C123"):
    """Messages the bot left in a channel after replacing its placeholders."""
    return [m for m in slack.messages(channel) if m.get("blocks")]


def _settle(slack, seconds=SETTLE_S):
    """Give a (wrongly) duplicated answer the chance to show up before asserting it did not."""
    time.sleep(seconds)


def _action_ids(blocks):
    return [el["action_id"] for b in blocks if b["type"] == "actions" for el in b["elements"]]


def _mention(bot, slack, text=MENTION, *, event_id="Ev1", ts="1711111111.000100", **kw):
    body = event_body(app_mention_event(text=text, ts=ts, **kw), event_id=event_id)
    status, _ = post_signed(bot.events_url, body, SECRET)
    assert status == 200
    return body


# --- questions ---------------------------------------------------------------------------------

def test_mention_gets_one_threaded_answer_with_both_buttons(start_bot, fake_slack):
    bot = start_bot()
    _mention(bot, fake_slack)
    update = fake_slack.wait_for("chat.update", 1)[0]
    placeholder = fake_slack.requests("chat.postMessage")[0]
    assert placeholder.params["thread_ts"] == "1711111111.000100"  # in the thread of the mention
    assert update.params["ts"] == fake_slack.messages("C123")[0]["ts"]  # the placeholder is replaced
    blocks = update.params["blocks"]
    assert _action_ids(blocks) == ["feedback_up", "feedback_down"]
    [interaction] = list_interactions(bot.db)
    values = {el["value"] for b in blocks if b["type"] == "actions" for el in b["elements"]}
    assert values == {str(interaction.id)}
    assert interaction.question == "how do I get VPN access?"  # our mention stripped
    assert interaction.event_id == "Ev1" and interaction.message_ts == update.params["ts"]
    assert "VPN guide" in json.dumps(blocks)  # sources shown
    assert len(fake_slack.messages("C123")) == 1


def test_retried_event_is_not_answered_twice_also_after_restart(start_bot, fake_slack):
    bot = start_bot()
    body = _mention(bot, fake_slack)
    for retry in (1, 2):
        status, _ = post_signed(bot.events_url, body, SECRET, retry_num=retry)
        assert status == 200
    fake_slack.wait_for("chat.update", 1)
    bot.stop()
    restarted = start_bot()  # a new process on the same database
    status, _ = post_signed(restarted.events_url, body, SECRET, retry_num=3)
    assert status == 200
    _settle(fake_slack)
    assert len(fake_slack.requests("chat.postMessage")) == 1
    assert count_slack_answers(restarted.db, "Ev1") == 1
    assert len(restarted.engine.calls) == 0


def test_mention_arriving_also_as_message_is_answered_once(start_bot, fake_slack):
    bot = start_bot()
    ts = "1711111111.000200"
    _mention(bot, fake_slack, event_id="EvMention", ts=ts)
    as_message = event_body(message_event(text=MENTION, channel="C123", channel_type="channel", ts=ts),
                            event_id="EvMessage")
    assert post_signed(bot.events_url, as_message, SECRET)[0] == 200
    fake_slack.wait_for("chat.update", 1)
    _settle(fake_slack)
    assert len(fake_slack.requests("chat.postMessage")) == 1
    assert len(bot.engine.calls) == 1


def test_direct_message_is_answered(start_bot, fake_slack):
    bot = start_bot()
    body = event_body(message_event(text="where is the expense policy?", channel="D999"), event_id="EvDM")
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    update = fake_slack.wait_for("chat.update", 1)[0]
    assert update.params["channel"] == "D999"
    assert _action_ids(update.params["blocks"]) == ["feedback_up", "feedback_down"]
    assert bot.engine.calls[0]["question"] == "where is the expense policy?"


@pytest.mark.parametrize("event", [
    message_event(text="hello from a bot", channel="D999", bot_id="B0OTHER", subtype="bot_message", user=None),
    message_event(text="integration says hi", channel="D999", bot_id="B0OTHER", user="U0INTEGRATION"),
    message_event(text="my own answer", channel="D999", user=BOT_USER_ID, bot_id=BOT_ID),
    message_event(text="", channel="D999", subtype="message_changed",
                  message={"text": "edited question", "user": "U123"}, user=None),
    message_event(text="", channel="D999", subtype="message_deleted", deleted_ts="1.2", user=None),
    message_event(text="chatter in a channel", channel="C123", channel_type="channel"),
    app_mention_event(text=MENTION) | {"bot_id": "B0OTHER"},
], ids=["bot_message", "other_bot", "itself", "edit", "deletion", "channel_message", "mention_by_bot"])
def test_ignored_messages(start_bot, fake_slack, event):
    bot = start_bot()
    status, _ = post_signed(bot.events_url, event_body(event), SECRET)
    assert status == 200
    _settle(fake_slack)
    assert fake_slack.requests("chat.postMessage") == [] and fake_slack.requests("chat.postEphemeral") == []
    assert bot.engine.calls == [] and list_interactions(bot.db) == []


def test_slash_kb_answers_only_the_asker(start_bot, fake_slack):
    bot = start_bot()
    body = slash_command_body(command="/kb", text="how do I reset my password?",
                              response_url=fake_slack.response_url("kb"))
    status, text = post_signed(bot.events_url, body, SECRET)
    assert status == 200 and "Looking that up" in text  # immediate ephemeral ack
    reply = fake_slack.wait_for("response_url:kb", 1)[0].params
    assert reply["response_type"] == "ephemeral"
    assert _action_ids(reply["blocks"]) == ["feedback_up", "feedback_down"]
    assert fake_slack.requests("chat.postMessage") == []  # nothing visible to the channel


def test_unknown_event_types_are_acknowledged(start_bot, fake_slack):
    bot = start_bot()
    body = event_body({"type": "reaction_added", "user": "U1", "reaction": "tada", "item": {}, "event_ts": "1.1"})
    assert post_signed(bot.events_url, body, SECRET)[0] == 200


def test_url_verification(start_bot):
    bot = start_bot()
    body = json.dumps({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                       "type": "url_verification"}).encode()
    status, text = post_signed(bot.events_url, body, SECRET)
    assert status == 200 and "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in text


# --- signatures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["bad_signature", "stale_timestamp", "unsigned"])
def test_unverifiable_requests_are_refused_and_do_nothing(start_bot, fake_slack, how):
    bot = start_bot()
    body = event_body(app_mention_event(text=MENTION), event_id="EvForged")
    if how == "bad_signature":
        status, _ = post_signed(bot.events_url, body, "not-the-secret")
    elif how == "stale_timestamp":
        status, _ = post_signed(bot.events_url, body, SECRET, timestamp=int(time.time()) - 6 * 60)
    else:
        req = urllib.request.Request(bot.events_url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            status = urllib.request.urlopen(req).status
        except urllib.error.HTTPError as exc:
            status = exc.code
    assert status == 401
    admin_cmd = slash_command_body(command="/kb-retrain", user=ADMIN)
    assert post_signed(bot.events_url, admin_cmd, "not-the-secret")[0] == 401
    _settle(fake_slack)
    assert fake_slack.requests() == []  # not even auth.test
    assert bot.db.execute("SELECT COUNT(*) FROM slack_events").fetchone()[0] == 0
    assert list_interactions(bot.db) == [] and list_jobs(bot.db) == [] and list_audit(bot.db) == []


# --- feedback -----------------------------------------------------------------------------------

def _answered(bot, slack):
    _mention(bot, slack)
    slack.wait_for("chat.update", 1)
    return list_interactions(bot.db)[0]


def test_thumbs_down_opens_modal_and_stores_the_correction(start_bot, fake_slack):
    bot = start_bot()
    interaction = _answered(bot, fake_slack)
    press = block_actions_payload(action_id="feedback_down", value=str(interaction.id), user="U777",
                                  response_url=fake_slack.response_url("vote"))
    assert post_signed(bot.events_url, interactive_body(press), SECRET)[0] == 200
    opened = fake_slack.wait_for("views.open", 1)[0].params
    view = opened["view"]
    assert opened["trigger_id"] == press["trigger_id"] and view["callback_id"] == "feedback_correction"
    [input_block] = [b for b in view["blocks"] if b["type"] == "input"]
    assert input_block["optional"] and input_block["element"]["multiline"]
    assert input_block["label"]["text"] == "What would the right answer be?"
    assert json.loads(view["private_metadata"])["interaction_id"] == interaction.id

    submit = view_submission_payload(
        callback_id="feedback_correction", private_metadata=view["private_metadata"], user="U777",
        values={input_block["block_id"]: {input_block["element"]["action_id"]: {
            "type": "plain_text_input", "value": "Request VPN access in the IT portal under Network."}}})
    status, text = post_signed(bot.events_url, interactive_body(submit), SECRET)
    assert status == 200 and text == ""  # empty body closes the modal
    told = fake_slack.wait_for("response_url:vote", 1)[-1].params
    assert "correction" in told["text"] and told["response_type"] == "ephemeral"
    [vote] = votes_for(bot.db, interaction.id)
    assert (vote.user_id, vote.vote) == ("U777", -1)
    assert vote.correction == "Request VPN access in the IT portal under Network."
    [pending] = list_examples(bot.db, status="pending")
    assert pending.answer == vote.correction and pending.rejected_answer == interaction.answer
    assert pending.source == "feedback" and pending.interaction_id == interaction.id


def test_latest_vote_wins(start_bot, fake_slack):
    bot = start_bot()
    interaction = _answered(bot, fake_slack)
    for action in ("feedback_up", "feedback_down"):
        press = block_actions_payload(action_id=action, value=str(interaction.id), user="U42",
                                      response_url=fake_slack.response_url(action))
        assert post_signed(bot.events_url, interactive_body(press), SECRET)[0] == 200
    assert "👍" in fake_slack.wait_for("response_url:feedback_up", 1)[0].params["text"]
    fake_slack.wait_for("views.open", 1)
    deadline = time.monotonic() + 5
    while votes_for(bot.db, interaction.id)[0].vote != -1 and time.monotonic() < deadline:
        time.sleep(0.02)
    [vote] = votes_for(bot.db, interaction.id)
    assert vote.vote == -1 and vote.user_id == "U42"


def test_vote_on_unknown_interaction_is_explained(start_bot, fake_slack):
    bot = start_bot()
    press = block_actions_payload(action_id="feedback_up", value="999", response_url=fake_slack.response_url("x"))
    assert post_signed(bot.events_url, interactive_body(press), SECRET)[0] == 200
    assert "can't find" in fake_slack.wait_for("response_url:x", 1)[0].params["text"]


# --- admin commands -----------------------------------------------------------------------------

def _command(bot, slack, command, *, user, text="", name=None):
    name = name or command.strip("/")
    body = slash_command_body(command=command, text=text, user=user, response_url=slack.response_url(name))
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    return slack.wait_for(f"response_url:{name}", 1)[-1].params


def test_retrain_by_non_admin_is_refused_audited_and_queues_nothing(start_bot, fake_slack):
    bot = start_bot()
    reply = _command(bot, fake_slack, "/kb-retrain", user="U123")
    assert reply["response_type"] == "ephemeral" and "only kbloop admins" in reply["text"]
    assert list_jobs(bot.db) == []
    [entry] = list_audit(bot.db)
    assert (entry["actor"], entry["action"], entry["allowed"]) == ("U123", "slack:/kb-retrain", False)


def test_retrain_by_admin_queues_one_job_and_a_second_is_told_which_runs(start_bot, fake_slack):
    bot = start_bot()
    reply = _command(bot, fake_slack, "/kb-retrain", user=ADMIN, text="epochs=1", name="r1")
    [job] = active_jobs(bot.db)
    assert f"#{job.id}" in reply["text"]
    assert job.requester == ADMIN and job.reply_channel == "C123" and job.params["train"] == {"epochs": 1}
    again = _command(bot, fake_slack, "/kb-retrain", user=ADMIN, name="r2")
    assert f"#{job.id}" in again["text"] and "already queued" in again["text"]
    assert len(list_jobs(bot.db)) == 1
    actions = [(a["action"], a["allowed"]) for a in list_audit(bot.db)]
    assert actions.count(("slack:/kb-retrain", True)) == 2


def test_retrain_on_the_votes_is_for_admins_only(start_bot, fake_slack):
    bot = start_bot()
    refused = _command(bot, fake_slack, "/kb-retrain", user="U123", text="objective=kto", name="no")
    assert "only kbloop admins" in refused["text"] and list_jobs(bot.db) == []
    [entry] = list_audit(bot.db)
    assert (entry["actor"], entry["action"], entry["allowed"]) == ("U123", "slack:/kb-retrain", False)
    bad = _command(bot, fake_slack, "/kb-retrain", user=ADMIN, text="objective=ppo", name="bad")
    assert "objective must be one of sft, kto, dpo" in bad["text"] and list_jobs(bot.db) == []
    queued = _command(bot, fake_slack, "/kb-retrain", user=ADMIN, text="objective=kto", name="yes")
    [job] = active_jobs(bot.db)
    assert f"#{job.id}" in queued["text"] and job.params["train"] == {"objective": "kto"}


def test_retrain_with_bad_options_says_how(start_bot, fake_slack):
    bot = start_bot()
    reply = _command(bot, fake_slack, "/kb-retrain", user=ADMIN, text="epochs")
    assert "Usage" in reply["text"] and list_jobs(bot.db) == []


def test_rollback_refused_and_allowed(start_bot, fake_slack):
    from store.adapters import activate_adapter, register_adapter

    bot = start_bot()
    for v in ("v1", "v2"):
        register_adapter(bot.db, version=v, path=f"/x/{v}", base_model="tiny", method="lora", params={},
                         dataset_hash=None, dataset_size=3, metrics={"heldout_loss": 1.5})
        activate_adapter(bot.db, v)
    refused = _command(bot, fake_slack, "/kb-rollback", user="U123", name="no")
    assert "only kbloop admins" in refused["text"]
    done = _command(bot, fake_slack, "/kb-rollback", user=ADMIN, name="yes")
    assert "v2" in done["text"] and "v1" in done["text"]
    from store.adapters import active_adapter

    assert active_adapter(bot.db).version == "v1"
    audited = [(a["action"], a["allowed"]) for a in list_audit(bot.db) if a["action"].startswith("slack:")]
    assert sorted(audited) == [("slack:/kb-rollback", False), ("slack:/kb-rollback", True)]


def test_status_for_everyone(start_bot, fake_slack):
    from store.adapters import activate_adapter, register_adapter
    from store.jobs import enqueue_job

    bot = start_bot()
    register_adapter(bot.db, version="v3", path="/x/v3", base_model="tiny", method="qlora", params={"rank": 8},
                     dataset_hash=None, dataset_size=40, metrics={"heldout_loss": 1.25, "heldout_token_f1": 0.5})
    activate_adapter(bot.db, "v3")
    enqueue_job(bot.db, requester="U9")
    reply = _command(bot, fake_slack, "/kb-status", user="U123")
    assert "*v3*" in reply["text"] and "held-out loss 1.25" in reply["text"] and "job 1" in reply["text"]
    assert list_audit(bot.db) == []  # not an admin command


# --- rendering, limits, failures ----------------------------------------------------------------

def test_model_output_cannot_ping_or_forge_links(start_bot, fake_slack, db_path):
    evil = "Hi <!channel> and <!here>, ask <@U123> or <!subteam^S0614TZR7|@team>: <http://evil.example|click> & @everyone"
    bot = start_bot(engine=ScriptedEngine(db_path, reply=lambda q: evil))
    _mention(bot, fake_slack)
    update = fake_slack.wait_for("chat.update", 1)[0].params
    rendered = json.dumps([update["text"], update["blocks"]])
    for control in ("<!channel>", "<!here>", "<@U123>", "<!subteam", "<http"):
        assert control not in rendered
    assert "&lt;!channel&gt;" in update["text"] and "&amp;" in update["text"]
    assert "<" not in update["text"] and "<" not in "".join(
        b["text"]["text"] for b in update["blocks"] if b["type"] == "section")


def test_long_answer_is_split_within_slack_limits(start_bot, fake_slack, db_path):
    long_answer = ("Step <n> & more. " * 40 + "\n\n") * 30  # ~20k characters, growing when escaped
    bot = start_bot(engine=ScriptedEngine(db_path, reply=lambda q: long_answer))
    _mention(bot, fake_slack)
    update = fake_slack.wait_for("chat.update", 1)[0].params
    assert fake_slack.messages("C123")[0]["blocks"] == update["blocks"]  # the fake accepted it (limits checked)
    sections = [b["text"]["text"] for b in update["blocks"] if b["type"] == "section"]
    assert len(sections) > 1 and len(update["blocks"]) <= 50
    assert all(len(s) <= 3000 for s in sections)
    assert "".join(sections).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == long_answer.strip()


def test_rate_limited_post_is_retried_after_retry_after(start_bot, fake_slack):
    bot = start_bot()
    fake_slack.fail_next("chat.postMessage", status=429, retry_after=1)
    fake_slack.fail_next("chat.update", status=429, retry_after=1)
    _mention(bot, fake_slack)
    fake_slack.wait_for("chat.update", 2, timeout=15)
    assert len(fake_slack.requests("chat.postMessage")) == 2  # the 429 and its retry
    assert len(_answers(fake_slack)) == 1
    assert list_bot_errors(bot.db) == []


def test_handler_failure_is_recorded_and_the_user_told(start_bot, fake_slack, db_path):
    bot = start_bot(engine=ScriptedEngine(db_path, reply=lambda q: RuntimeError("CUDA out of memory")))
    _mention(bot, fake_slack)
    # Nothing was streamed yet: the note is posted in the thread where the answer would have been.
    note = fake_slack.wait_for("chat.postMessage", 1)[0].params
    [error] = list_bot_errors(bot.db)
    assert "CUDA out of memory" in error["error"] and error["event_id"] == "Ev1"
    assert f"E{error['id']}" in note["text"] and note["thread_ts"] == "1711111111.000100"


def test_listener_exception_still_answers_200_and_is_recorded(start_bot, fake_slack):
    bot = start_bot()
    # A vote whose payload lacks the user: the listener raises after ack().
    press = block_actions_payload(action_id="feedback_up", value="1")
    del press["user"]
    assert post_signed(bot.events_url, interactive_body(press), SECRET)[0] == 200
    deadline = time.monotonic() + 5
    while not list_bot_errors(bot.db) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list_bot_errors(bot.db)


def test_questions_are_rate_limited_per_user(start_bot, fake_slack):
    bot = start_bot(rate_limit_questions=2, rate_limit_window_s=60)
    for i in range(3):
        _mention(bot, fake_slack, event_id=f"EvR{i}", ts=f"1711111111.00030{i}")
    told = fake_slack.wait_for("chat.postEphemeral", 1)[0].params
    assert told["user"] == "U123" and "try again in about" in told["text"]
    fake_slack.wait_for("chat.update", 2)
    _settle(fake_slack)
    assert len(bot.engine.calls) == 2


def test_healthz_reports_model_readiness(start_bot, db_path):
    engine = ScriptedEngine(db_path, ready=False)
    bot = start_bot(engine=engine)
    url = bot.server.url + "/healthz"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url)
    assert info.value.code == 503 and json.loads(info.value.read())["model"] == "loading"
    engine.ready = True
    with urllib.request.urlopen(url) as resp:
        assert resp.status == 200 and json.loads(resp.read())["store"] == "ok"


class _ReadinessHeld(ScriptedEngine):
    """Once `held`, the next /healthz waits in the server for `release`: a request in flight for as long as a test
    wants. (Only /healthz asks `ready` while the inbox is empty.)"""

    held = False

    def __init__(self, db_path):
        super().__init__(db_path)
        self.asked, self.release = threading.Event(), threading.Event()

    @property
    def ready(self) -> bool:
        if self.held:
            self.asked.set()
            self.release.wait(10)
        return True

    @ready.setter
    def ready(self, value) -> None:  # ScriptedEngine.__init__ sets it
        pass


def test_stopping_the_server_lets_a_request_in_flight_finish_then_refuses_connections(start_bot, db_path):
    """BackgroundHttpServer.stop() wakes uvicorn at once (bot.server._thread_server) and still waits, as uvicorn
    does, for the answers in flight."""
    engine = _ReadinessHeld(db_path)
    bot = start_bot(engine=engine)
    url = bot.server.url + "/healthz"
    engine.held = True
    statuses = []

    def ask():
        with urllib.request.urlopen(url, timeout=10) as resp:
            statuses.append(resp.status)

    asking = threading.Thread(target=ask)
    asking.start()
    assert engine.asked.wait(5)
    stopping = threading.Thread(target=bot.server.stop)
    stopping.start()
    stopping.join(0.3)
    assert stopping.is_alive() and statuses == []  # stop() waits for the answer in flight
    engine.release.set()
    stopping.join(10)
    asking.join(10)
    assert not stopping.is_alive() and statuses == [200]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
