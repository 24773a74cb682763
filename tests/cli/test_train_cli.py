"""`kbloop train`, `kbloop recommend`, `kbloop sweep` from the command line, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SAMPLES

SAMPLE_QA = SAMPLES / "qa.jsonl"


def small_qa(tmp_path: Path, n: int) -> Path:
    lines = [line for line in SAMPLE_QA.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
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
    r = kbloop("recommend", "--data", small_qa(tmp_path, 20))
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
    (["--objective", "ppo"], "--objective: expected one of sft, kto, dpo"),
])
def test_train_refuses_bad_options_in_one_line(kbloop, args, message):
    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", SAMPLE_QA).exit_code == 0
    r = kbloop("train", *args)
    assert r.exit_code == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _register_active(db, home: Path) -> None:
    """An active LoRA adapter on tiny (its folder complete enough for the registry; never loaded here)."""
    from store.adapters import activate_adapter, register_adapter

    folder = home / "adapters" / "v1"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0")
    register_adapter(db, version="v1", path=str(folder), base_model="tiny", method="lora",
                     params={"k_passages": 0}, dataset_hash="h", dataset_size=20, metrics={})
    activate_adapter(db, "v1")


def test_preference_objectives_say_what_is_missing_in_one_line(kbloop, db, kbloop_home, tmp_path):
    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", small_qa(tmp_path, 20)).exit_code == 0
    r = kbloop("train", "--objective", "kto")
    assert r.exit_code == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "continues the active adapter and none is active" in r.stderr
    _register_active(db, kbloop_home)
    r = kbloop("train", "--objective", "dpo")
    assert r.exit_code == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "no correction pairs to train DPO on" in r.stderr
    r = kbloop("train", "--objective", "kto")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "KTO needs at least 4 votes with both 👍 and 👎" in r.stderr
    r = kbloop("train", "--objective", "kto", "--data", small_qa(tmp_path, 20), "--out", tmp_path / "o")
    assert r.exit_code == 1 and "--objective kto and dpo train on the store's votes" in r.stderr


def test_train_with_no_examples_says_what_to_do(kbloop):
    assert kbloop("init").exit_code == 0
    r = kbloop("train")
    assert r.exit_code == 1 and "no approved examples" in r.stderr and "kbloop data import" in r.stderr


def test_train_on_a_file_with_a_secret_is_refused_before_training(kbloop, tmp_path):
    """--data trains without registering, but it is still a way into a model: the same scan as import."""
    qa = small_qa(tmp_path, 12)
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
    assert kbloop("data", "import", small_qa(tmp_path, 4)).exit_code == 0
    r = kbloop("train")
    assert r.exit_code == 1 and "only 4 training examples; at least 8" in r.stderr


def test_sweep_refuses_bad_ranks(kbloop):
    assert kbloop("init").exit_code == 0
    r = kbloop("sweep", "--ranks", "4,x")
    assert r.exit_code == 1 and "--ranks" in r.stderr


def test_sweep_on_tiny_refuses_the_full_fine_tuning_it_would_otherwise_repeat(kbloop, tmp_path):
    """On `tiny` the default method is full fine-tuning, which has no rank: the sweep would train the same run
    once per rank. It says so instead, in one line, and trains nothing."""
    from store import open_db
    from store.adapters import list_adapters

    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", small_qa(tmp_path, 14)).exit_code == 0
    for args in ((), ("--method", "full")):
        r = kbloop("sweep", "--ranks", "4,8", *args)
        assert r.exit_code == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "rank to sweep" in r.stderr
    assert list_adapters(open_db(tmp_path / "kbloop-home" / "kbloop.db")) == []


def test_sweep_trains_one_lora_run_per_rank_each_from_the_base(kbloop, tmp_path, monkeypatch):
    """The sweep's training path: what each run is asked to train, as training will resolve it."""
    from types import SimpleNamespace

    import finetune.registry.candidates
    from finetune.training.config import resolve_config
    from store.adapters import register_adapter

    asked = []

    def fake_train_candidate(db, *, home, config, on_step=None, on_phase=None, **kw):
        resolved, _ = resolve_config(config, tiny=True, n_examples=13)
        asked.append((config, resolved))
        loss = {2: 2.0, 4: 1.5, 8: 1.7}[resolved.rank]
        adapter = register_adapter(db, version=config.version, path=str(home / "adapters" / config.version),
                                   base_model=config.base, method=resolved.method,
                                   params={"rank": resolved.rank}, dataset_hash=None, dataset_size=14,
                                   metrics={"heldout_loss": loss, "heldout_exact_match": 0.5})
        return SimpleNamespace(adapter=adapter)

    monkeypatch.setattr(finetune.registry.candidates, "train_candidate", fake_train_candidate)
    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", small_qa(tmp_path, 14)).exit_code == 0
    r = kbloop("sweep", "--ranks", "8,2,4", "--method", "lora")
    assert r.exit_code == 0, r.stderr
    assert [(res.method, res.rank, res.alpha) for _, res in asked] == [("lora", 2, 8), ("lora", 4, 16), ("lora", 8, 32)]
    assert {cfg.start_from for cfg, _ in asked} == {"base"} and [cfg.version for cfg, _ in asked] == ["v1", "v2", "v3"]
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["2"], ["4"], ["8"])]
    assert [row[:2] for row in rows] == [["2", "v1"], ["4", "v2"], ["8", "v3"]] and rows[1][-1] == "best"
    assert "Best: rank 4 (v2)" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two trainings and four evaluations: past the default 600 s on a busy 2-core machine
def test_sweep_on_tiny_with_lora_trains_and_registers_each_rank(kbloop, tmp_path):
    import json as _json

    from store import open_db
    from store.adapters import list_adapters

    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", small_qa(tmp_path, 14)).exit_code == 0
    r = kbloop("sweep", "--ranks", "2,4", "--method", "lora", "--epochs", "1", "--batch", "4", "--max-length", "256")
    assert r.exit_code == 0, r.stderr
    adapters = sorted(list_adapters(open_db(tmp_path / "kbloop-home" / "kbloop.db")), key=lambda a: a.version)
    assert [(a.version, a.method, a.params["rank"]) for a in adapters] == [("v1", "lora", 2), ("v2", "lora", 4)]
    ranks = [_json.loads((Path(a.path) / "adapter_config.json").read_text())["r"] for a in adapters]
    assert ranks == [2, 4] and "Best: rank" in r.stdout


@pytest.mark.slow
def test_train_registers_a_candidate_and_logs_steps(kbloop, tmp_path):
    from store import open_db
    from store.adapters import list_adapters

    assert kbloop("init").exit_code == 0
    assert kbloop("kb", "import", SAMPLES / "kb", "--no-embed").exit_code == 0
    assert kbloop("data", "import", small_qa(tmp_path, 14)).exit_code == 0
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
    r = kbloop("train", "--method", "lora", "--data", small_qa(tmp_path, 12), "--out", out, "--epochs", "1", "--rank", "2",
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
    from kbloop.cli.training import config_from_options

    common = dict(base="tiny", method=None, rank=None, alpha=None, dropout=None, targets=None, epochs=None, lr=None,
                  batch=None, grad_accum=None, max_length=None, seed=42, version=None, passages=None)
    assert config_from_options(**common).start_from is None  # the default: continue from the active adapter
    assert config_from_options(**common, start_from="BASE").start_from == "base"
    assert config_from_options(**common, start_from="active").start_from == "active"
    assert config_from_options(**common, start_from="v3").start_from == "v3"


@pytest.mark.slow
def test_train_says_where_it_starts(kbloop, tmp_path):
    assert kbloop("init").exit_code == 0
    assert kbloop("data", "import", small_qa(tmp_path, 10)).exit_code == 0
    # One epoch of tiny's default method (full): where a run starts is decided before it trains, so the
    # defaults' memorisation run (hundreds of steps) would only add minutes.
    r = kbloop("train", "--epochs", "1", "--max-length", "256")
    assert r.exit_code == 0, r.stderr
    assert "training from the base: no adapter is active yet" in r.stdout
    assert kbloop("promote", "v1", "--force").exit_code == 0
    r = kbloop("train", "--method", "lora", "--epochs", "1", "--max-length", "256")
    assert r.exit_code == 0, r.stderr
    assert "training from the base, not continuing v1 (active): v1 was trained with full, this run uses lora" in r.stdout
