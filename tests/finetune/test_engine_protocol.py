"""The answer engine's contract (finetune.serving.protocol.AnswerEngine): the real Engine and the scripted engine the
bot's tests use (tests/fakes/engine.py) both provide every member the bot and the playground call, methods with the
protocol's exact signature, so the fake cannot drift from the engine it stands in for."""

import inspect

import pytest

from finetune.serving.engine import Engine
from finetune.serving.protocol import AnswerEngine
from tests.fakes.engine import ScriptedEngine


def _members() -> tuple[list[str], list[str]]:
    """(methods, data members: attributes and properties) the protocol names."""
    methods, data = [], list(AnswerEngine.__annotations__)
    for name, value in vars(AnswerEngine).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            data.append(name)
        elif inspect.isfunction(value):
            methods.append(name)
    return methods, data


def _parameters(func) -> list[tuple]:
    sig = inspect.signature(func)
    return [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()] + [sig.return_annotation]


def test_the_protocol_names_what_the_bot_and_the_playground_call():
    methods, data = _members()
    assert sorted(methods) == ["answer", "generation_problem"]
    assert sorted(data) == ["base_model", "error", "ready", "remote"]


@pytest.mark.parametrize("implementation", [Engine, ScriptedEngine], ids=["Engine", "ScriptedEngine"])
def test_an_implementation_has_every_method_with_the_protocols_signature(implementation):
    methods, _ = _members()
    for name in methods:
        assert _parameters(getattr(implementation, name)) == _parameters(getattr(AnswerEngine, name)), \
            f"{implementation.__name__}.{name}{inspect.signature(getattr(implementation, name))} differs from " \
            f"AnswerEngine.{name}{inspect.signature(getattr(AnswerEngine, name))}"


def test_both_engines_provide_every_data_member(tmp_path):
    _, data = _members()
    real = Engine(db_path=tmp_path / "kb.db", home=tmp_path, base_model="tiny")  # not started: nothing loads
    fake = ScriptedEngine(tmp_path / "kb.db")
    for engine in (real, fake):
        missing = [name for name in data if not hasattr(engine, name)]
        assert not missing, f"{type(engine).__name__} lacks {missing}"
        assert isinstance(engine, AnswerEngine)
    assert (real.ready, real.remote, real.error, real.generation_problem()) == (False, False, None, None)
    assert (fake.ready, fake.remote, fake.error, fake.generation_problem()) == (True, False, None, None)
