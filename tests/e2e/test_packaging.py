"""`pip install .` gives users what they were promised: the compiled hot path,
two console commands, a generated man page under share/man/man1 and the systemd unit."""

from __future__ import annotations

import glob
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_contents(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    (wheel,) = glob.glob(str(tmp_path / "xvf-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        hotpath = sorted(p.stem for p in (Path(REPO) / "xvf" / "hotpath").glob("*.pyx"))
        assert len(hotpath) >= 3, hotpath
        for mod in hotpath:
            so = f"xvf/hotpath/{mod}."
            assert any(n.startswith(so) and n.endswith(".so") for n in names), mod
            assert f"xvf/hotpath/{mod}.pyi" in names, mod  # its types, for mypy and IDEs
        assert "xvf/py.typed" in names
        for package in ("app", "daemon", "device", "protocols", "hotpath", "platform/xen"):
            assert f"xvf/{package}/__init__.py" in names, package
        assert "xvf/platform/sim/drivers/blk.py" in names
        (man,) = [n for n in names if n.endswith("share/man/man1/xen-vhost-frontend.1")]
        page = z.read(man).decode()
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        scripts = z.read(entry_points).decode()
        unit = z.read("xvf/data/xen-vhost-frontend.service").decode()
    assert "xen-vhost-frontend = xvf.app.cli:main" in scripts
    assert "xvf = xvf.app.cli:main" in scripts
    assert ".TH" in page
    for option in ("socket\\-path", "foreign\\-mapping", "log\\-level"):
        assert option in page, option
    # the unit as README installs it
    for line in (
        "Type=notify",
        "ExecStart=xen-vhost-frontend --config /etc/xvf/xvf.toml",
        "Restart=on-failure",
        "Documentation=man:xen-vhost-frontend(1)",
        "Requires=proc-xen.mount xenstored.service",
    ):
        assert line in unit.splitlines(), line


def test_the_rig_wheel_takes_the_unit_file_too():
    """tests/xen/rig/xvf_build.py assembles the Dom0 wheel from pyproject's package data."""
    import tomllib

    from tests.xen.rig.xvf_build import _package_files, _sources

    repo = Path(REPO)
    project = tomllib.loads((repo / "pyproject.toml").read_text())
    files = _package_files(repo, project)
    assert "xvf/data/xen-vhost-frontend.service" in files
    assert {"xvf/py.typed", "xvf/hotpath/_ioreq.pyi"} <= set(files)
    # packages.find: every module of every layer's folder goes into Dom0's wheel
    modules = {str(p.relative_to(repo)) for p in (repo / "xvf").rglob("*.py")}
    assert modules <= set(files), sorted(modules - set(files))
    assert repo / "xvf/data/xen-vhost-frontend.service" in _sources(repo)  # rebuilt on change
