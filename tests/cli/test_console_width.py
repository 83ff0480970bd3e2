"""The stdout console's width is decided when a command runs, not when aptp.cli is imported."""

from __future__ import annotations

import io

from aptp.cli import common


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _width_inside_a_command() -> int:
    return common.command(lambda: common.out.size.width)()


def test_width_follows_columns_and_pipes_at_run_time(monkeypatch):
    monkeypatch.setattr("sys.stdout", _Pipe())
    monkeypatch.setenv("COLUMNS", "61")
    assert _width_inside_a_command() == 61  # set after import: still honoured
    monkeypatch.delenv("COLUMNS")
    assert _width_inside_a_command() == common._PIPE_WIDTH  # piped, no COLUMNS: room for tables
    monkeypatch.setattr("sys.stdout", _Terminal())
    monkeypatch.setenv("COLUMNS", "73")
    assert _width_inside_a_command() == 73  # a terminal: rich measures (COLUMNS wins there too)
