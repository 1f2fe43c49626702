"""Running `ft` in-process the way the CLI tests do, and reading its one-line errors."""

from __future__ import annotations

from finetune.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`ft ARGV...` in this process: (exit code, stdout, stderr) of this call only."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The single `ft: error: ...` line that bad input must produce (and no traceback)."""
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ft: error: "), err
    return lines[0]


def error_line(err: str) -> str:
    """The one `ft: error: ...` line of a command that also reports progress on stderr."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ft: error:")]
    assert len(lines) == 1, err
    return lines[0]
