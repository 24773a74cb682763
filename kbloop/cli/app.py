"""The Typer application, shared context, and error handling for every command."""

from __future__ import annotations

import sys
from functools import cached_property

import typer

from kbloop.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    name="kbloop",
    help="Close the loop between a company knowledge base, a fine-tuned model, and the people using it in Slack.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


class UserError(Exception):
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


def run(application: typer.Typer, args: list[str] | None = None) -> int:
    """Run the CLI, turning the project's own errors into one clear line on stderr."""
    from store import StoreError

    try:
        application(args=args, standalone_mode=False)
    except (UserError, SettingsError, StoreError) as exc:
        for line in str(exc).splitlines() or ["error"]:
            print(f"kbloop: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kbloop: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer.Exit inside commands
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # click's usage errors have their own formatting
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            print("kbloop: aborted", file=sys.stderr)
            return 1
        raise
    return 0
