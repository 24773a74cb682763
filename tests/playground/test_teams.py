"""The playground as a team (issue 20): the chat and the search see the team's approved answers and passages, never
another team's, and as no team shared ones only; curators move examples between teams. The real engine, not
started: verified answers need no model."""

import pytest

from finetune.serving.engine import STARTING_TEXT, Engine
from playground import chat, dataset, search, teams
from store.audit import list_audit
from store.examples import NewExample, add_examples, get_example, list_examples
from store.interactions import get_interaction
from store.kb import NewPassage, replace_document
from store.teams import SHARED, add_team

QUESTION = "When are deploys frozen?"


@pytest.fixture
def engine(db, db_path, kbloop_home):
    add_team(db, "eng", ("C0ENG",))
    add_team(db, "sales", ("C0SALES",))
    add_examples(db, [NewExample(QUESTION, "Eng deploys are frozen on Fridays.")], team="eng")
    add_examples(db, [NewExample(QUESTION, "Sales demo deploys freeze at quarter end.")], team="sales")
    eng = Engine(db_path=db_path, home=kbloop_home, base_model="tiny")
    yield eng
    eng.close()


def test_the_chat_answers_as_the_chosen_team_only(db, engine, alice):
    (eng,) = chat.ask(engine, alice, QUESTION, ["active"], team="eng")
    assert eng.text == "Eng deploys are frozen on Fridays." and eng.label == "active: approved answer"
    assert get_interaction(db, eng.interaction_id).team == "eng"
    (sales,) = chat.ask(engine, alice, QUESTION, ["active"], team="sales")
    assert sales.text == "Sales demo deploys freeze at quarter end."
    (nobody,) = chat.ask(engine, alice, QUESTION, ["active"])
    assert nobody.text == STARTING_TEXT  # no team's approved answer: the (unloaded) model would have to answer


def test_team_choices_search_as_a_team_and_assigning_examples(db, alice):
    add_team(db, "eng", ("C0ENG",))
    assert teams.ask_choices(db) == [(teams.NO_TEAM_LABEL, ""), ("eng (C0ENG)", "eng")]
    assert [v for _, v in teams.filter_choices(db)] == ["", SHARED, "eng"]
    replace_document(db, "deploys.md", [NewPassage("deploys.md", "Deploy freeze", 0,
                                                   "Production deploys are frozen on Fridays.")], team="eng")
    rows, _ = search.search(db, "When are production deploys frozen?", team="eng")
    assert [r[1] for r in rows] == ["Deploy freeze"]
    rows, line = search.search(db, "When are production deploys frozen?")
    assert rows == [] and "does not cover" in line  # as no team: eng's passage is not there

    add_examples(db, [NewExample("Where is the eng wiki?", "wiki.eng")], team="eng")
    [ex] = list_examples(db)
    out = teams.assign(db, alice, ex.id, SHARED)
    assert out.ok and "shared set" in out.message and list_examples(db, team=SHARED)[0].id == ex.id
    assert list_audit(db)[0]["action"] == "assign_team"
    out = teams.assign(db, alice, ex.id, "ops")
    assert not out.ok and "no team 'ops'" in out.message
    assert teams.assign(db, alice, ex.id, "eng").ok and get_example(db, ex.id).team == "eng"
    add_examples(db, [NewExample("Shared question?", "Shared answer.")])
    assert dataset.examples_table(db, team="eng")["question"].tolist() == ["Where is the eng wiki?"]
    assert dataset.examples_table(db, team=SHARED)["team"].tolist() == [""]
    assert dataset.examples_table(db)["team"].tolist() == ["", "eng"]  # newest first
