"""One error root: every error a user can act on is a KbloopError, raised where the problem is found and
printed by the command line as one line (issue 17)."""

from __future__ import annotations

import pytest
import typer

from store.errors import ConfigError, KbloopError, StoreError


def test_every_user_facing_error_derives_from_kbloop_error():
    from kbloop.cli.app import UserError
    from kbloop.settings import SettingsError
    from playground.auth import AdminRequired
    from playground.config import PlaygroundError
    from store import NewerDatabaseError
    from store.formats import ImportFileError
    from store.jobs import JobAlreadyActive

    for error in (StoreError, ConfigError, SettingsError, PlaygroundError, AdminRequired, UserError,
                  NewerDatabaseError, ImportFileError, JobAlreadyActive):
        assert issubclass(error, KbloopError), error
    import store

    assert store.KbloopError is KbloopError and store.StoreError is StoreError and store.ConfigError is ConfigError


def test_config_validation_raises_a_config_error():
    from finetune.jobs.worker import WorkerConfig
    from finetune.training.config import TrainConfig, check_settings

    with pytest.raises(ConfigError, match="epochs must be positive"):
        check_settings(TrainConfig(epochs=0))
    with pytest.raises(ConfigError, match="method must be one of"):
        check_settings(TrainConfig(method="dora"))
    with pytest.raises(ConfigError, match="nproc must be at least 1"):
        WorkerConfig(nproc=0)


def test_a_retrain_request_with_bad_settings_is_refused_with_a_config_error(db):
    from finetune.jobs.queue import request_retrain

    with pytest.raises(ConfigError, match="unknown retrain parameter"):
        request_retrain(db, requester="U", params={"colour": "red"})
    with pytest.raises(ConfigError, match="learning rate"):
        request_retrain(db, requester="U", params={"train": {"learning_rate": 5}})


def test_the_command_line_prints_any_kbloop_error_as_one_line(capsys):
    from kbloop.cli.app import run

    demo = typer.Typer()

    class SomeLayerError(KbloopError):
        pass

    @demo.command()
    def broken(kind: str) -> None:
        raise {"config": ConfigError, "store": StoreError, "other": SomeLayerError}[kind](f"{kind} went wrong")

    for kind in ("config", "store", "other"):
        assert run(demo, [kind]) == 1
        captured = capsys.readouterr()
        assert captured.err == f"kbloop: {kind} went wrong\n" and "Traceback" not in captured.err


def test_a_bad_worker_setting_is_one_line_from_the_command_line(kbloop):
    assert kbloop("init").exit_code == 0
    result = kbloop("worker", "--once", "--nproc", "0")
    assert result.exit_code == 1
    assert result.stderr == "kbloop: worker nproc must be at least 1, not 0\n"
