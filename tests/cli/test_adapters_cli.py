"""`kbloop eval | adapters | promote | rollback | export` in-process, on a real store."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from store import adapters as rows
from store.audit import list_audit

GOOD = {"heldout_loss": 1.0, "heldout_exact_match": 0.5, "heldout_token_f1": 0.7, "stop_rate": 0.9,
        "n_heldout": 10, "n_train_sampled": 32}


@pytest.fixture
def workspace(kbloop, db):
    assert kbloop("init").exit_code == 0
    return db


def _register(db, home: Path, version: str, metrics: dict, *, against: str = "base", team: str | None = None) -> None:
    from finetune.evaluation.gate import gate

    folder = home / "adapters" / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0")
    verdict = gate(metrics, GOOD, active_label=against)
    rows.register_adapter(db, version=version, path=str(folder), base_model="tiny", method="lora", params={},
                          dataset_hash="h", dataset_size=40,
                          metrics=metrics | {"gate": {"against": against, "against_metrics": GOOD,
                                                      "passed": verdict.passed, "reasons": verdict.reasons}},
                          team=team)


def test_adapters_show_what_each_version_learnt_from(kbloop, workspace, kbloop_home):
    _register(workspace, kbloop_home, "v1", GOOD)
    folder = kbloop_home / "adapters" / "v2"
    folder.mkdir(parents=True)
    rows.register_adapter(workspace, version="v2", path=str(folder), base_model="tiny", method="lora",
                          params={"objective": "kto"}, dataset_hash="h", dataset_size=40, metrics=GOOD)
    r = kbloop("adapters")
    assert r.exit_code == 0, r.stderr
    header, *lines = r.stdout.splitlines()
    assert "objective" in header.split()
    by_version = {line.split()[0]: line.split() for line in lines}
    assert "sft" in by_version["v1"] and "kto" in by_version["v2"]


def test_every_adapter_command_has_help(kbloop):
    for cmd in ("eval", "adapters", "promote", "rollback", "export"):
        r = kbloop(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.stdout, cmd


def test_adapters_lists_versions_with_status_and_metrics(kbloop, workspace, kbloop_home):
    r = kbloop("adapters")
    assert r.exit_code == 0 and "No adapters yet" in r.stdout
    _register(workspace, kbloop_home, "v1", GOOD)
    _register(workspace, kbloop_home, "v2", GOOD | {"heldout_loss": 3.0})
    assert kbloop("promote", "v1").exit_code == 0
    lines = kbloop("adapters").stdout.splitlines()
    assert lines[0].split()[:4] == ["version", "team", "status", "method"]
    v1 = next(line for line in lines if " v1 " in line)
    v2 = next(line for line in lines if " v2 " in line)
    assert v1.startswith("*") and "active" in v1 and "1.000" in v1 and "50.0%" in v1 and "pass vs base" in v1
    assert "candidate" in v2 and "3.000" in v2 and "fail vs base" in v2


def test_promote_and_rollback(kbloop, workspace, kbloop_home):
    _register(workspace, kbloop_home, "v1", GOOD)
    r = kbloop("promote", "v1")
    assert r.exit_code == 0, r.stderr
    assert "v1 is now the active adapter." in r.stdout and "held-out loss" in r.stdout
    assert list_audit(workspace)[0]["actor"] == f"cli:{getpass.getuser()}"

    _register(workspace, kbloop_home, "v2", GOOD | {"heldout_exact_match": 0.1}, against="v1")
    r = kbloop("promote", "v2")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("kbloop: v2 not promoted: held-out exact match 10.0% is below")
    assert len(r.stderr.strip().splitlines()) == 1 and "--force" in r.stderr
    r = kbloop("promote", "v2", "--force")
    assert r.exit_code == 0 and "forced" in r.stdout
    assert rows.active_adapter(workspace).version == "v2"

    r = kbloop("rollback")
    assert r.exit_code == 0 and r.stdout.strip() == "Rolled back from v2 to v1."
    r = kbloop("rollback")
    assert r.exit_code == 0 and r.stdout.strip() == "Rolled back from v1 to the base model (no adapter)."
    r = kbloop("rollback")
    assert r.exit_code == 1 and "nothing to roll back" in r.stderr


def test_unknown_versions_and_existing_export_folder(kbloop, workspace, kbloop_home, tmp_path):
    _register(workspace, kbloop_home, "v1", GOOD)
    for cmd in (["eval", "v5"], ["promote", "v5"], ["export", "v5", "--merged", str(tmp_path / "o")]):
        r = kbloop(*cmd)
        assert r.exit_code == 1 and r.stderr.strip() == "kbloop: no adapter 'v5' (known: v1)", (cmd, r.stderr)
    (tmp_path / "taken").mkdir()
    r = kbloop("export", "v1", "--merged", str(tmp_path / "taken"))
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = kbloop("export", "v1")
    assert r.exit_code == 1 and r.stderr.strip() == "kbloop: --merged OUT is required: the folder to write the merged model to"


@pytest.mark.slow
def test_eval_and_export_on_the_tiny_base(kbloop, workspace, kbloop_home, tmp_path):
    from finetune.model.loading import resolve_base
    from tests.finetune.registry_fixtures import make_lora_adapter, seed_store

    db = workspace
    seed_store(db, n_examples=12)
    base = resolve_base("tiny", home=kbloop_home, db=db)
    folder = make_lora_adapter(base, kbloop_home / "adapters" / "v1", seed=3)
    rows.register_adapter(db, version="v1", path=str(folder), base_model="tiny", method="lora", params={},
                          dataset_hash="h", dataset_size=12, metrics={})

    r = kbloop("eval", "v1", "--train-sample", "2")
    assert r.exit_code == 0, r.stderr
    assert "v1 on " in r.stdout and "held-out token F1" in r.stdout and "gate: " in r.stdout
    assert r.stdout.count("base") >= 1 and "evaluating v1" in r.stderr
    stored = rows.get_adapter(db, "v1").metrics
    assert stored["gate"]["against"] == "base" and stored["n_heldout"] >= 1
    assert json.loads((folder / "kbloop_adapter.json").read_text())["metrics"]["heldout_loss"] == stored["heldout_loss"]

    r = kbloop("export", "v1", "--merged", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.stderr
    assert "Merged model written to" in r.stdout and (tmp_path / "merged" / "model.safetensors").exists()


def test_each_team_promotes_and_rolls_back_its_own_adapter(kbloop, workspace, kbloop_home):
    # Issue 20: `promote V` acts on V's team; the team's gate compares with what answers the team now.
    assert kbloop("teams", "add", "eng", "--channels", "C0ENG").exit_code == 0
    _register(workspace, kbloop_home, "v1", GOOD)
    assert kbloop("promote", "v1").exit_code == 0
    _register(workspace, kbloop_home, "v2", GOOD, against="v1", team="eng")  # judged against the shared v1
    r = kbloop("promote", "v2")
    assert r.exit_code == 0 and "v2 is now team eng's active adapter." in r.stdout, r.stderr
    assert rows.active_adapter(workspace).version == "v1" and rows.active_adapter(workspace, "eng").version == "v2"
    lines = kbloop("adapters").stdout.splitlines()
    assert next(line for line in lines if " v1 " in line).split()[:4] == ["*", "v1", "-", "active"]
    assert next(line for line in lines if " v2 " in line).split()[:4] == ["*", "v2", "eng", "active"]
    _register(workspace, kbloop_home, "v3", GOOD, against="v1", team="eng")  # compared before v2 was promoted
    r = kbloop("promote", "v3")
    assert r.exit_code == 1 and "v3 was compared with v1, but v2 is active now" in r.stderr
    assert "active adapter: v2" in kbloop("teams").stdout
    r = kbloop("rollback", "--team", "eng")
    assert r.exit_code == 0 and r.stdout.strip() == "Rolled back team eng from v2 to the shared adapter."
    assert rows.active_adapter(workspace).version == "v1"  # the shared adapter was not touched
    r = kbloop("rollback", "--team", "eng")
    assert r.exit_code == 1 and "team 'eng' has no active adapter of its own: nothing to roll back" in r.stderr
    r = kbloop("rollback", "--team", "ops")
    assert r.exit_code == 1 and "no team 'ops'" in r.stderr
