"""xvf's Cython extensions cross-compile for an aarch64 Dom0 (tests/cross/build_aarch64.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "cross" / "build_aarch64.sh"
PYCONF = Path("/usr/include/aarch64-linux-gnu/python3.11/pyconfig.h")


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None or not PYCONF.exists(),
    reason="cross toolchain not installed: dpkg --add-architecture arm64 && apt-get update && "
    "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross libpython3.11-dev:arm64",
)
@pytest.mark.skipif(shutil.which("cython") is None, reason="no cython on PATH")
@pytest.mark.skipif(shutil.which("file") is None, reason="no file(1): apt-get install file")
def test_extensions_build_for_aarch64(tmp_path: Path) -> None:
    res = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    # the hot path's extensions and the simulator's stand-ins, as setup.py finds them
    pyx = sorted(REPO.glob("xvf/hotpath/*.pyx")) + sorted(REPO.glob("xvf/platform/sim/*.pyx"))
    exts = [p.relative_to(REPO).with_suffix("") for p in pyx]
    assert Path("xvf/platform/sim/_hotpath") in exts, exts
    for ext in exts:
        so = tmp_path / ext.parent / f"{ext.name}.cpython-311-aarch64-linux-gnu.so"
        assert so.exists(), ext
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(str(so)))
        assert "ELF 64-bit LSB shared object, ARM aarch64" in line, line
    assert "warning" not in res.stderr.lower(), res.stderr
