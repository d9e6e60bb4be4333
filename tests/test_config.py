"""Every configuration mistake is one line naming the file and key path, exit 1."""

import textwrap

import pytest

from conftest import run_cli

GOOD_SERVICE = '''
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
'''


def check(tmp_path, body, command="check"):
    cfg = tmp_path / "preforkd.toml"
    cfg.write_text(textwrap.dedent(body))
    return run_cli(command, "-c", str(cfg), cwd=tmp_path, timeout=30), cfg


def assert_one_line_error(res, cfg, *fragments):
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert str(cfg) in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("body, fragments", [
    ('[[service]\nname = "x"\n', ["invalid TOML", "line 1, column"]),
    (GOOD_SERVICE + 'workers = [1,\n', ["invalid TOML", "line 6, column"]),
    ('bogus = 1\n' + GOOD_SERVICE, ["bogus: unknown key"]),
    ('[supervisor]\npidfle = "x"\n' + GOOD_SERVICE, ["supervisor.pidfle: unknown key"]),
    (GOOD_SERVICE + 'wrokers = 2\n', ["service[0].wrokers: unknown key"]),
    (GOOD_SERVICE + GOOD_SERVICE.replace('"echo"', '"two"').replace("listen", "workers = \"four\"\nlisten"),
     ['service[1].workers: must be an integer >= 1, got "four"']),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "udp://127.0.0.1:5"), ["service[0].listen[0]", "tcp:// or unix:"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "tcp://127.0.0.1:99999"), ["service[0].listen[0]", "port"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "tcp://::1:7000"), ["service[0].listen[0]", "brackets"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "tcp://[zz]:7000"), ["service[0].listen[0]", "IPv6"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "unix:"), ["service[0].listen[0]", "path"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "tcp://127.0.0.1"), ["service[0].listen[0]", "HOST:PORT"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "tcp://127.0.0.1:http"), ["service[0].listen[0]", "port"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "tcp://127.0.0.1:\u00b2"), ["service[0].listen[0]", "port"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "tcp://999.1.1.1:7000"), ["service[0].listen[0]", "not an IPv4"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "tcp://exa mple:7000"), ["service[0].listen[0]", "host name"]),
    (GOOD_SERVICE.replace('["tcp://127.0.0.1:0"]', '[7000]'), ["service[0].listen[0]", "must be a string"]),
    (GOOD_SERVICE.replace('["tcp://127.0.0.1:0"]', '[]'), ["service[0].listen", "non-empty"]),
    (GOOD_SERVICE.replace("tcp://127.0.0.1:0", "unix:/" + "x" * 120), ["service[0].listen[0]", "longer than 107"]),
    (GOOD_SERVICE + GOOD_SERVICE, ["service[1].name", "duplicate service name"]),
    (GOOD_SERVICE.replace(":0", ":7700") + GOOD_SERVICE.replace('"echo"', '"b"').replace(":0", ":7700"),
     ["service[1].listen[0]", "already used by service[0]"]),
    # the same port on the wildcard and on one address, or under a name: bind would fail
    (GOOD_SERVICE.replace(":0", ":7700")
     + GOOD_SERVICE.replace('"echo"', '"b"').replace("127.0.0.1:0", "0.0.0.0:7700"),
     ["service[1].listen[0]", "tcp://0.0.0.0:7700 overlaps tcp://127.0.0.1:7700 of service[0]"]),
    (GOOD_SERVICE.replace(":0", ":7700") + GOOD_SERVICE.replace('"echo"', '"b"').replace("127.0.0.1:0", "*:7700"),
     ["service[1].listen[0]", "overlaps"]),
    (GOOD_SERVICE.replace(":0", ":7700")
     + GOOD_SERVICE.replace('"echo"', '"b"').replace("127.0.0.1:0", "localhost:7700"),
     ["service[1].listen[0]", "tcp://localhost:7700 overlaps tcp://127.0.0.1:7700"]),
    ('[metrics]\nlisten = "tcp://0.0.0.0:7700"\n' + GOOD_SERVICE.replace(":0", ":7700"),
     ["service[0].listen[0]", "overlaps tcp://0.0.0.0:7700 of metrics.listen"]),
    (GOOD_SERVICE + 'handler = "no_such_module_xyz:handle"\n',
     ["service[0].handler", "cannot import no_such_module_xyz"]),
    (GOOD_SERVICE + 'handler = "preforkd.services:nope"\n', ["service[0].handler", "has no attribute nope"]),
    (GOOD_SERVICE + 'handler = "not a spec"\n', ["service[0].handler", "module:attribute"]),
    (GOOD_SERVICE + 'handler = "preforkd.services:echo"\ncommand = ["/bin/cat"]\n',
     ["service[0]", "either handler or command"]),
    (GOOD_SERVICE.replace('handler', 'x') + 'command = ["no-such-program-xyz"]\n',
     ["service[0].command[0]", "not found"]),
    ('[log]\nlevel = "loud"\n' + GOOD_SERVICE, ["log.level", "must be one of"]),
    ('[supervisor]\ngraceful_timeout = -1\n' + GOOD_SERVICE, ["supervisor.graceful_timeout"]),
    ('[supervisor]\numask = "999"\n' + GOOD_SERVICE, ["supervisor.umask", "octal"]),
    ('[supervisor]\nuser = "no-such-user-xyz"\n' + GOOD_SERVICE, ["supervisor.user", "no such user"]),
    ("", ["service", "at least one"]),
    ('[supervisor]\ncontrol_socket = "run/x.sock"\n' + GOOD_SERVICE.replace("tcp://127.0.0.1:0", "unix:run/x.sock"),
     ["service[0].listen[0]", "same file as supervisor.control_socket"]),
    ('[supervisor]\npidfile = "run/x"\ncontrol_socket = "run/x"\n' + GOOD_SERVICE,
     ["supervisor.control_socket", "is also supervisor.pidfile"]),
    (GOOD_SERVICE + 'workers = true\n', ["service[0].workers", "integer >= 1, got true"]),
    (GOOD_SERVICE + 'workers = 2.5\n', ["service[0].workers", "integer >= 1"]),
    (GOOD_SERVICE + 'idle_timeout = "5"\n', ["service[0].idle_timeout", "number of seconds"]),
    (GOOD_SERVICE + 'idle_timeout = nan\n', ["service[0].idle_timeout", "number of seconds >= 0.01, got nan"]),
    # capacity: timeouts too small to mean anything, pool bounds, worker kinds
    (GOOD_SERVICE + 'idle_timeout = 0.0000001\n', ["service[0].idle_timeout", "number of seconds >= 0.01"]),
    (GOOD_SERVICE + 'line_timeout = 0\n', ["service[0].line_timeout", "number of seconds >= 0.01"]),
    ('[supervisor]\ngraceful_timeout = 0.001\n' + GOOD_SERVICE, ["supervisor.graceful_timeout", ">= 0.01"]),
    (GOOD_SERVICE + 'workers = 8\nmax_workers = 4\n', ["service[0].max_workers", "at least workers (8), got 4"]),
    (GOOD_SERVICE + 'max_workers = 5000\n', ["service[0].max_workers", "at most 1024"]),
    (GOOD_SERVICE + 'max_workers = 8\nmin_spare_workers = 0\n', ["service[0].min_spare_workers", ">= 1"]),
    (GOOD_SERVICE + 'min_spare_workers = 4\nmax_spare_workers = 4\n',
     ["service[0].max_spare_workers", "greater than min_spare_workers (4)"]),
    (GOOD_SERVICE + 'worker_connections = 0\n', ["service[0].worker_connections", ">= 1"]),
    (GOOD_SERVICE.replace('handler', 'x') + 'command = ["/bin/cat"]\nworker_connections = 10\n',
     ["service[0].worker_connections", "command service", "must be 1"]),
    ('[supervisor]\nevent_loop = "trio"\n' + GOOD_SERVICE, ["supervisor.event_loop", "auto, asyncio, uvloop"]),
    (GOOD_SERVICE + 'idle_timeout = inf\n', ["service[0].idle_timeout", "at most"]),
    ('[supervisor]\ngraceful_timeout = 1e30\n' + GOOD_SERVICE, ["supervisor.graceful_timeout", "at most"]),
    (GOOD_SERVICE + 'backlog = 100000000000\n', ["service[0].backlog", "at most"]),
    (GOOD_SERVICE + 'socket_mode = 660\n', ["service[0].socket_mode", "octal"]),
    ('[service]\nname = "x"\nlisten = ["tcp://127.0.0.1:0"]\n', ["service", "array of tables"]),
    ('supervisor = 1\n' + GOOD_SERVICE, ["supervisor", "must be a table"]),
    (GOOD_SERVICE + 'name2 = "x"\n', ["service[0].name2: unknown key"]),
    ('[[service]]\nlisten = ["tcp://127.0.0.1:0"]\n', ["service[0].name", "required"]),
    (GOOD_SERVICE.replace('"echo"', '"a b"'), ["service[0].name", "letters"]),
])
def test_mistakes_are_one_line_with_key_path(tmp_path, body, fragments):
    res, cfg = check(tmp_path, body)
    assert_one_line_error(res, cfg, *fragments)


@pytest.mark.parametrize("first, second", [("0.0.0.0:7700", "tcp://[::]:7700"),
                                           ("127.0.0.1:7700", "tcp://127.0.0.2:7700"),
                                           ("0.0.0.0:7700", "tcp://0.0.0.0:7701")])
def test_the_same_port_on_other_addresses_or_families_is_not_a_clash(tmp_path, first, second):
    # IPv6 listeners are IPV6_V6ONLY, so [::]:P and 0.0.0.0:P bind side by side
    body = (GOOD_SERVICE.replace("127.0.0.1:0", first)
            + GOOD_SERVICE.replace('"echo"', '"b"').replace("tcp://127.0.0.1:0", second))
    res, _ = check(tmp_path, body)
    assert res.returncode == 0, res.stdout + res.stderr


def test_handler_raising_at_import_is_a_config_error(tmp_path):
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    res, cfg = check(tmp_path, '[supervisor]\npython_path = ["."]\n' + GOOD_SERVICE + 'handler = "broken_mod:h"\n')
    assert_one_line_error(res, cfg, "service[0].handler", "RuntimeError: boom at import")


def test_not_a_handler(tmp_path):
    (tmp_path / "mod_nh.py").write_text("VALUE = 3\n")
    res, cfg = check(tmp_path, '[supervisor]\npython_path = ["."]\n' + GOOD_SERVICE + 'handler = "mod_nh:VALUE"\n')
    assert_one_line_error(res, cfg, "service[0].handler", "is not a handler")


def test_run_with_bad_config_prints_one_line_and_exits_1(tmp_path):
    res, cfg = check(tmp_path, GOOD_SERVICE + "workers = 0\n", command="run")
    assert_one_line_error(res, cfg, "service[0].workers")
    assert res.stdout == ""


def test_start_with_bad_config_prints_one_line_and_starts_nothing(tmp_path):
    res, cfg = check(tmp_path, '[supervisor]\npidfile = "run/p.pid"\n' + GOOD_SERVICE + 'workers = "four"\n',
                     command="start")
    assert_one_line_error(res, cfg, 'service[0].workers: must be an integer >= 1, got "four"')
    assert not (tmp_path / "run").exists()


def test_unreadable_file(tmp_path):
    res = run_cli("check", "-c", str(tmp_path / "missing.toml"))
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "cannot read" in res.stderr


def test_good_config_checks_ok_and_c_before_command(tmp_path):
    cfg = tmp_path / "ok.toml"
    cfg.write_text(GOOD_SERVICE)
    res = run_cli("-c", str(cfg), "check")
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_shipped_configs_check(tmp_path):
    from conftest import ROOT

    for name in ("etc/preforkd.toml", "examples/interactive.toml", "examples/handlers.toml"):
        res = run_cli("check", "-c", str(ROOT / name))
        assert res.returncode == 0, (name, res.stderr)


def test_builtin_default_checks(tmp_path):
    import os

    if os.path.exists("/etc/preforkd/preforkd.toml"):
        pytest.skip("/etc/preforkd/preforkd.toml exists here, so it is the default")
    res = run_cli("check", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "built-in default" in res.stdout


def test_workers_has_an_upper_bound(tmp_path):
    res, cfg = check(tmp_path, GOOD_SERVICE + "workers = 100000\n")
    assert_one_line_error(res, cfg, "service[0].workers", "at most 1024")


@pytest.mark.parametrize("code, extra, fragments", [
    ("async def h(line):\n    return line\n", "",
     ["service[0].handler", "async def handler", "worker_connections > 1"]),
    ("import preforkd\nclass H(preforkd.LineHandler):\n    async def on_line(self, line):\n        return line\n", "",
     ["service[0].handler", "async def handler"]),
    ("def h():\n    return 'x'\n", "", ["service[0].handler", "cannot be called as one argument, the line"]),
    ("def h(a, b):\n    return a\n", "", ["service[0].handler", "signature is (a, b)"]),
    ("import preforkd\nclass H(preforkd.LineHandler):\n    def on_line(self):\n        return 'x'\n", "",
     ["service[0].handler", "on_line(self, line)"]),
    ("import preforkd\n@preforkd.connection_handler\ndef h(conn):\n    pass\n", "worker_connections = 8\n",
     ["service[0].worker_connections", "@connection_handler", "worker_connections = 1"]),
])
def test_check_refuses_handlers_that_cannot_run(tmp_path, code, extra, fragments):
    """Handlers that could not take one line, and async handlers where they cannot run,
    are refused by check (they used to pass and fail every connection)."""
    (tmp_path / "hmod.py").write_text(code)
    res, cfg = check(tmp_path, '[supervisor]\npython_path = ["."]\n' + GOOD_SERVICE + 'handler = "hmod:h"\n'.replace(
        "hmod:h", "hmod:H" if "class H" in code else "hmod:h") + extra)
    assert_one_line_error(res, cfg, *fragments)


def test_check_accepts_async_handlers_in_event_driven_workers(tmp_path):
    (tmp_path / "amod.py").write_text("async def h(line):\n    return line\n")
    res, _ = check(tmp_path, '[supervisor]\npython_path = ["."]\n' + GOOD_SERVICE
                   + 'handler = "amod:h"\nworker_connections = 100\nmax_workers = 8\n')
    assert res.returncode == 0, res.stderr
