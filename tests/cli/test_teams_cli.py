"""`kbloop teams`, `--team` on the imports, and privacy from the command line: `kbloop kb search --team` and
`kbloop ask --channel C` see the shared rows and their own team's, never another team's (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.registry.folders import read_metadata
from store import open_db
from store.adapters import list_adapters, register_adapter
from store.interactions import get_interaction
from store.jobs import active_jobs
from tests.cli.test_train_cli import small_qa


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def teams(kbloop):
    assert kbloop("init").exit_code == 0
    assert kbloop("teams", "add", "eng", "--channels", "C0ENG1,C0ENG2").exit_code == 0
    assert kbloop("teams", "add", "sales", "--channels", "C0SALES").exit_code == 0
    return kbloop


def test_teams_add_list_remove(teams, db_path):
    r = teams("teams")
    assert r.exit_code == 0, r.stderr
    assert "eng  channels: C0ENG1, C0ENG2" in r.stdout and "sales  channels: C0SALES" in r.stdout
    assert "active adapter: shared" in r.stdout
    r = teams("teams", "remove", "sales")
    assert r.exit_code == 0 and "Team sales removed" in r.stdout
    assert "sales" not in teams("teams").stdout


def test_teams_bad_input_is_one_clear_line(teams):
    for args, message in [
        (("teams", "add", "eng"), "team 'eng' already exists"),
        (("teams", "add", "ops", "--channels", "C0ENG1"), "channel already belongs to another team: C0ENG1 (team 'eng')"),
        (("teams", "add", "ops", "--channels", "#general"), "not a Slack channel id: '#general'"),
        (("teams", "add", "Ops Team"), "team name 'Ops Team' is not valid"),
        (("teams", "remove", "ops"), "no team 'ops' (teams: eng, sales)"),
    ]:
        r = teams(*args)
        assert r.exit_code == 1 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_imports_with_a_team_that_does_not_exist_name_it(teams, tmp_path):
    qa = _write(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a."}])
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "doc.md").write_text("# Doc\n\nText.\n", encoding="utf-8")
    r = teams("data", "import", qa, "--team", "ops")
    assert r.exit_code == 1 and "no team 'ops' (teams: eng, sales)" in r.stderr
    r = teams("kb", "import", tmp_path / "kb", "--team", "ops", "--no-embed")
    assert r.exit_code == 1 and "no team 'ops'" in r.stderr
    r = teams("kb", "search", "doc", "--team", "ops")
    assert r.exit_code == 1 and "no team 'ops'" in r.stderr
    assert teams("data", "stats").stdout.count("approved 0") == 1  # nothing imported


def test_imports_belong_to_the_team_and_remove_keeps_them_private(teams, tmp_path, db_path):
    q = "What is the on-call rota?"
    shared = _write(tmp_path / "shared.jsonl", [{"question": q, "answer": "Ask your manager."}])
    eng = _write(tmp_path / "eng.jsonl", [{"question": q, "answer": "Eng rotates weekly."}])
    assert teams("data", "import", shared).exit_code == 0
    r = teams("data", "import", eng, "--team", "eng")
    assert r.exit_code == 0, r.stderr
    assert "1 example imported as approved for team eng, 0 duplicates skipped" in r.stdout  # not a duplicate
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "rota.md").write_text("# Rota\n\nEng on-call rotates weekly.\n", encoding="utf-8")
    r = teams("kb", "import", tmp_path / "kb", "--team", "eng", "--no-embed")
    assert r.exit_code == 0 and "1 document read for team eng" in r.stdout
    db = open_db(db_path)
    assert sorted((r[0] or "-") for r in db.execute("SELECT team FROM examples")) == ["-", "eng"]
    assert [r[0] for r in db.execute("SELECT team FROM kb_docs")] == ["eng"]
    assert "examples: 1  passages: 1" in teams("teams").stdout
    assert "#2 [import, team eng] Q: What is the on-call rota?" in teams("review", "--status", "approved").stdout
    only_eng = teams("review", "--status", "approved", "--team", "eng").stdout
    assert "#2 [import, team eng]" in only_eng and "#1 " not in only_eng
    assert "#2 " not in teams("review", "--status", "approved", "--team", "-").stdout
    r = teams("teams", "remove", "eng")
    assert r.exit_code == 0
    assert "Kept under the name 'eng', private: 1 example, 1 passage, 0 answers, 0 adapters" in r.stdout
    assert [r[0] for r in db.execute("SELECT team FROM kb_docs")] == ["eng"]  # neither deleted nor shared


def test_export_holds_a_teams_examples_only_with_its_team(teams, tmp_path):
    assert teams("data", "import", _write(tmp_path / "s.jsonl", [{"question": "Shared?", "answer": "Yes."}])).exit_code == 0
    eng = _write(tmp_path / "e.jsonl", [{"question": "Eng only?", "answer": "Yes, eng."}])
    assert teams("data", "import", eng, "--team", "eng").exit_code == 0

    def exported(*team):
        out = tmp_path / f"out-{len(team)}.jsonl"
        r = teams("data", "export", "--format", "sft", "--out", out, *team)
        assert r.exit_code == 0, r.stderr
        return [json.loads(line)["instruction"] for line in out.read_text(encoding="utf-8").splitlines()]

    assert exported() == ["Shared?"]
    assert exported("--team", "eng") == ["Shared?", "Eng only?"]
    r = teams("data", "export", "--format", "sft", "--out", tmp_path / "x.jsonl", "--team", "ops")
    assert r.exit_code == 1 and "no team 'ops'" in r.stderr and not (tmp_path / "x.jsonl").exists()


@pytest.fixture
def private_kb(teams, tmp_path):
    """One shared, one eng and one sales document, and an approved answer each for eng and sales."""
    kb = tmp_path / "kb"
    for team, text in [(None, "# Holidays\n\nEvery employee has 25 days of annual leave.\n"),
                       ("eng", "# Deploy freeze, engineering\n\nProduction deploys are frozen on Fridays; the release train "
                               "leaves Thursday at noon.\n"),
                       ("sales", "# Deploy freeze, sales demos\n\nThe sales demo environment deploys are frozen during the "
                                 "quarter-end close; codename MAGENTA.\n")]:
        folder = kb / (team or "shared")
        folder.mkdir(parents=True)
        (folder / "deploys.md" if team else folder / "holidays.md").write_text(text, encoding="utf-8")
        r = teams("kb", "import", folder, *(["--team", team] if team else []))
        assert r.exit_code == 0, r.stderr
    for team, answer in [("eng", "Eng deploys are frozen on Fridays."),
                         ("sales", "Sales demo deploys freeze at quarter end (MAGENTA).")]:
        qa = _write(tmp_path / f"{team}.jsonl", [{"question": "When are deploys frozen?", "answer": answer}])
        assert teams("data", "import", qa, "--team", team).exit_code == 0
    return teams


def test_kb_search_sees_shared_and_own_team_passages_only(private_kb):
    def hits(*team):
        r = private_kb("kb", "search", "When are deploys frozen?", "--json", *team)
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)

    eng = hits("--team", "eng")
    assert eng and all("MAGENTA" not in h["content"] for h in eng)
    assert any("Fridays" in h["content"] for h in eng)
    sales = hits("--team", "sales")
    assert sales and all("Fridays" not in h["content"] for h in sales)
    assert all("Deploy" not in h["title"] for h in hits())  # no team: the shared holiday page at most


def test_ask_channel_routes_verified_answers_to_the_team_and_records_it(private_kb, tmp_path, db_path, monkeypatch):
    monkeypatch.setenv("KBLOOP_BASE_MODEL", str(tmp_path / "no-such-model"))  # verified answers need no model
    r = private_kb("ask", "When are deploys frozen?", "--channel", "C0ENG2", "--json")
    assert r.exit_code == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["verified"] and answer["text"] == "Eng deploys are frozen on Fridays." and answer["team"] == "eng"
    row = get_interaction(open_db(db_path), answer["interaction_id"])
    assert (row.team, row.channel_id) == ("eng", "C0ENG2")
    r = private_kb("ask", "When are deploys frozen?", "--channel", "C0SALES", "--json")
    assert json.loads(r.stdout)["text"] == "Sales demo deploys freeze at quarter end (MAGENTA)."
    # No team's channel, or none at all: no team's approved answer; the model would be asked (and fails to load).
    for args in (("--channel", "C0OTHER"), ()):
        r = private_kb("ask", "When are deploys frozen?", *args)
        assert r.exit_code == 1 and "could not load the model" in r.stderr, r.stdout
    r = private_kb("ask", "When are deploys frozen?", "--channel", "C1,C2")
    assert r.exit_code == 1 and "--channel takes one Slack channel id" in r.stderr
    # A team's adapter learnt the team's examples: it answers no other team's questions, nor questions of no team.
    register_adapter(open_db(db_path), version="v1", path=str(tmp_path / "v1"), base_model="tiny", method="lora",
                     params={}, dataset_hash=None, dataset_size=1, metrics={}, team="eng")
    for args in ((), ("--channel", "C0SALES")):
        r = private_kb("ask", "When are deploys frozen?", "--adapter", "v1", *args)
        assert r.exit_code == 1 and "v1 is team 'eng''s adapter: it answers only that team's questions" in r.stderr


@pytest.mark.slow
def test_ask_channel_generates_from_the_teams_passages_only(private_kb, db_path):
    # --model-only: no verified answer, so the engine retrieves and generates (tiny base) for each team.
    def sources(*channel):
        r = private_kb("ask", "When are deploys frozen?", "--model-only", "--json", "--max-new-tokens", "4", *channel)
        assert r.exit_code == 0, r.stderr
        answer = json.loads(r.stdout)
        return answer, {s["title"] for s in answer["sources"]}

    eng, eng_sources = sources("--channel", "C0ENG1")
    sales, sales_sources = sources("--channel", "C0SALES")
    # The same path, deploys.md, in two teams: each question cites its own team's document (and maybe shared ones).
    assert "Deploy freeze, engineering" in eng_sources and "Deploy freeze, sales demos" not in eng_sources
    assert "Deploy freeze, sales demos" in sales_sources and "Deploy freeze, engineering" not in sales_sources
    db = open_db(db_path)
    prompt_teams = {r[0] for r in db.execute("SELECT team FROM interactions WHERE id IN (?, ?)",
                                             [eng["interaction_id"], sales["interaction_id"]])}
    assert prompt_teams == {"eng", "sales"}
    none, none_sources = sources()
    assert not any(t.startswith("Deploy freeze") for t in none_sources) and none["team"] is None


@pytest.mark.slow
def test_train_team_trains_on_shared_and_team_examples_and_registers_for_the_team(teams, tmp_path, db_path):
    assert teams("data", "import", small_qa(tmp_path, 8)).exit_code == 0  # shared
    eng = _write(tmp_path / "eng.jsonl", [{"question": f"What is eng runbook step {n}?",
                                           "answer": f"Eng runbook step {n} is to page the on-call."} for n in range(6)])
    assert teams("data", "import", eng, "--team", "eng").exit_code == 0
    sales = _write(tmp_path / "sales.jsonl", [{"question": "What is the sales codename?", "answer": "MAGENTA."}])
    assert teams("data", "import", sales, "--team", "sales").exit_code == 0
    r = teams("train", "--team", "eng", "--method", "lora", "--epochs", "1", "--rank", "2", "--batch", "4",
              "--max-length", "128", "--passages", "0")
    assert r.exit_code == 0, r.stderr
    assert "Team eng: 14 approved examples (shared and the team's)." in r.stdout
    assert "Registered v1 as a candidate for team eng" in r.stdout and "gate:" in r.stdout
    [adapter] = list_adapters(open_db(db_path))
    assert adapter.team == "eng" and adapter.dataset_size == 14 and adapter.status == "candidate"
    assert read_metadata(Path(adapter.path))["team"] == "eng"
    r = teams("promote", "v1", "--force")
    assert r.exit_code == 0 and "v1 is now team eng's active adapter" in r.stdout
    assert "eng  channels: C0ENG1, C0ENG2  examples: 6  passages: 0  active adapter: v1" in teams("teams").stdout
    assert "sales  channels: C0SALES  examples: 1  passages: 0  active adapter: shared" in teams("teams").stdout


def test_jobs_retrain_team_queues_the_teams_job(teams, db_path):
    r = teams("jobs", "retrain", "--team", "ops")
    assert r.exit_code == 1 and "no team 'ops'" in r.stderr
    r = teams("jobs", "retrain", "--team", "eng")
    assert r.exit_code == 0, r.stderr
    [job] = active_jobs(open_db(db_path))
    assert job.params == {"team": "eng"}
    assert "for team eng is queued" in teams("jobs").stdout
