"""kbloop's errors: one root, `KbloopError`, that every error a user can act on derives from.

It lives in the bottom layer (store imports nothing of kbloop's other packages), so that every layer,
finetune, bot, playground and the command root, can raise and catch it. The command line (kbloop.cli.app.run)
and the training child (finetune.jobs.child) catch this one type and print its message as one line.

    KbloopError
    ├── StoreError        the database and the data in it (store.JobAlreadyActive, store.ImportFileError, …)
    ├── ConfigError       a training, worker or job setting that cannot work (finetune.training.config.check_settings)
    ├── SettingsError     kbloop.settings: a missing or malformed environment variable
    ├── PlaygroundError   playground.config
    ├── BotConfigError    bot.config: a missing or malformed Slack setting
    └── UserError         kbloop.cli.app: anything else a command refuses
"""

from __future__ import annotations


class KbloopError(Exception):
    """An error the user can act on; the message says what and where, in one line (or one per problem)."""


class StoreError(KbloopError):
    """A problem with the database or the data in it that the user can act on."""


class ConfigError(KbloopError):
    """A setting that cannot work (training, worker, job parameters); the message names it and what it must be."""


__all__ = ["KbloopError", "StoreError", "ConfigError"]
