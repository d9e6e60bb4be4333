"""Prometheus metrics (issue 11): ``[metrics] listen`` served by the master itself.

Scrapes go through a real HTTP client (http.client) and are parsed with
prometheus-client's own parsers. What is shown: every metric DESIGN.md names is there
with its HELP; counters move as connections are served, workers are killed or recycle
themselves and reloads succeed or fail, and never go backwards across any of it (the
re-exec included); the listen queue rises while every worker is held busy; twenty
half-open scrapers delay neither ``status`` nor a worker's respawn, nor a real scrape.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
from typing import Dict, List, Tuple

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from conftest import connect, exchange, recv_until, run_cli, wait_for, write_config

CONFIG = '''
[metrics]
listen = "tcp://127.0.0.1:0"

[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
workers = {workers}

[[service]]
name = "recycle"
listen = ["tcp://127.0.0.1:0"]
workers = 1
max_requests = 1
'''

#: DESIGN.md, "Observability": names fixed by the contract (counters without _total).
DESIGN_METRICS = {"preforkd_workers", "preforkd_max_workers", "preforkd_connections", "preforkd_worker_exits",
                  "preforkd_reloads", "preforkd_generation", "preforkd_listen_queue"}

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def metrics_addr(sv) -> Tuple[str, int]:
    ev = sv.wait_event("listener.bound", role="metrics")
    host, _, port = ev["address"][len("tcp://"):].rpartition(":")
    return host, int(port)


def get(sv, path: str = "/metrics", method: str = "GET", headers: Dict[str, str] | None = None
        ) -> Tuple[int, Dict[str, str], str]:
    host, port = metrics_addr(sv)
    conn = http.client.HTTPConnection(host, port, timeout=20)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


def scrape(sv) -> Tuple[Samples, Dict[str, str]]:
    """``{(sample name, sorted labels): value}`` and ``{family: HELP text}``."""
    status, headers, body = get(sv)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4"), (status, headers)
    samples: Samples = {}
    helps = {}
    for family in text_string_to_metric_families(body):
        helps[family.name] = family.documentation
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, helps


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def metric(sv, name: str, **labels: str) -> float:
    return value(scrape(sv)[0], name, **labels)


def served(addr: Tuple[str, int], n: int) -> None:
    for i in range(n):
        assert exchange(addr, b"hello %d\n" % i) == b"hello %d\r\n" % i


def test_scrape_has_the_contracts_metrics_and_counters_never_go_backwards(supervisor):
    sv = supervisor(CONFIG.format(workers=2))
    samples, helps = scrape(sv)
    missing = DESIGN_METRICS - set(helps)
    assert not missing, missing
    assert all(helps[name] for name in helps), "every family has a HELP line"
    assert value(samples, "preforkd_generation") == 1
    assert value(samples, "preforkd_workers", service="echo", state="idle") == 2
    assert value(samples, "preforkd_workers", service="echo", state="busy") == 0
    assert value(samples, "preforkd_max_workers", service="echo") == 2
    assert value(samples, "preforkd_connections_total", service="echo") == 0
    assert value(samples, "preforkd_reloads_total", result="ok") == 0
    echo = sv.tcp("echo")
    listener = f"tcp://{echo[0]}:{echo[1]}"
    assert value(samples, "preforkd_listen_queue", listener=listener, service="echo") == 0

    # connections served
    served(echo, 5)
    wait_for(lambda: metric(sv, "preforkd_connections_total", service="echo") == 5, message="5 connections")

    # a worker killed: its count is kept, its exit counted
    victim = sv.worker_pids("echo")[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: metric(sv, "preforkd_worker_exits_total", service="echo", reason="killed") == 1,
             message="the kill counted")
    wait_for(lambda: len(sv.worker_pids("echo")) == 2 and victim not in sv.worker_pids("echo"))
    assert metric(sv, "preforkd_connections_total", service="echo") == 5

    # a worker that recycles itself (max_requests = 1)
    recycle = sv.tcp("recycle")
    served(recycle, 2)
    wait_for(lambda: metric(sv, "preforkd_worker_exits_total", service="recycle", reason="max_requests") >= 1,
             message="a max_requests exit")
    wait_for(lambda: metric(sv, "preforkd_connections_total", service="recycle") == 2)

    # a reload that succeeds: the counters cross the re-exec, the old workers' exits count as stopped
    port = metrics_addr(sv)[1]
    assert run_cli("reload", "-c", str(sv.config)).returncode == 0
    samples, _ = scrape(sv)
    assert value(samples, "preforkd_generation") == 2
    assert value(samples, "preforkd_reloads_total", result="ok") == 1
    assert value(samples, "preforkd_connections_total", service="echo") == 5
    assert value(samples, "preforkd_connections_total", service="recycle") == 2
    assert value(samples, "preforkd_worker_exits_total", service="echo", reason="killed") == 1
    assert value(samples, "preforkd_config_last_reload_successful") == 1
    ev = sv.wait_event("listener.bound", role="metrics", generation=2)
    assert ev["origin"] == "inherited" and ev["address"].endswith(f":{port}")  # the port crossed the reload
    wait_for(lambda: metric(sv, "preforkd_worker_exits_total", service="echo", reason="stopped") == 2,
             message="the old generation's exits")

    # a reload that fails: counted, and the old configuration serves on
    write_config(sv.config.parent, CONFIG.format(workers='"two"'), sv.config.name)
    sv.signal(signal.SIGHUP)
    sv.wait_event("config.reload_failed")
    samples, _ = scrape(sv)
    assert value(samples, "preforkd_reloads_total", result="failed") == 1
    assert value(samples, "preforkd_reloads_total", result="ok") == 1
    assert value(samples, "preforkd_config_last_reload_successful") == 0
    served(echo, 3)
    wait_for(lambda: metric(sv, "preforkd_connections_total", service="echo") == 8, message="8 connections")

    st = sv.status()
    assert st["endpoints"] == [{"role": "metrics", "configured": "tcp://127.0.0.1:0",
                                "address": f"tcp://127.0.0.1:{port}", "origin": "inherited"}]


def test_http_details_and_openmetrics(supervisor):
    sv = supervisor(CONFIG.format(workers=1))
    status, headers, body = get(sv, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(body)}
    assert families["preforkd_connections"].type == "counter"
    assert get(sv, "/nothing")[0] == 404
    assert get(sv, "/")[0] == 200
    assert get(sv, method="POST")[0] == 405
    status, headers, body = get(sv, method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 0
    with socket.create_connection(metrics_addr(sv), timeout=20) as s:
        s.sendall(b"not http at all\r\n\r\n")
        assert recv_until(s).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(metrics_addr(sv), timeout=20) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 10000)
        assert recv_until(s).startswith(b"HTTP/1.1 431 ")


def test_listen_queue_rises_while_every_worker_is_held_busy(supervisor):
    sv = supervisor(CONFIG.format(workers=1))
    echo = sv.tcp("echo")
    listener = f"tcp://{echo[0]}:{echo[1]}"
    held = connect(echo, timeout=20)
    waiting: List[socket.socket] = []
    try:
        held.sendall(b"hold\n")
        assert recv_until(held) == b"hold\r\n"  # the only worker is busy with this one
        waiting = [connect(echo, timeout=20) for _ in range(3)]
        for s in waiting:
            s.sendall(b"queued\n")
        wait_for(lambda: metric(sv, "preforkd_listen_queue", listener=listener, service="echo") == 3,
                 message="3 connections in the accept queue")
        assert metric(sv, "preforkd_workers", service="echo", state="busy") == 1
        assert metric(sv, "preforkd_listen_queue_limit", listener=listener, service="echo") > 0
        st = next(s for s in sv.status()["services"] if s["name"] == "echo")
        assert st["listen_queue"] == 3 and st["listeners"][0]["queue"] == 3
        held.close()
        for s in waiting:  # the worker takes them one after the other
            assert recv_until(s) == b"queued\r\n"
            s.close()
        wait_for(lambda: metric(sv, "preforkd_listen_queue", listener=listener, service="echo") == 0)
    finally:
        held.close()
        for s in waiting:
            s.close()


def test_twenty_half_open_scrapers_delay_neither_status_nor_a_respawn(supervisor):
    sv = supervisor(CONFIG.format(workers=2))
    addr = metrics_addr(sv)
    half_open = []
    try:
        for _ in range(20):  # connected, a request head begun and never finished
            s = socket.create_connection(addr, timeout=20)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            half_open.append(s)
        st = sv.status()  # the control socket answers
        assert st["state"] == "running"
        victim = sv.worker_pids("echo")[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(sv.worker_pids("echo")) == 2 and victim not in sv.worker_pids("echo"),
                 message="the killed worker respawned")
        served(sv.tcp("echo"), 2)
        # a real scrape still gets through: it displaces the longest half-open client
        assert metric(sv, "preforkd_worker_exits_total", service="echo", reason="killed") == 1
    finally:
        for s in half_open:
            s.close()


def test_metrics_config_errors(tmp_path):
    for body, why in [
        ('[metrics]\nlisten = "unix:run/m.sock"\n', "metrics.listen: must be a tcp:// address"),
        ('[metrics]\nlisten = "tcp://127.0.0.1:7000"\n', "is already used by metrics.listen"),
        ('[metrics]\nport = 9\n', "metrics.port: unknown key"),
        ('[metrics]\nlisten = "http://x"\n', "metrics.listen:"),
    ]:
        cfg = write_config(tmp_path, body + '[[service]]\nname = "e"\nlisten = ["tcp://127.0.0.1:7000"]\n')
        res = run_cli("check", "-c", str(cfg))
        assert res.returncode == 1 and why in res.stderr, (body, res.stderr)


def test_connection_errors_are_counted_in_both_worker_kinds(supervisor):
    sv = supervisor('''
        [metrics]
        listen = "tcp://127.0.0.1:0"

        [[service]]
        name = "one"
        listen = ["tcp://127.0.0.1:0"]
        workers = 1
        max_line_length = 16

        [[service]]
        name = "many"
        listen = ["tcp://127.0.0.1:0"]
        workers = 1
        worker_connections = 8
        max_line_length = 16
        ''')
    for name in ("one", "many"):
        reply = exchange(sv.tcp(name), b"x" * 100 + b"\n")
        assert reply.startswith(b"ERROR line too long"), reply
        assert exchange(sv.tcp(name), b"fine\n") == b"fine\r\n"
        wait_for(lambda name=name: metric(sv, "preforkd_connection_errors_total", service=name, reason="protocol")
                 == 1 and metric(sv, "preforkd_connections_total", service=name) == 2,
                 message=f"{name}: one protocol error in two connections")
        assert metric(sv, "preforkd_connection_errors_total", service=name, reason="handler") == 0
