"""Every benchmark runs (tiny iteration counts) so that none can rot. Only the
output's structure is checked, never a time: the machine is shared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def test_quick_run_writes_every_result(tmp_path):
    env = dict(os.environ, XVF_BENCH_BUILD=str(tmp_path / "build"))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "run.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=str(tmp_path),  # works from anywhere, not only the checkout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert (tmp_path / "results.md").read_text().count("| ratio | value |") >= 3
    for key in ("date", "machine", "nproc", "cpu_model"):
        assert results["machine"][key]
    bench = results["benchmarks"]
    assert set(bench) == {"mmio_roundtrip", "notify", "e2e_blk", "scale", "guests"}
    for name, res in bench.items():
        assert "error" not in res, (name, res.get("error"))
        if "skipped" in res:  # only e2e without qemu-storage-daemon
            assert name == "e2e_blk" and shutil.which("qemu-storage-daemon") is None
            continue
        assert res["rows"], name
        for row in res["rows"]:
            assert set(res["columns"]) <= set(row), (name, row)
            assert row["n"] > 0 if "n" in row else True
    mmio = bench["mmio_roundtrip"]
    impls = {"c", "c-epoll", "cython", "cython-epoll", "cython-poll", "python", "floor"}
    assert {r["impl"] for r in mmio["rows"]} == impls
    for op in ("read", "notify"):
        assert {"cython/c latency median", "python/cython latency median"} <= set(
            mmio["ratios"][op]
        )
        # A responder that never sleeps ("floor" spins) has its schedstat runtime
        # brought up to date only at scheduler ticks: a quick run can fit between two.
        assert all(
            r["cpu_us_per_access"] > 0 or (r["impl"] == "floor" and r["cpu_us_per_access"] == 0)
            for r in mmio["rows"]
        ), [(r["impl"], r["op"], r["cpu_us_per_access"]) for r in mmio["rows"]]
    assert {r["via"] for r in bench["notify"]["rows"]} == {"xvf", "direct eventfd"}
    guests = bench["guests"]
    assert {(r["threads"], r["guests"]) for r in guests["rows"]} == {
        (mode, n) for mode in ("per-guest", "one") for n in (1, 2)
    }
    assert all(r["exits_kps"] > 0 and r["cpu_us_per_access"] > 0 for r in guests["rows"])
    assert "per-guest: 2 guests / 1 guest exits per s" in guests["ratios"]
    if "skipped" not in bench["e2e_blk"]:
        paths = {(r["path"], r["qd"]) for r in bench["e2e_blk"]["rows"]}
        modes = (
            "direct", "c-dm", "c-dm-grant", "foreign", "foreign+poll", "foreign+offload",
            "grant", "grant+offload",
        )  # fmt: skip
        assert paths == {(p, qd) for p in modes for qd in (1, 32)}
        assert "foreign/direct QD32 IOPS" in bench["e2e_blk"]["ratios"]
        assert "foreign+offload/direct QD32 IOPS" in bench["e2e_blk"]["ratios"]
        assert "grant/foreign QD32 IOPS" in bench["e2e_blk"]["ratios"]
        assert "grant+offload/foreign+offload QD32 IOPS" in bench["e2e_blk"]["ratios"]
        assert "foreign/c-dm QD32 IOPS" in bench["e2e_blk"]["ratios"]
        assert "grant/c-dm-grant QD32 IOPS" in bench["e2e_blk"]["ratios"]
        for row in bench["e2e_blk"]["rows"]:
            # every party's CPU is measured; only direct has no device model (no exits)
            assert row["cpu_guest_us"] > 0 and row["cpu_backend_us"] > 0, row
            if row["path"] == "direct":
                assert row["cpu_dm_us"] == 0 and row["exits_per_io"] == 0, row
            else:
                assert row["cpu_dm_us"] > 0 and row["exits_per_io"] > 0, row
    assert [r["devices"] for r in bench["scale"]["rows"]] == [1, 2]
    # the PNG exists exactly when matplotlib does
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "results.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib" in results["plot"]
