"""Fixtures of the real-Xen suite. It runs only inside the rig's Dom0 (scripts/run-xen-tests.sh
boots it); anywhere else every test here is skipped with that reason."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ON_RIG = os.environ.get("XVF_RIG") == "1" and os.path.exists("/dev/xen/privcmd")


def pytest_collection_modifyitems(config, items) -> None:
    if ON_RIG:
        return
    skip = pytest.mark.skip(
        reason="real-Xen test: runs inside the rig's Dom0 (scripts/run-xen-tests.sh)"
    )
    for item in items:
        if "tests/xen/cases" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def results(request) -> Path:
    """This test's directory under /xvf/results (copied back to the host)."""
    from tests.xen.cases.dom0 import RESULTS

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    path = RESULTS / "cases" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def sockets() -> Path:
    """xvf's --socket-path for this test (short: unix socket paths stop at 108 bytes)."""
    os.makedirs("/run/xvf", exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="s", dir="/run/xvf"))


@pytest.fixture
def procs() -> Iterator[list]:
    """Processes a test started (xvf, backends): stopped at teardown, newest first."""
    started: list = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def guests() -> Iterator[list]:
    """Guests a test created: destroyed at teardown if still there."""
    made: list = []
    yield made
    for guest in made:
        guest.destroy()
