"""The ready-made view (issue 11): etc/prometheus/preforkd-alerts.yml and
etc/grafana/preforkd-dashboard.json.

Checked with the real tools where they are (Debian's ``promtool``, installed by
tests/install-tools.sh): the rules load (``promtool check rules``), fire on the series
they are about and stay quiet otherwise (``promtool test rules`` with
preforkd-alerts.test.yml), and every dashboard query is valid PromQL (checked as a
recording rule). Without promtool those parts skip; what always runs: both files parse,
and every metric name they use is one a real scrape of a running preforkd serves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator, List, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from test_metrics import get

RULES = ROOT / "etc" / "prometheus" / "preforkd-alerts.yml"
RULE_TESTS = ROOT / "etc" / "prometheus" / "preforkd-alerts.test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "preforkd-dashboard.json"
NAME = re.compile(r"\b((?:preforkd|process)_[a-z0-9_]+)\b")
#: Grafana's variables, as a query would see them once expanded.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$job": ".*", "$instance": ".*", "$service": ".*"}


def promtool() -> Optional[str]:
    return shutil.which("promtool") or next(
        (str(p) for p in (ROOT / ".venv" / "bin" / "promtool", Path("/usr/local/bin/promtool")) if p.exists()), None)


def walk(node: Any, key: str) -> Iterator[str]:
    """Every string value under *key*, anywhere in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def dashboard_queries() -> List[str]:
    dash = json.loads(DASHBOARD.read_text())
    return list(walk(dash["panels"], "expr")) + list(walk(dash["annotations"], "expr")) + [
        v["definition"] for v in dash["templating"]["list"] if v.get("type") == "query"]


def test_dashboard_is_a_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "preforkd" and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance", "service"} <= names
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
        assert p["description"], p["title"]


def test_dashboard_and_rules_use_only_metrics_a_real_scrape_serves(supervisor):
    sv = supervisor('''
        [metrics]
        listen = "tcp://127.0.0.1:0"

        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0"]
        workers = 1
        max_workers = 3
        ''')
    status, _, body = get(sv)
    assert status == 200
    served = {s.name for f in text_string_to_metric_families(body) for s in f.samples}
    used_by_dashboard = {n for q in dashboard_queries() for n in NAME.findall(q)}
    used_by_rules = set(NAME.findall(RULES.read_text())) | set(NAME.findall(RULE_TESTS.read_text()))
    assert not used_by_dashboard - served, f"the dashboard uses metrics nobody serves: {used_by_dashboard - served}"
    assert not used_by_rules - served, f"the alert rules use metrics nobody serves: {used_by_rules - served}"
    contract = {"preforkd_workers", "preforkd_max_workers", "preforkd_connections_total", "preforkd_worker_exits_total",
                "preforkd_reloads_total", "preforkd_generation", "preforkd_listen_queue"}
    assert contract <= used_by_dashboard, contract - used_by_dashboard
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    wanted = {"PreforkdPoolSaturated", "PreforkdCrashLoop", "PreforkdReloadFailed", "PreforkdListenQueueGrowing"}
    assert wanted <= alerts, wanted - alerts


def _promtool_or_skip() -> str:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool not installed (tests/install-tools.sh installs it from Debian's prometheus package)")
    return tool


def test_alert_rules_load_and_fire_as_specified_by_promtool():
    tool = _promtool_or_skip()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([tool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True,
                          text=True, timeout=60)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    tool = _promtool_or_skip()
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):  # Grafana's, not PromQL: check the selector inside
            inner = query[len("label_values("):].rsplit(",", 1)[0]
            query = inner if "{" in inner or "_" in inner else query
        for var, value in GRAFANA_VARS.items():
            query = query.replace(var, value)
        lines += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(query)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    check = subprocess.run([tool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ))
    assert check.returncode == 0, check.stdout + check.stderr
