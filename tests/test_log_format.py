"""What a service's stderr carries: `--log-format json` lines (one object each, a traceback included) and
progress lines, shown on a terminal only. A real peer's JSON log is checked in tests/test_metrics.py."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import pytest

from protos.cli import JsonFormatter, progress


def _record(message: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("peer.main", logging.WARNING, __file__, 1, message, args, exc_info)


def test_a_json_log_line_is_one_object_with_its_traceback() -> None:
    try:
        raise ValueError('bad "quoted"\nvalue')
    except ValueError:
        exc_info = sys.exc_info()
    line = JsonFormatter().format(_record("serving model=%s blocks=[%d,%d)", "m", 0, 4, exc_info=exc_info))
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "WARNING",
        "peer.main",
        "serving model=m blocks=[0,4)",
    )
    assert entry["time"].endswith("+00:00") and isinstance(entry["pid"], int)
    assert 'ValueError: bad "quoted"' in entry["exception"]


class _Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_shows_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    stderr = _Terminal(tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress("loading blocks [0,4)"):
        time.sleep(0.6)  # one redraw
    assert ("loading blocks [0,4): 00:00" in stderr.getvalue()) == tty


def test_progress_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _Terminal(True)
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress("measuring throughput", enabled=False):
        pass
    assert stderr.getvalue() == ""
