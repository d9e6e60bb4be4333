"""The agent-check endpoint and draining, without a balancer: what HAProxy would read.

The agent answers one line per connection from the master's loop (``up ready N%``
with N the spare capacity, ``drain``, ``down #stopping``), is a listener like the
others (port 0, ``listener.bound`` with ``role``, ``status --json``, kept across a
reload), and ``preforkd drain`` / ``undrain`` and TERM with ``drain_delay`` move it.
"""

from __future__ import annotations

import signal
import socket

from conftest import Load, connect, recv_all, recv_until, run_cli, wait_for, write_config


def agent_addr(sv) -> tuple:
    ev = sv.wait_event("listener.bound", role="agent_check")
    host, _, port = ev["address"][len("tcp://"):].rpartition(":")
    return host, int(port)


def ask(addr) -> str:
    """What HAProxy's agent-check reads: one line, then the agent closes."""
    with socket.create_connection(addr, timeout=5) as s:
        return recv_all(s).decode()


def hold(addr, n: int) -> list:
    socks = []
    for i in range(n):
        s = connect(addr)
        s.sendall(b"hold %d\n" % i)
        assert recv_until(s) == b"hold %d\r\n" % i
        socks.append(s)
    return socks


AGENT = '''
[supervisor]
pidfile = "run/preforkd.pid"
control_socket = "run/preforkd.sock"
graceful_timeout = 10
agent_check = "tcp://127.0.0.1:0"
{extra}

[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
workers = 2

[[service]]
name = "many"
listen = ["tcp://127.0.0.1:0"]
workers = 1
worker_connections = 4
'''


def test_agent_weight_follows_spare_capacity_and_the_agent_crosses_a_reload(supervisor):
    """Capacity here: 2 one-connection workers + 1 worker of 4 connections = 6. Each
    held connection takes a sixth; at none left the agent says 1%, never 0% (a weight
    of 0 would be a drain). The listener is bound on port 0, logged, shown by status,
    and a reload keeps its port."""
    sv = supervisor(AGENT.format(extra=""))
    agent = agent_addr(sv)
    assert ask(agent) == "up ready 100%\n"
    held = hold(sv.tcp("echo"), 1) + hold(sv.tcp("many"), 2)
    wait_for(lambda: ask(agent) == "up ready 50%\n", message="50% with 3 of 6 held")
    held += hold(sv.tcp("echo"), 1) + hold(sv.tcp("many"), 2)
    wait_for(lambda: ask(agent) == "up ready 1%\n", message="1% with all held")
    for s in held:
        s.close()
    wait_for(lambda: ask(agent) == "up ready 100%\n", message="back to 100%")
    st = sv.status()
    assert st["agent_check"] == {"address": f"tcp://{agent[0]}:{agent[1]}", "reply": "up ready 100%"}
    res = run_cli("reload", "-c", str(sv.config))
    assert res.returncode == 0, res.stderr
    ev = sv.wait_event("listener.bound", role="agent_check", generation=2)
    assert ev["address"] == f"tcp://{agent[0]}:{agent[1]}" and ev["origin"] == "inherited"
    assert ask(agent) == "up ready 100%\n"
    res = run_cli("status", "-c", str(sv.config))
    assert f"agent-check tcp://{agent[0]}:{agent[1]}: up ready 100%" in res.stdout


def test_drain_undrain_survive_a_reload_and_never_refuse(supervisor):
    sv = supervisor(AGENT.format(extra=""))
    agent, echo = agent_addr(sv), sv.tcp("echo")
    with Load(echo, short=2, long=1) as load:
        res = run_cli("drain", "-c", str(sv.config))
        assert res.returncode == 0 and "draining" in res.stdout, res.stderr
        assert ask(agent) == "drain\n"
        assert sv.status()["draining"] is True
        sv.wait_event("supervisor.draining", reason="control")
        # a drained host goes on serving; the drain crosses a reload
        assert run_cli("reload", "-c", str(sv.config)).returncode == 0
        assert ask(agent) == "drain\n" and sv.status()["generation"] == 2
        res = run_cli("undrain", "-c", str(sv.config))
        assert res.returncode == 0 and "in rotation" in res.stdout
        assert ask(agent).startswith("up ready ")
        sv.wait_event("supervisor.undrained")
        wait_for(lambda: load.counts["short_ok"] > 20, message="load served")
    assert load.bad() == {}, load.failures


def test_term_with_drain_delay_keeps_accepting_then_stops_gracefully(supervisor):
    """TERM: the agent says drain, the listeners go on accepting and serving (status
    says "draining") until drain_delay has passed; then the graceful stop as ever: the
    agent says "down" while a held connection is finished, and the master exits 0."""
    sv = supervisor(AGENT.format(extra="drain_delay = 2"))
    agent, echo = agent_addr(sv), sv.tcp("echo")
    held = hold(echo, 1)[0]
    sv.signal(signal.SIGTERM)
    sv.wait_event("supervisor.draining", reason="SIGTERM")
    assert ask(agent) == "drain\n"
    served_while_draining = 0
    while sv.status()["state"] == "draining":  # a new connection each time, every one served
        try:
            with connect(echo) as s:
                s.sendall(b"still here\n")
                assert recv_until(s) == b"still here\r\n"
        except ConnectionRefusedError:
            # drain_delay ran out between the status query and the connect: the stop has begun
            sv.wait_event("supervisor.stopping", signal="SIGTERM", timeout=5)  # refused only once stopping
            break
        served_while_draining += 1
    assert served_while_draining > 0
    sv.wait_event("supervisor.stopping", signal="SIGTERM")
    assert ask(agent) == "down #stopping\n"  # the held connection keeps the stop going
    held.sendall(b"last\n")
    assert recv_until(held) == b"last\r\n"
    held.close()
    assert sv.wait_exit(30) == 0
    stopping = sv.log.find("supervisor.stopping")[0]
    draining = sv.log.find("supervisor.draining")[0]
    assert draining["drain_delay"] == 2 and draining["timestamp"] < stopping["timestamp"]


def test_agent_config_errors(tmp_path):
    for extra, message in [
        ('agent_check = "unix:run/agent.sock"', "supervisor.agent_check: must be a tcp:// address"),
        ('agent_check = "tcp://127.0.0.1"', "supervisor.agent_check:"),
        ('agent_check = "tcp://127.0.0.1:7400"', "supervisor.agent_check: tcp://127.0.0.1:7400 is already used by"),
        ("drain_delay = -1", "supervisor.drain_delay: must be a number of seconds 0 or >= 0.01"),
    ]:
        cfg = write_config(tmp_path, f'''
            [supervisor]
            pidfile = "run/p.pid"
            {extra}
            [[service]]
            name = "echo"
            listen = ["tcp://127.0.0.1:7400"]
        ''')
        res = run_cli("check", "-c", str(cfg))
        assert res.returncode == 1 and message in res.stderr, res.stderr
