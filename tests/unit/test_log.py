"""The access log's hot path (EventLog.hot_event) writes the very line structlog's chain
would: the same fields, in the same order."""

from __future__ import annotations

import json
from pathlib import Path

from preforkd.log import EventLog


def test_hot_event_renders_as_structlog_does(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    log = EventLog("info", "json", str(path))
    log.after_fork(service="echo", worker=2, generation=3)
    fields = {"peer": "127.0.0.1:5000", "duration_ms": 1.5, "lines": 2, "bytes_in": 9, "bytes_out": 11,
              "reason": "client_closed"}
    log.logger(extra="x").info("connection.closed", **fields)
    log.logger(extra="x").hot("connection.closed")(**fields)
    slow, fast = (json.loads(line) for line in path.read_text().splitlines())
    assert list(slow) == list(fast)
    slow.pop("timestamp"), fast.pop("timestamp")
    assert slow == fast and fast["service"] == "echo" and fast["extra"] == "x"


def test_hot_event_below_the_level_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    log = EventLog("warning", "json", str(path))
    log.logger().hot("connection.closed")(peer="x")
    assert path.read_text() == ""


def test_a_buffered_hot_event_writes_whole_lines_at_once(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    log = EventLog("info", "json", str(path))
    hot = log.logger().hot("connection.closed", buffer=4096)
    for i in range(3):
        hot(n=i)
    assert path.read_text() == ""  # kept until the owner goes idle
    hot.flush()
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [0, 1, 2]
    for i in range(100):  # more than the buffer holds: written as it fills, never a partial line
        hot(n=i, pad="x" * 100)
    written = path.read_text()
    assert written.endswith("\n") and 3 < len(written.splitlines()) < 103
    hot.flush()
    assert len(path.read_text().splitlines()) == 103
