"""`kbloop train`, `kbloop recommend`, `kbloop sweep` from the command line, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE_QA = REPO / "samples" / "qa.jsonl"


def _small_qa(tmp_path: Path, n: int) -> Path:
    lines = [l for l in SAMPLE_QA.read_text(encoding="utf-8").splitlines() if l.strip()][:n]
    path = tmp_path / f"qa{n}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_recommend_prints_the_rank_and_why(kbloop, tmp_path):
    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", SAMPLE_QA).exit_code == 0
    r = kbloop("recommend")
    assert r.exit_code == 0, r.stderr
    assert "Recommendation: LoRA / QLoRA, rank 8" in r.stdout
    assert "(< 1k)" in r.stdout and "zh/ja/ko" in r.stdout
    assert "kbloop train --rank 8 --alpha 32" in r.stdout


def test_recommend_on_a_file(kbloop, tmp_path):
    assert kbloop("init").exit_code == 0
    r = kbloop("recommend", "--data", _small_qa(tmp_path, 20))
    assert r.exit_code == 0 and "20 examples" in r.stdout


def test_recommend_with_no_examples_fails_cleanly(kbloop):
    assert kbloop("init").exit_code == 0
    r = kbloop("recommend")
    assert r.exit_code == 1 and r.stderr.startswith("kbloop: no examples")


@pytest.mark.parametrize("args, message", [
    (["--rank", "big"], "--rank: expected a number or `auto`"),
    (["--rank", "0"], "--rank: must be at least 1"),
    (["--method", "dora"], "--method: expected one of qlora, lora, full"),
    (["--out", "x"], "--out goes with --data"),
])
def test_train_refuses_bad_options_in_one_line(kbloop, args, message):
    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", SAMPLE_QA).exit_code == 0
    r = kbloop("train", *args)
    assert r.exit_code == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_train_with_no_examples_says_what_to_do(kbloop):
    assert kbloop("init").exit_code == 0
    r = kbloop("train")
    assert r.exit_code == 1 and "no approved examples" in r.stderr and "kbloop data import" in r.stderr


def test_train_on_a_file_with_a_secret_is_refused_before_training(kbloop, tmp_path):
    """--data trains without registering, but it is still a way into a model: the same scan as import."""
    qa = _small_qa(tmp_path, 12)
    leaky = json.dumps({"instruction": "How do I reach the billing bucket?",
                        "output": "Put this in .env: AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})
    qa.write_text(qa.read_text(encoding="utf-8") + leaky + "\n", encoding="utf-8")
    out = tmp_path / "adapter"
    assert kbloop("init").exit_code == 0
    r = kbloop("train", "--data", qa, "--out", out)
    assert r.exit_code == 1 and f"{qa}:13: contains" in r.stderr and "not trained" in r.stderr, r.stderr
    assert not out.exists()


def test_train_with_too_few_examples_gives_the_number(kbloop, tmp_path):
    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", _small_qa(tmp_path, 4)).exit_code == 0
    r = kbloop("train")
    assert r.exit_code == 1 and "only 4 training examples; at least 8" in r.stderr


def test_sweep_refuses_bad_ranks(kbloop):
    assert kbloop("init").exit_code == 0
    r = kbloop("sweep", "--ranks", "4,x")
    assert r.exit_code == 1 and "--ranks" in r.stderr


@pytest.mark.slow
def test_train_registers_a_candidate_and_logs_steps(kbloop, tmp_path):
    from store import open_db
    from store.adapters import list_adapters

    assert kbloop("init").exit_code == 0
    assert kbloop("kb", "import", REPO / "samples" / "kb", "--no-embed").exit_code == 0
    assert kbloop("data", "import", _small_qa(tmp_path, 14)).exit_code == 0
    r = kbloop("train", "--method", "lora", "--epochs", "1", "--rank", "4", "--batch", "4", "--max-length", "256",
               "--passages", "1")
    assert r.exit_code == 0, r.stderr
    assert "Training v1 on base tiny: lora, r=4" in r.stdout
    assert "tiny-base defaults:" in r.stdout and "random weights" in r.stdout
    assert "Registered v1 as a candidate" in r.stdout and "gate:" in r.stdout
    home = tmp_path / "kbloop-home"  # KBLOOP_HOME of the autouse fixture
    db = open_db(home / "kbloop.db")
    (adapter,) = list_adapters(db)
    assert adapter.version == "v1" and adapter.status == "candidate" and adapter.params["rank"] == 4
    assert (Path(adapter.path) / "adapter_model.safetensors").exists()
    steps = list(db.query("SELECT run, step, loss FROM train_steps ORDER BY step"))
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)) and steps
    assert all(s["run"] == "v1" and s["loss"] > 0 for s in steps)


@pytest.mark.slow
def test_train_on_a_file_writes_to_out_and_registers_nothing(kbloop, tmp_path):
    assert kbloop("init").exit_code == 0
    out = tmp_path / "file-adapter"
    r = kbloop("train", "--method", "lora", "--data", _small_qa(tmp_path, 12), "--out", out, "--epochs", "1", "--rank", "2",
               "--max-length", "192", "--passages", "0")
    assert r.exit_code == 0, r.stderr
    assert (out / "adapter_config.json").exists() and "not registered" in r.stdout
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    r = kbloop("adapters")
    assert "No adapters yet" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--from", "v 3"], "--from: expected `active`, `base` or an adapter version"),
    (["--from", "base", "--data", "x.jsonl", "--out", "o"], "--from goes with the store's examples"),
])
def test_train_from_is_checked_before_training(kbloop, args, message):
    assert kbloop("init").exit_code == 0
    r = kbloop("train", *args)
    assert r.exit_code == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_train_from_reaches_the_config(monkeypatch):
    from kbloop.cli.training import _config

    common = dict(base="tiny", method=None, rank=None, alpha=None, dropout=None, targets=None, epochs=None, lr=None,
                  batch=None, grad_accum=None, max_length=None, seed=42, version=None, passages=None)
    assert _config(**common).start_from is None  # the default: continue from the active adapter
    assert _config(**common, start_from="BASE").start_from == "base"
    assert _config(**common, start_from="active").start_from == "active"
    assert _config(**common, start_from="v3").start_from == "v3"


@pytest.mark.slow
def test_train_says_where_it_starts(kbloop, tmp_path):
    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", _small_qa(tmp_path, 10)).exit_code == 0
    r = kbloop("train", "--max-length", "256")
    assert r.exit_code == 0, r.stderr
    assert "training from the base: no adapter is active yet" in r.stdout
    assert kbloop("promote", "v1", "--force").exit_code == 0
    r = kbloop("train", "--method", "lora", "--epochs", "1", "--max-length", "256")
    assert r.exit_code == 0, r.stderr
    assert "training from the base, not continuing v1 (active): v1 was trained with full, this run uses lora" in r.stdout
