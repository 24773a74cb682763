"""Teams from Slack (issue 20), over real HTTP with signed requests and the real answer engine: a question in a team's
channel (a mention, /kb, an assistant thread looking at the channel) gets the team's approved answer and never
another team's; elsewhere, no team's. The engine is not started: verified answers need no model, and a question
without one gets the "starting up" note, which proves that no team's answer matched."""

from __future__ import annotations

import json

import pytest

from bot.questions import question_team
from finetune.serving.engine import STARTING_TEXT, Engine
from store import open_db
from store.adapters import activate_adapter, active_adapter, register_adapter
from store.assistant_threads import save_assistant_thread_context
from store.examples import NewExample, add_examples
from store.interactions import list_interactions, record_interaction
from store.jobs import active_jobs, list_jobs
from store.teams import add_team
from tests.bot.conftest import ADMIN, SECRET
from tests.fakes.slack_api import (
    BOT_USER_ID,
    app_mention_event,
    assistant_message_event,
    assistant_thread_event,
    event_body,
    post_signed,
    slash_command_body,
)

QUESTION = "When are deploys frozen?"
ENG = "Eng deploys are frozen on Fridays."
SALES = "Sales demo deploys freeze at quarter end (MAGENTA)."


@pytest.fixture
def bot(db_path, kbloop_home, start_bot):
    db = open_db(db_path)
    add_team(db, "eng", ("C0ENG",))
    add_team(db, "sales", ("C0SALES",))
    add_examples(db, [NewExample(QUESTION, ENG)], team="eng")
    add_examples(db, [NewExample(QUESTION, SALES)], team="sales")
    add_examples(db, [NewExample("Where is the office?", "Main street 1.")])  # shared
    engine = Engine(db_path=db_path, home=kbloop_home, base_model="tiny")  # not started: no model loaded
    yield start_bot(engine=engine)
    engine.close()


def _mention(bot, fake_slack, channel, question, event_id):
    before = len(fake_slack.requests("chat.update"))
    body = event_body(app_mention_event(text=f"<@{BOT_USER_ID}> {question}", channel=channel), event_id=event_id)
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    return fake_slack.wait_for("chat.update", before + 1, timeout=30)[before].params


def _text(update) -> str:
    return json.dumps(update["blocks"], ensure_ascii=False)


def test_a_mention_gets_its_teams_answer_and_never_another_teams(bot, fake_slack):
    eng = _mention(bot, fake_slack, "C0ENG", QUESTION, "EvEng")
    assert ENG in _text(eng) and "MAGENTA" not in _text(eng)
    sales = _mention(bot, fake_slack, "C0SALES", QUESTION, "EvSales")
    assert SALES in _text(sales) and "Fridays" not in _text(sales)
    other = _mention(bot, fake_slack, "C0OTHER", QUESTION, "EvOther")
    assert "Fridays" not in _text(other) and "MAGENTA" not in _text(other)
    assert STARTING_TEXT.split(":")[0] in other["text"]  # no team's answer matched: the model would be asked
    shared = _mention(bot, fake_slack, "C0ENG", "Where is the office?", "EvShared")
    assert "Main street 1." in _text(shared)  # shared answers serve every team
    teams = {(i.channel_id, i.team) for i in list_interactions(bot.db)}
    assert {("C0ENG", "eng"), ("C0SALES", "sales")} <= teams
    assert ("C0OTHER", None) not in teams  # "starting up" is not recorded; nothing of a team was


def test_slash_kb_routes_by_the_channel_it_was_typed_in(bot, fake_slack):
    for channel, expected, hidden in (("C0SALES", SALES, "Fridays"), ("C0ENG", ENG, "MAGENTA")):
        body = slash_command_body(command="/kb", text=QUESTION, channel=channel,
                                  response_url=fake_slack.response_url(f"kb-{channel}"))
        assert post_signed(bot.events_url, body, SECRET)[0] == 200
        reply = fake_slack.wait_for(f"response_url:kb-{channel}", 1)[0].params
        assert expected in json.dumps(reply["blocks"]) and hidden not in json.dumps(reply["blocks"])


def test_an_assistant_thread_routes_by_the_channel_the_user_is_looking_at(bot, fake_slack):
    thread = "1729999327.187299"
    started = assistant_thread_event(thread_ts=thread, context_channel="C0SALES")
    assert post_signed(bot.events_url, event_body(started, event_id="EvStart"), SECRET)[0] == 200
    fake_slack.wait_for("assistant.threads.setSuggestedPrompts", 1)
    ask = assistant_message_event(text=QUESTION, thread_ts=thread, ts="1729999400.000100")
    assert post_signed(bot.events_url, event_body(ask, event_id="EvAsk"), SECRET)[0] == 200
    answer = fake_slack.wait_for("chat.update", 1, timeout=30)[0].params
    assert SALES in _text(answer) and "Fridays" not in _text(answer)
    [interaction] = list_interactions(bot.db)
    assert (interaction.channel_id, interaction.team) == ("D123", "sales")


def _command(bot, slack, command, *, text="", user=ADMIN, name):
    body = slash_command_body(command=command, text=text, user=user, response_url=slack.response_url(name))
    assert post_signed(bot.events_url, body, SECRET)[0] == 200
    return slack.wait_for(f"response_url:{name}", 1)[-1].params["text"]


def test_retrain_rollback_and_status_per_team(bot, fake_slack):
    assert "no team 'ops'" in _command(bot, fake_slack, "/kb-retrain", text="team=ops", name="r0")
    assert list_jobs(bot.db) == []
    reply = _command(bot, fake_slack, "/kb-retrain", text="team=eng epochs=1", name="r1")
    [job] = active_jobs(bot.db)
    assert f"#{job.id}" in reply and job.params == {"team": "eng", "train": {"epochs": 1}}

    for version, team in (("v1", None), ("v2", "eng"), ("v3", "eng")):
        register_adapter(bot.db, version=version, path=f"/x/{version}", base_model="tiny", method="lora", params={},
                         dataset_hash=None, dataset_size=3, metrics={}, team=team)
        activate_adapter(bot.db, version)
    status = _command(bot, fake_slack, "/kb-status", user="U123", name="s1")
    assert "*v1*" in status and "Team *eng*: *v3*" in status and "Team *sales*: the shared adapter" in status

    done = _command(bot, fake_slack, "/kb-rollback", text="team=eng", name="b1")
    assert "Rolled back team *eng* from *v3* to *v2*" in done
    assert active_adapter(bot.db, "eng").version == "v2" and active_adapter(bot.db).version == "v1"
    assert "Usage: `/kb-rollback [team=NAME]`" in _command(bot, fake_slack, "/kb-rollback", text="eng", name="b2")
    assert "no team 'ops'" in _command(bot, fake_slack, "/kb-rollback", text="team=ops", name="b3")
    refused = _command(bot, fake_slack, "/kb-rollback", text="team=eng", user="U123", name="b4")
    assert "only kbloop admins" in refused and active_adapter(bot.db, "eng").version == "v2"


def test_an_assistant_thread_suggests_shared_and_its_teams_questions_only(bot, fake_slack):
    record_interaction(bot.db, question="What is the MAGENTA close?", answer="…", source="slack", team="sales")
    record_interaction(bot.db, question="Where is the office?", answer="…", source="slack")
    for n, (channel, thread) in enumerate((("C0ENG", "1729999327.000001"), ("C0SALES", "1729999327.000002"))):
        started = assistant_thread_event(thread_ts=thread, context_channel=channel)
        assert post_signed(bot.events_url, event_body(started, event_id=f"EvStart{n}"), SECRET)[0] == 200
    fake_slack.wait_for("assistant.threads.setSuggestedPrompts", 2)
    by_thread = {r.params["thread_ts"]: [p["message"] for p in r.params["prompts"]]
                 for r in fake_slack.requests("assistant.threads.setSuggestedPrompts")}
    assert by_thread["1729999327.000001"] == ["Where is the office?"]  # eng: not sales' question
    assert sorted(by_thread["1729999327.000002"]) == ["What is the MAGENTA close?", "Where is the office?"]


def test_question_team_reads_the_channel_then_the_thread_then_the_agent_view_context(db_path):
    db = open_db(db_path)
    add_team(db, "eng", ("C0ENG",))
    save_assistant_thread_context(db, channel_id="D1", thread_ts="1.1", context={"channel_id": "C0ENG"})
    save_assistant_thread_context(db, channel_id="D2", thread_ts="agent", context={"channel_id": "C0ENG"})
    assert question_team(db, channel="C0ENG") == "eng"
    assert question_team(db, channel="D1", thread_ts="1.1") == "eng"
    assert question_team(db, channel="D1", thread_ts="9.9") is None and question_team(db, channel="D1") is None
    assert question_team(db, channel="D2") == "eng" and question_team(db, channel="D2", thread_ts="2.2") == "eng"
    assert question_team(db, channel="C0OTHER") is None and question_team(db, channel=None) is None
