"""The running playground as a team (issue 20), over HTTP with gradio_client: the chat and the search see the shared
and the chosen team's approved answers and passages, never another team's; curators filter and move examples by
team. The real engine, not started: verified answers need no model."""

from __future__ import annotations

import json

import pytest
from gradio_client import Client

from finetune.jobs.queue import describe_job
from finetune.serving.engine import Engine
from playground import PlaygroundConfig, build_playground, launch
from playground.review_tab import QUEUE_COLUMNS
from store import open_db
from store.examples import NewExample, add_examples, get_example, list_examples
from store.interactions import record_interaction, record_vote
from store.jobs import list_jobs
from store.kb import NewPassage, replace_document
from store.teams import SHARED, add_team
from tests.playground.test_app_client import free_port

QUESTION = "When are deploys frozen?"
ENG = "Eng deploys are frozen on Fridays."
SALES = "Sales demo deploys freeze at quarter end."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("teams-playground")
    db_path = home / "kbloop.db"
    db = open_db(db_path)
    add_team(db, "eng", ("C0ENG",))
    add_team(db, "sales", ("C0SALES",))
    add_examples(db, [NewExample(QUESTION, ENG)], team="eng")
    add_examples(db, [NewExample(QUESTION, SALES)], team="sales")
    replace_document(db, "freeze.md", [NewPassage("freeze.md", "Deploy freeze, engineering", 0,
                                                  "Production deploys are frozen on Fridays after noon.")], team="eng")
    engine = Engine(db_path=db_path, home=home, base_model="tiny")  # not started: no model loaded
    config = PlaygroundConfig(port=free_port(), auth=(("alice", "alice-password"),), admins=("alice",),
                              export_dir=str(tmp_path_factory.mktemp("exports")))
    demo = build_playground(config=config, engine=engine, db_path=db_path)
    launch(demo, config=config, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{config.port}/", "db_path": db_path}
    demo.close()
    engine.close()


@pytest.fixture(scope="module")
def alice(server):
    return Client(server["url"], auth=("alice", "alice-password"), verbose=False, analytics_enabled=False,
                  download_files=False)


def _asked(alice, team: str) -> str:
    out = alice.predict(QUESTION, "active", "", "", [], [], [], team, api_name="/ask")
    return json.dumps(out[0], ensure_ascii=False)  # column A's conversation


def test_the_chat_answers_as_the_chosen_team_only(alice):
    eng = _asked(alice, "eng")
    assert ENG in eng and SALES not in eng
    sales = _asked(alice, "sales")
    assert SALES in sales and ENG not in sales
    nobody = _asked(alice, "")
    assert ENG not in nobody and SALES not in nobody
    out = alice.predict(QUESTION, "active", "", "", [], [], [], "ops", api_name="/ask")
    assert out[-1].startswith("⛔") and "no team 'ops'" in out[-1]


def test_search_as_a_team_sees_its_passages_only(alice):
    table, _ = alice.predict("When are production deploys frozen?", "eng", api_name="/search")
    assert table["data"][0][1] == "Deploy freeze, engineering"
    table, summary = alice.predict("When are production deploys frozen?", "", api_name="/search")
    assert "Deploy freeze, engineering" not in json.dumps(table) and "does not cover" in summary
    table, _ = alice.predict("When are production deploys frozen?", "sales", api_name="/search")
    assert "Deploy freeze, engineering" not in json.dumps(table)


def test_the_dataset_filters_by_team_and_moves_an_example(server, alice):
    table = alice.predict("", "approved", "eng", api_name="/dataset")
    assert [row[2] for row in table["data"]] == [ENG] and table["headers"][-1] == "team"
    db = open_db(server["db_path"])
    [eng] = list_examples(db, team="eng")
    message, table = alice.predict(str(eng.id), SHARED, "", "approved", SHARED, api_name="/assign_team")
    assert message.startswith("✅") and "shared set" in message
    assert get_example(db, eng.id).team is None and [row[2] for row in table["data"]] == [ENG]
    message, _ = alice.predict(str(eng.id), "sales", "", "approved", "", api_name="/assign_team")
    assert message.startswith("⛔") and "already has an example asking" in message  # sales has the question


def test_the_training_tab_retrains_and_rolls_back_the_chosen_team(server, alice):
    out = alice.predict("", "", None, False, "", "eng", api_name="/retrain")
    assert out[0].startswith("✅ Job") and "for team eng" in out[0]
    db = open_db(server["db_path"])
    (job,) = list_jobs(db)
    assert job.params == {"team": "eng"} and "team eng" in describe_job(job)
    assert alice.predict(api_name="/cancel_job")[0].startswith("✅")
    message = alice.predict(None, "sales", api_name="/rollback")[0]
    assert message.startswith("⛔") and "team 'sales' has no active adapter of its own" in message
    message = alice.predict(None, "ops", api_name="/rollback")[0]
    assert message.startswith("⛔") and "no team 'ops'" in message


def test_the_review_queue_filters_by_team(server, alice):
    db = open_db(server["db_path"])
    asked = record_interaction(db, question="Who approves eng hires?", answer="HR.", source="slack",
                               channel_id="C0ENG", user_id="U1", team="eng")
    record_vote(db, interaction_id=asked, user_id="U1", vote=-1)
    out = alice.predict("all", "to_review", "", "", "", "", "eng", api_name="/queue")
    queue = out[1]["data"]
    assert [row[0] for row in queue] == [f"i:{asked}"] and queue[0][queue_column("team")] == "eng"
    out = alice.predict("all", "to_review", "", "", "", "", "sales", api_name="/queue")
    assert f"i:{asked}" not in json.dumps(out[1]["data"]) and "Who approves eng hires" not in json.dumps(out)


def queue_column(name: str) -> int:
    return QUEUE_COLUMNS.index(name)
