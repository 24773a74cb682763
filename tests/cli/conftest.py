import pytest

from kbloop.cli import app
from kbloop.cli.app import run


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.exit_code, self.stdout, self.stderr = code, out, err


@pytest.fixture
def kbloop(capsys):
    """Run `kbloop ARGS…` in-process; returns exit code, stdout, stderr."""

    def invoke(*args: str) -> Result:
        capsys.readouterr()
        code = run(app, [str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke
