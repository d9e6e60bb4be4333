"""The suite's load generator (conftest.Load) as a program, for a network namespace
the test process is not in (``nsenter -n``): ``python load_client.py HOST PORT``
sends short echo exchanges until its standard input closes, then prints the counts
as one JSON object (``short_ok``, ``refused``, ``reset``, ...) and, as
``ok_after_mark``, the successes after a line ``mark`` arrived on standard input."""

from __future__ import annotations

import json
import sys

from conftest import Load


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    load = Load((host, port), short=3, long=0)
    with load:
        print("started", flush=True)
        marked = None
        for line in sys.stdin:
            if line.strip() == "mark":
                with load.lock:
                    marked = load.counts["short_ok"]
                print("marked", flush=True)
    counts = dict(load.counts)
    counts["ok_after_mark"] = counts.get("short_ok", 0) - (marked or 0) if marked is not None else 0
    counts["failures"] = load.failures  # type: ignore[assignment]
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
