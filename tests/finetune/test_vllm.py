"""Generation on vLLM (finetune.serving.vllm): the client against a stand-in vLLM server on loopback that
generates with the tiny base and real PEFT adapters (tests/fakes/vllm_server.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from finetune.serving.vllm import VllmClient, VllmError, VllmTarget
from tests.fakes.vllm_server import FakeVllm
from tests.finetune.test_engine import make_lora_adapter

pytestmark = pytest.mark.slow  # loads the tiny base in the stand-in server


@pytest.fixture(scope="module")
def adapters(tiny_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("home") / "adapters"
    for version, seed in (("v0001", 1), ("v0002", 2)):
        make_lora_adapter(tiny_path, folder / version, seed=seed)
    return folder


@pytest.fixture(scope="module")
def vllm(tiny_path):
    with FakeVllm(tiny_path, served_name="tiny-base") as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_adapters_load_under_their_version_and_answer_by_that_name(vllm, adapters, tokenizer, eot):
    client = VllmClient(VllmTarget(url=vllm.url, model="tiny-base"), adapters_dir=adapters)
    assert client.health() is None
    client.load_adapter("v0001", adapters / "v0001")
    client.load_adapter("v0001", adapters / "v0001")  # vLLM's "already been loaded" is not an error
    assert client.served_models() == {"tiny-base": None, "v0001": "tiny-base"}
    assert vllm.loaded == {"v0001": str((adapters / "v0001").resolve())}

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How do I set up the VPN?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    pieces: list[str] = []
    adapted = client.complete(ids, model="v0001", max_tokens=12, stop_ids=[eot], on_text=pieces.append)
    base = client.complete(ids, model="tiny-base", max_tokens=12, stop_ids=[eot])
    assert adapted.text and "".join(pieces) == adapted.text and len(pieces) > 1  # streamed, nothing lost
    assert adapted.finish_reason in ("stop", "length")
    assert adapted.text != base.text  # the adapter answered, not the base
    assert vllm.models_asked()[-2:] == ["v0001", "tiny-base"]

    client.unload_adapter("v0001")
    client.unload_adapter("v0001")  # gone already: not an error
    assert vllm.loaded == {}
    with pytest.raises(VllmError, match=r"v0001.*404.*does not exist"):
        client.complete(ids, model="v0001", max_tokens=4, stop_ids=[eot])


def test_adapter_paths_are_given_as_vllm_sees_them(vllm, adapters, tmp_path):
    mounted = tmp_path / "mnt" / "adapters"  # the same folder, mounted elsewhere on "the vLLM machine"
    mounted.parent.mkdir(parents=True)
    mounted.symlink_to(adapters)
    client = VllmClient(VllmTarget(url=vllm.url, model="tiny-base", adapter_dir=str(mounted)),
                        adapters_dir=adapters)
    client.load_adapter("v0002", adapters / "v0002")
    try:
        assert vllm.loaded["v0002"] == str(mounted / "v0002")
        with pytest.raises(VllmError, match="outside"):
            client.lora_path(tmp_path)
    finally:
        client.unload_adapter("v0002")


def test_failures_are_one_line_naming_the_server(vllm, adapters, eot):
    down = VllmClient(VllmTarget(url=f"http://127.0.0.1:{free_port()}", model="tiny-base"), adapters_dir=adapters)
    problem = down.health()
    assert problem and "unreachable" in problem and "\n" not in problem
    with pytest.raises(VllmError, match="unreachable"):
        down.complete([1, 2, 3], model="tiny-base", max_tokens=4, stop_ids=[eot])

    wrong_name = VllmClient(VllmTarget(url=vllm.url, model="Qwen/Qwen2.5-7B-Instruct"), adapters_dir=adapters)
    assert "not 'Qwen/Qwen2.5-7B-Instruct' (KBLOOP_VLLM_MODEL)" in wrong_name.health()

    client = VllmClient(VllmTarget(url=vllm.url, model="tiny-base"), adapters_dir=adapters)
    vllm.fail_completions(1)
    with pytest.raises(VllmError, match="answered 500: EngineCore encountered an issue"):
        client.complete([1, 2, 3], model="tiny-base", max_tokens=4, stop_ids=[eot])
    with pytest.raises(VllmError, match="No adapter found"):
        client.load_adapter("v0009", adapters)  # not an adapter folder: vLLM's refusal, in its words


# --- the engine on vLLM -------------------------------------------------------------------------------------

QUESTIONS = ["How do I set up the VPN on my laptop?", "年假有多少天？", "What is the minimum password length?"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from finetune.model.loading import resolve_base
    from finetune.serving.retrieval import embed_missing_passages
    from store import open_db
    from store.adapters import register_adapter
    from store.documents import import_documents
    from tests.conftest import SAMPLES

    home = tmp_path_factory.mktemp("vllm-home")
    db = open_db(home / "kbloop.db")
    kb = home / "kb"
    (kb / "zh").mkdir(parents=True)
    for name in ("vpn-laptop-setup.md", "password-2fa-policy.md", "zh/annual-leave.md"):  # small: quick to embed
        (kb / name).write_text((SAMPLES / "kb" / name).read_text(encoding="utf-8"), encoding="utf-8")
    import_documents(db, [kb])
    embed_missing_passages(db)
    base = resolve_base("tiny", home=home, db=db)
    for version, seed in (("v0001", 1), ("v0002", 2)):
        path = make_lora_adapter(base, home / "adapters" / version, seed=seed)
        register_adapter(db, version=version, path=str(path), base_model="tiny", method="lora", params={"r": 8},
                         dataset_hash=None, dataset_size=0, metrics={})
    return {"home": home, "db_path": home / "kbloop.db", "db": db, "base": base}


def engine_on(workspace, **config):
    from finetune.serving.engine import Engine, EngineConfig

    engine = Engine(db_path=workspace["db_path"], home=workspace["home"], base_model="tiny",
                    config=EngineConfig(max_new_tokens=12, **config)).start()
    assert engine.wait_ready(600), engine.error
    return engine


def test_the_engine_on_vllm_answers_as_in_process_and_follows_promotions(workspace):
    from store.adapters import activate_adapter, rollback_adapter

    db = workspace["db"]
    with FakeVllm(workspace["base"], served_name="tiny-base") as vllm:
        remote = engine_on(workspace, vllm=VllmTarget(url=vllm.url, model="tiny-base"), adapter_cache_size=1)
        local = engine_on(workspace)
        try:
            assert remote.remote and not local.remote
            activate_adapter(db, "v0001")
            pieces: list[str] = []
            first = remote.answer(QUESTIONS[0], record=False, on_text=pieces.append)
            assert first.adapter_version == "v0001" and first.notice is None and first.sources
            assert "".join(pieces) == first.text
            assert list(vllm.loaded) == ["v0001"] and vllm.models_asked() == ["v0001"]
            for question in QUESTIONS:  # the same prompt, tokens and stop set: the same greedy answer
                assert remote.answer(question, record=False).text == local.answer(question, record=False).text

            activate_adapter(db, "v0002")  # promote: the next question is answered by v0002
            recorded = remote.answer(QUESTIONS[1])
            assert recorded.adapter_version == "v0002" and recorded.interaction_id is not None
            assert list(vllm.loaded) == ["v0002"]  # the cache holds one: v0001 was unloaded
            assert remote.answer(QUESTIONS[1], record=False).text == local.answer(QUESTIONS[1], record=False).text

            rollback_adapter(db)
            rollback_adapter(db)  # back to the base model, which vLLM serves under its own name
            assert remote.answer(QUESTIONS[2], record=False).adapter_version is None
            assert vllm.models_asked()[-1] == "tiny-base"

            vllm.stop()  # vLLM goes away: one line, the usual notice, no traceback
            down = remote.answer(QUESTIONS[0], record=False)
            assert down.notice == "unavailable" and "vLLM at" in down.text and "\n" not in down.text
            assert remote.generation_problem() and "unreachable" in remote.generation_problem()
        finally:
            remote.close()
            local.close()
