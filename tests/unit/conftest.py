import pytest


@pytest.fixture
def notpu(capsys: pytest.CaptureFixture):
    """Run `notpu ARGS` in-process; returns (exit code, stderr)."""
    from runner.cli import main

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    return run
