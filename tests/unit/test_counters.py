"""The master's running totals (preforkd.counters) in-process: a dead worker's counts are
kept, exits are classified, and everything round-trips through the hand-over."""

from __future__ import annotations

from preforkd.counters import Counters, exit_reason
from preforkd.reexec import Handover
from preforkd.scoreboard import ERRORS_RESET, SERVED, Scoreboard


def test_a_reaped_workers_counts_are_kept_and_cross_the_handover() -> None:
    board = Scoreboard()
    counters = Counters()
    dead, alive = board.claim(), board.claim()
    board.cells(dead)[SERVED] = 7
    board.cells(dead)[ERRORS_RESET] = 2
    board.cells(alive)[SERVED] = 3
    counters.worker_gone("echo", dead, board)
    board.release(dead)
    again = board.claim()  # the slot is reused, zeroed
    assert again == dead and board.served(again) == 0
    assert counters.total("echo", "connections", [alive, again], board) == 10
    assert counters.total("echo", "errors_reset", [alive], board) == 2
    counters.worker_exited("echo", "killed")
    counters.reload_ended("failed")
    after = Counters(Handover.decode(_with(counters)).counters)
    assert after.retired == counters.retired and after.exits == counters.exits and after.reloads == counters.reloads


def _with(counters: Counters) -> str:
    return Handover(generation=1, started_wall=1.0, hup_monotonic=1.0, reload_seq=1, pending_reload=False,
                    listeners=(), workers=(), scoreboard_fd=3, alive_r=4, alive_w=5, pidfile_fd=None,
                    pidfile_path="", control_fd=None, control_path="", control_file_id=None,
                    counters=counters.handover()).encode()


def test_exit_reasons() -> None:
    assert exit_reason({"signal": "SIGKILL"}, True, 3) == "stopped"
    assert exit_reason({"signal": "SIGKILL"}, False, 3) == "killed"
    assert exit_reason({"exit_code": 0}, False, 3) == "max_requests"
    assert exit_reason({"exit_code": 3}, False, 3) == "init_failed"
    assert exit_reason({"exit_code": 1}, False, 3) == "crashed"
