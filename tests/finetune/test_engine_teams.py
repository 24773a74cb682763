"""The engine with teams (issue 20) on the tiny base: a team's question is answered by the team's active adapter,
else the shared one, and cites the shared and the team's passages only; concurrent questions of several teams each
get their own adapter (rows of different adapters share the running batch) and the answer they get alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from finetune.model.loading import resolve_base
from finetune.serving.engine import Engine, EngineConfig
from finetune.serving.retrieval import embed_missing_passages
from store import StoreError, open_db
from store.adapters import activate_adapter, register_adapter
from store.interactions import get_interaction
from store.kb import NewPassage, replace_document
from store.teams import add_team
from tests.finetune.test_engine import make_lora_adapter

pytestmark = pytest.mark.slow  # loads the tiny base and the embedder

Q = "When are production deploys frozen?"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    home = tmp_path_factory.mktemp("teams-engine")
    db = open_db(home / "kbloop.db")
    add_team(db, "eng", ("C0ENG",))
    add_team(db, "sales", ("C0SALES",))
    replace_document(db, "freeze.md", [NewPassage("freeze.md", "Deploy freeze, engineering", 0,
                                                  "Production deploys are frozen on Fridays after noon.")], team="eng")
    replace_document(db, "freeze.md", [NewPassage("freeze.md", "Deploy freeze, sales demos", 0,
                                                  "Sales demo deploys are frozen during the quarter-end close.")],
                     team="sales")
    replace_document(db, "holidays.md", [NewPassage("holidays.md", "Holidays", 0,
                                                    "Production deploys never happen on public holidays.")])
    embed_missing_passages(db)
    base = resolve_base("tiny", home=home, db=db)
    for version, seed, team in (("v1", 1, None), ("v2", 2, "eng")):
        path = make_lora_adapter(base, home / "adapters" / version, seed=seed)
        register_adapter(db, version=version, path=str(path), base_model="tiny", method="lora", params={"r": 8},
                         dataset_hash=None, dataset_size=0, metrics={}, team=team)
        activate_adapter(db, version)
    return {"home": home, "db": db}


@pytest.fixture(scope="module")
def engine(workspace):
    eng = Engine(db_path=workspace["home"] / "kbloop.db", home=workspace["home"], base_model="tiny",
                 config=EngineConfig(max_new_tokens=12)).start()
    assert eng.wait_ready(600), eng.error
    yield eng
    eng.close()


def test_each_team_gets_its_adapter_and_its_passages(engine, workspace):
    eng = engine.answer(Q, team="eng", model_only=True)
    sales = engine.answer(Q, team="sales", model_only=True)
    shared = engine.answer(Q, model_only=True)
    assert (eng.adapter_version, sales.adapter_version, shared.adapter_version) == ("v2", "v1", "v1")
    titles = {name: {s.title for s in a.sources} for name, a in (("eng", eng), ("sales", sales), ("none", shared))}
    assert "Deploy freeze, engineering" in titles["eng"] and "Deploy freeze, sales demos" not in titles["eng"]
    assert "Deploy freeze, sales demos" in titles["sales"] and "Deploy freeze, engineering" not in titles["sales"]
    assert not {"Deploy freeze, engineering", "Deploy freeze, sales demos"} & titles["none"]
    assert get_interaction(workspace["db"], eng.interaction_id).team == "eng"
    assert get_interaction(workspace["db"], shared.interaction_id).team is None
    assert engine.answer(Q, team="eng", adapter="v2", model_only=True, record=False).adapter_version == "v2"
    for team in (None, "sales"):  # eng's adapter learnt eng's examples: nobody else's question gets it
        with pytest.raises(StoreError, match="v2 is team 'eng''s adapter"):
            engine.answer(Q, team=team, adapter="v2", model_only=True, record=False)


def test_concurrent_questions_of_several_teams_each_get_the_answer_they_get_alone(engine):
    asks = [("eng", Q), ("sales", Q), (None, Q), ("eng", "Are deploys frozen on holidays?")] * 2
    alone = [engine.answer(q, team=t, model_only=True, record=False) for t, q in asks]
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda tq: engine.answer(tq[1], team=tq[0], model_only=True, record=False), asks))
    assert [(a.text, a.adapter_version) for a in together] == [(a.text, a.adapter_version) for a in alone]
    assert {a.adapter_version for a in together} == {"v1", "v2"}
