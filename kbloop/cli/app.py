"""The Typer application, shared context, and error handling for every command."""

from __future__ import annotations

import sys
from functools import cached_property

import typer

from kbloop.settings import Settings, load_settings
from store.errors import KbloopError

app = typer.Typer(
    name="kbloop",
    help="Close the loop between a company knowledge base, a fine-tuned model, and the people using it in Slack.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


class UserError(KbloopError):
    """An error the user can fix; printed as one line (or one line per problem), exit status 1."""


class Context:
    """Settings and the database, opened on first use."""

    @cached_property
    def settings(self) -> Settings:
        return load_settings()

    @cached_property
    def db(self):
        from store import open_db

        return open_db(self.settings.db_path, create=False)


def ctx() -> Context:
    return Context()


def fail(message: str) -> None:
    raise UserError(message)


def _cli_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts, exits) of Typer's vendored click and of click itself, whichever is in use."""
    usage, aborts, exits = [], [], []
    try:
        from typer import _click
        from typer.exceptions import Abort, Exit

        usage.append(_click.exceptions.ClickException)
        aborts.append(Abort)
        exits.append(Exit)
    except ImportError:
        pass
    import click

    usage.append(click.exceptions.ClickException)
    aborts.append(click.exceptions.Abort)
    exits.append(click.exceptions.Exit)
    return tuple(usage), tuple(aborts), tuple(exits)


def run(application: typer.Typer, args: list[str] | None = None) -> int:
    """Run the CLI, turning the project's own errors (KbloopError) into one clear line on stderr."""
    usage_errors, aborts, exits = _cli_exceptions()
    try:
        result = application(args=args, standalone_mode=False)
    except KbloopError as exc:
        for line in str(exc).splitlines() or ["error"]:
            print(f"kbloop: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kbloop: interrupted", file=sys.stderr)
        return 130
    except usage_errors as exc:  # bad options: the usage line and the problem, as click formats them
        exc.show()
        return exc.exit_code
    except aborts:
        print("kbloop: aborted", file=sys.stderr)
        return 1
    except exits as exc:
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # standalone_mode=False hands back typer.Exit's code as the return value.
    return result if isinstance(result, int) else 0
