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
