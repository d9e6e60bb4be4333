"""The package as PyPI and a `pip install` see it (issue 12): `python -m build` makes an
sdist and a wheel that `twine check` accepts, with an SPDX license, a LICENSE file,
classifiers and a description of its own; the wheel installs into a clean virtualenv,
carries the sample configuration and the units, and serves.

`make install` (scripts/install.sh) puts a virtualenv, /usr/local/bin/preforkd, the
configuration and the units in place; here under DESTDIR, and for real inside a
container in test_systemd_real.py.
"""

from __future__ import annotations

import email
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List

import pytest

from conftest import ROOT, Supervisor, exchange

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def run(argv: List[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    assert res.returncode == 0, f"{argv}:\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build``: the sdist and the wheel, from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    res = run([sys.executable, "-m", "build", "-o", str(out), str(ROOT)])
    assert "DeprecationWarning" not in res.stdout + res.stderr and "is deprecated" not in res.stdout + res.stderr
    return out


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("preforkd-*.whl")
    return wheel


def test_twine_accepts_both(dist):
    files = sorted(str(p) for p in dist.iterdir())
    assert [Path(f).name for f in files] == [f"preforkd-{VERSION}-py3-none-any.whl", f"preforkd-{VERSION}.tar.gz"]
    res = run([sys.executable, "-m", "twine", "check", "--strict", *files])
    assert res.stdout.count("PASSED") == 2, res.stdout


def test_metadata_and_description_stand_on_their_own(dist):
    with zipfile.ZipFile(wheel_of(dist)) as whl:
        names = whl.namelist()
        meta = email.message_from_bytes(whl.read(f"preforkd-{VERSION}.dist-info/METADATA"))
        shipped = {n: whl.read(n).decode() for n in names if "/_etc/" in n or "/_systemd/" in n}
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == "LICENSE"
    assert f"preforkd-{VERSION}.dist-info/licenses/LICENSE" in names
    assert meta["Author"] or meta["Author-email"]
    classifiers = meta.get_all("Classifier")
    assert "Operating System :: POSIX :: Linux" in classifiers and "Typing :: Typed" in classifiers
    description = meta.get_payload()
    assert meta["Description-Content-Type"] == "text/markdown"
    assert description.lstrip().startswith("# preforkd") and "make run" not in description
    links = re.findall(r"\]\(([^)]+)\)", description)
    assert all(link.startswith(("https://", "#")) for link in links), links  # nothing repository-relative
    # The sample configuration, the units, the alert rules and the dashboard travel with
    # the code, byte for byte.
    etc = ["preforkd.toml", "prometheus/preforkd-alerts.yml", "prometheus/preforkd-alerts.test.yml",
           "grafana/preforkd-dashboard.json"]
    assert shipped == {**{f"preforkd/_etc/{name}": (ROOT / "etc" / name).read_text() for name in etc},
                       "preforkd/_systemd/preforkd.service": (ROOT / "systemd/preforkd.service").read_text(),
                       "preforkd/_systemd/preforkd.socket": (ROOT / "systemd/preforkd.socket").read_text()}


@pytest.fixture
def installed(tmp_path: Path, dist: Path) -> Path:
    """A clean virtualenv (no system site-packages) with the wheel and its
    dependencies from the package index, nothing else."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel_of(dist))])
    return venv


def test_the_wheel_installs_and_serves_from_a_clean_venv(installed, tmp_path):
    away = tmp_path / "elsewhere"  # nowhere near the checkout
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    preforkd = str(installed / "bin/preforkd")
    where = run([str(installed / "bin/python"), "-c", "import preforkd; print(preforkd.__file__)"], cwd=away, env=env)
    assert where.stdout.startswith(str(installed))
    assert run([preforkd, "--version"], cwd=away, env=env).stdout.strip() == f"preforkd {VERSION}"
    sample = run([preforkd, "sample-config"], cwd=away, env=env).stdout
    assert sample == (ROOT / "etc/preforkd.toml").read_text()
    unit = run([preforkd, "sample-config", "preforkd.service"], cwd=away, env=env).stdout
    assert unit == (ROOT / "systemd/preforkd.service").read_text()
    # The sample, with its listeners on port 0 and its runtime files here, serves.
    body = sample.replace(":7000", ":0").replace(":7013", ":0").replace("/run/preforkd/", "run/")
    body = body.replace('"tcp://[::1]:0", ', "").replace('format = "auto"', 'format = "json"')
    cfg = away / "preforkd.toml"
    cfg.write_text(body)
    assert run([preforkd, "check", "-c", str(cfg)], cwd=away, env=env).stdout.strip().endswith(
        "OK (2 services, 3 listeners, 5 workers)")
    sv = Supervisor(cfg, program=[preforkd])
    try:
        sv.wait_ready()
        assert exchange(sv.tcp("echo"), b"from the wheel\r\n") == b"from the wheel\r\n"
        sv.signal(signal.SIGTERM)
        assert sv.wait_exit() == 0
    finally:
        sv.kill_all()


# -- make install ---------------------------------------------------------------------


def make_install(root: Path, wheels: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(["make", "-C", str(ROOT), "install", f"DESTDIR={root}", f"WHEELS={wheels}", *extra],
               env=dict(os.environ, MAKEFLAGS=""))


def test_make_install_puts_everything_in_place_under_destdir(tmp_path, wheelhouse):
    root = tmp_path / "root"
    res = make_install(root, wheelhouse)
    assert "systemctl daemon-reload && systemctl enable --now preforkd" in res.stdout
    venv = root / "opt/preforkd/venv"
    link = root / "usr/local/bin/preforkd"
    assert os.readlink(link) == "/opt/preforkd/venv/bin/preforkd"
    # The scripts name their final place, not the staging root.
    assert (venv / "bin/preforkd").read_text().splitlines()[0] == "#!/opt/preforkd/venv/bin/python"
    assert (root / "etc/preforkd/preforkd.toml").read_text() == (ROOT / "etc/preforkd.toml").read_text()
    for unit in ("preforkd.service", "preforkd.socket"):
        assert (root / "etc/systemd/system" / unit).read_text() == (ROOT / "systemd" / unit).read_text()
    assert oct((root / "etc/preforkd/preforkd.toml").stat().st_mode & 0o777) == "0o644"
    out = run([str(venv / "bin/python"), "-m", "preforkd", "check", "-c", str(root / "etc/preforkd/preforkd.toml")])
    assert "OK (2 services" in out.stdout

    # Again, with another PREFIX: the operator's configuration is kept, the units follow.
    conf = root / "etc/preforkd/preforkd.toml"
    conf.write_text(conf.read_text() + "# mine\n")
    res = make_install(root, wheelhouse, "PREFIX=/usr")
    assert "exists: kept" in res.stdout and conf.read_text().endswith("# mine\n")
    unit = (root / "etc/systemd/system/preforkd.service").read_text()
    exec_lines = [ln for ln in unit.splitlines() if ln.startswith("Exec")]
    assert exec_lines == ["ExecStart=/usr/bin/preforkd run -c /etc/preforkd/preforkd.toml",
                          "ExecReload=/usr/bin/preforkd reload -c /etc/preforkd/preforkd.toml"]
    assert os.readlink(root / "usr/bin/preforkd") == "/opt/preforkd/venv/bin/preforkd"


def test_install_script_explains_itself():
    res = run(["sh", str(ROOT / "scripts/install.sh"), "--help"])
    assert "DESTDIR" in res.stdout and "--wheels DIR" in res.stdout and res.stdout.rstrip().endswith("how.")
    bad = subprocess.run(["sh", str(ROOT / "scripts/install.sh"), "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr

