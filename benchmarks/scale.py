"""Scale: how many devices one xvf service loop carries before the per-access
latency doubles, and the xvf process's resident memory per device.

Latency: one responder process (xvf's Cython loop, as in the daemon) serves D
devices, each with one vCPU issuing back-to-back InterruptStatus reads from the C
requester at the same time (D = 1, 2, 4, ... 64). Memory: a real xvf process on the
software Xen, guests with one virtio-blk device each added one by one, each
served by its own qemu-storage-daemon; VmRSS after each device is live."""

from __future__ import annotations

import shutil

import numpy as np

from benchmarks.common import rss_kib
from benchmarks.e2e_blk import Setup
from benchmarks.mmio_roundtrip import one_run


def latency_sweep(devices: list[int], iters: int, pin_cpus) -> tuple[list[dict], int | None]:
    rows = []
    base = None
    limit = None
    for d in devices:
        n = max(iters * 16 // max(d, 16), 20)  # the same total work from 16 devices on
        r = one_run(
            "cython", "read", ndev=d, vpd=1, iters=n, warmup=10, pin_cpus=pin_cpus,
            dispatch=True,
        )  # fmt: skip
        med, p99 = np.percentile(r["lat"], [50, 99]) / 1e3
        base = base or med
        rows.append(
            {
                "devices": d,
                "median_us": float(med),
                "p99_us": float(p99),
                "vs_1_device": float(med / base),
                "throughput_kops": r["throughput"] / 1e3,
                "cpu_us_per_access": r["cpu_ns_per_access"] / 1e3,
            }
        )
        if limit is None and med >= 2 * base:
            limit = d
    return rows, limit


def memory_sweep(devices: int) -> tuple[list[dict], float]:
    setup = Setup(image_mib=8)
    rows = []
    try:
        for i in range(devices):
            setup.start_qsd(f"blk.sock{i}")
        proc = setup.start_xvf(foreign=True)
        setup.wait_log("xvf serving (")  # up and watching xenstore
        rows.append({"devices": 0, "rss_kib": rss_kib(proc.pid)})
        blks = []
        for i in range(devices):
            blk = setup.guest_blk(foreign=True, name=f"g{i}", memory_mib=16)
            setup.wait_log("serving virtio blk", count=i + 1)
            blk.start()
            blk.read(0, 8)  # the device is live end to end
            blks.append(blk)
            rows.append({"devices": i + 1, "rss_kib": rss_kib(proc.pid)})
        for blk in blks:
            blk.close()
    finally:
        setup.close()
    xs = np.array([r["devices"] for r in rows], dtype=float)
    ys = np.array([r["rss_kib"] for r in rows], dtype=float)
    slope = float(np.polyfit(xs, ys, 1)[0]) if len(rows) > 1 else float("nan")
    return rows, slope


def run(quick: bool = False, pin_cpus: tuple[int, int] | None = None) -> dict:
    devices = [1, 2] if quick else [1, 2, 4, 8, 16, 32, 64]
    lat_rows, limit = latency_sweep(devices, 50 if quick else 1500, pin_cpus)
    result = {
        "name": "scale",
        "title": "Devices per xvf service loop (all issuing at once) and RSS per device",
        "params": {"devices": devices},
        "columns": [
            "devices",
            "median_us",
            "p99_us",
            "vs_1_device",
            "throughput_kops",
            "cpu_us_per_access",
        ],
        "rows": lat_rows,
        "ratios": {
            "latency doubles at devices": limit if limit is not None else f"> {devices[-1]}"
        },
    }
    if shutil.which("qemu-storage-daemon"):
        mem_rows, slope = memory_sweep(2 if quick else 8)
        result["memory"] = mem_rows
        result["ratios"]["xvf RSS per device KiB"] = slope
    else:
        result["memory_skipped"] = "qemu-storage-daemon not installed"
    return result
