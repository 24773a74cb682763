"""Teams in the store (issue 20): the teams table, team_for_channel, and every team-aware read keeping a team's
rows to that team (shared rows: team NULL, seen by everyone)."""

import pytest

from store import StoreError, open_db
from store.adapters import activate_adapter, active_adapter, register_adapter, rollback_adapter, serving_adapter
from store.examples import (
    NewExample,
    add_examples,
    approved_snapshot,
    get_example,
    list_examples,
    review_example,
    set_example_team,
    training_examples,
)
from store.interactions import get_interaction, record_interaction, record_vote
from store.kb import NewPassage, replace_document, search_passages
from store.preferences import correction_pairs, voted_answers
from store.review import approve_interaction, review_items
from store.teams import SHARED, add_team, get_team, list_teams, parse_channels, remove_team, team_for_channel


@pytest.fixture
def db(tmp_path):
    return open_db(tmp_path / "kbloop.db")


def test_add_list_and_route_channels(db):
    add_team(db, "eng", ("C1", "C2"))
    add_team(db, "sales", ("C3",))
    assert [(t.name, t.channels) for t in list_teams(db)] == [("eng", ("C1", "C2")), ("sales", ("C3",))]
    assert team_for_channel(db, "C2") == "eng"
    assert team_for_channel(db, "C3") == "sales"
    assert team_for_channel(db, "C9") is None and team_for_channel(db, None) is None


def test_bad_names_channels_and_conflicts_are_refused_by_name(db):
    with pytest.raises(StoreError, match="team name 'Eng Team' is not valid"):
        add_team(db, "Eng Team", ())
    with pytest.raises(StoreError, match=r"not a Slack channel id: '#general'"):
        parse_channels("C1,#general")
    assert parse_channels(" C1, C2 ,C1,") == ("C1", "C2")
    add_team(db, "eng", ("C1",))
    with pytest.raises(StoreError, match="team 'eng' already exists"):
        add_team(db, "eng", ())
    with pytest.raises(StoreError, match=r"C1 \(team 'eng'\)"):
        add_team(db, "ops", ("C1",))
    with pytest.raises(StoreError, match=r"no team 'nope' \(teams: eng\)"):
        get_team(db, "nope")
    with pytest.raises(StoreError, match="no team 'nope'"):
        add_examples(db, [NewExample("q", "a")], team="nope")


def test_remove_keeps_rows_private_under_the_name(db):
    add_team(db, "eng", ("C1",))
    add_examples(db, [NewExample("How do I deploy?", "With the eng pipeline.")], team="eng")
    replace_document(db, "deploy.md", [NewPassage("deploy.md", "Deploy", 0, "eng pipeline steps")], team="eng")
    kept = remove_team(db, "eng")
    assert kept == {"examples": 1, "kb_docs": 1, "interactions": 0, "adapters": 0}
    assert list_teams(db) == [] and team_for_channel(db, "C1") is None
    # Nobody's question sees them: not shared, and no question routes to a team that does not exist.
    assert training_examples(db)[0] == [] and search_passages(db, "eng pipeline") == []
    add_team(db, "eng", ("C1",))  # back under the same name: back to the team
    assert [e.question for e in training_examples(db, team="eng")[0]] == ["How do I deploy?"]
    with pytest.raises(StoreError, match="no team 'ops'"):
        remove_team(db, "ops")


def test_passages_per_team_same_path_and_search_visibility(db):
    add_team(db, "eng", ())
    add_team(db, "sales", ())
    replace_document(db, "policy.md", [NewPassage("policy.md", "Policy", 0, "shared holiday policy")])
    replace_document(db, "policy.md", [NewPassage("policy.md", "Policy", 0, "eng holiday policy on call")], team="eng")
    replace_document(db, "policy.md", [NewPassage("policy.md", "Policy", 0, "sales holiday policy quota")], team="sales")
    assert db.execute("SELECT COUNT(*) FROM kb_docs").fetchone()[0] == 3

    def seen(team):
        return sorted(p.team or "-" for p, _ in search_passages(db, "holiday policy", team=team))

    assert seen(None) == ["-"]
    assert seen("eng") == ["-", "eng"]
    assert seen("sales") == ["-", "sales"]
    # Re-importing a team's document replaces that team's, not another's.
    replace_document(db, "policy.md", [NewPassage("policy.md", "Policy", 0, "eng holiday policy v2")], team="eng")
    assert sorted(r[0] or "-" for r in db.execute("SELECT team FROM kb_docs")) == ["-", "eng", "sales"]


def test_examples_per_team_and_training_selection(db):
    add_team(db, "eng", ())
    add_team(db, "sales", ())
    q = "What is the holiday policy?"
    assert add_examples(db, [NewExample(q, "shared answer")]) == (1, 0)
    assert add_examples(db, [NewExample(q, "eng answer")], team="eng") == (1, 0)  # its own, not a duplicate
    assert add_examples(db, [NewExample(q, "eng again")], team="eng") == (0, 1)
    assert add_examples(db, [NewExample("Quota?", "sales answer")], team="sales") == (1, 0)
    assert {e.answer for e in training_examples(db)[0]} == {"shared answer"}
    assert {e.answer for e in training_examples(db, team="eng")[0]} == {"shared answer", "eng answer"}
    assert {e.answer for e in approved_snapshot(db, team="sales")[0]} == {"shared answer", "sales answer"}
    assert approved_snapshot(db)[1] != approved_snapshot(db, team="eng")[1]
    assert {e.team for e in list_examples(db)} == {None, "eng", "sales"}


def test_interactions_votes_and_corrections_belong_to_the_team(db):
    add_team(db, "eng", ("C1",))
    shared = record_interaction(db, question="Q shared?", answer="A", source="slack", channel_id="C0")
    eng = record_interaction(db, question="Q eng?", answer="A", source="slack", channel_id="C1", team="eng")
    assert get_interaction(db, eng).team == "eng" and get_interaction(db, shared).team is None
    record_vote(db, interaction_id=eng, user_id="U1", vote=-1, correction="the eng fix")
    record_vote(db, interaction_id=shared, user_id="U1", vote=1)
    [correction] = list_examples(db, status="pending")
    assert correction.team == "eng"
    assert [v.interaction_id for v in voted_answers(db)[0]] == [shared]
    assert {v.interaction_id for v in voted_answers(db, team="eng")[0]} == {shared, eng}
    review_example(db, correction.id, decision="approved", reviewer="cur")
    assert correction_pairs(db)[0] == []
    assert [p.answer for p in correction_pairs(db, team="eng")[0]] == ["the eng fix"]


def _register(db, version, team=None):
    return register_adapter(db, version=version, path=f"/x/{version}", base_model="tiny", method="lora", params={},
                            dataset_hash=None, dataset_size=1, metrics={}, team=team)


def test_each_team_has_its_own_active_adapter_and_rollback(db):
    add_team(db, "eng", ())
    _register(db, "v1")
    _register(db, "v2", "eng")
    _register(db, "v3", "eng")
    activate_adapter(db, "v1")
    assert serving_adapter(db, "eng").version == "v1"  # no adapter of its own yet: the shared one
    activate_adapter(db, "v2")
    activate_adapter(db, "v3")
    assert active_adapter(db).version == "v1"  # a team's promotion leaves the shared adapter alone
    assert active_adapter(db, "eng").version == "v3" and serving_adapter(db, "eng").version == "v3"
    frm, to = rollback_adapter(db, "eng")
    assert (frm.version, to.version) == ("v3", "v2") and active_adapter(db).version == "v1"
    frm, to = rollback_adapter(db, "eng")
    assert (frm.version, to) == ("v2", None) and serving_adapter(db, "eng").version == "v1"
    with pytest.raises(StoreError, match="team 'eng' has no active adapter of its own"):
        rollback_adapter(db, "eng")


def test_curation_keeps_and_moves_teams(db):
    add_team(db, "eng", ("C1",))
    iid = record_interaction(db, question="How do I page on-call?", answer="Use the pager.", source="slack",
                             channel_id="C1", team="eng")
    record_vote(db, interaction_id=iid, user_id="U1", vote=1)
    shared_iid = record_interaction(db, question="Where is lunch?", answer="Canteen.", source="slack")
    record_vote(db, interaction_id=shared_iid, user_id="U1", vote=1)
    assert [r["id"] for r in review_items(db, team="eng")] == [iid]
    assert [r["id"] for r in review_items(db, team=SHARED)] == [shared_iid]
    example_id = approve_interaction(db, iid, reviewer="cur", answer="Use the pager app.")
    assert get_example(db, example_id).team == "eng"  # approving a team's answer keeps it the team's
    assert [e.id for e in list_examples(db, team="eng")] == [example_id] and list_examples(db, team=SHARED) == []

    shared = set_example_team(db, example_id, None)
    assert shared.team is None and [e.id for e in training_examples(db)[0]] == [example_id]
    add_examples(db, [NewExample("How do I page on-call?", "Eng's own way.")], team="eng")
    with pytest.raises(StoreError, match="team 'eng' already has an example asking 'How do I page on-call"):
        set_example_team(db, example_id, "eng")
    with pytest.raises(StoreError, match="no team 'ops'"):
        set_example_team(db, example_id, "ops")
