"""Soak: several guests doing mixed I/O for a bounded time while xvf's file
descriptors and memory are watched. Guests also reset devices and get
destroyed and re-created, so set-up and tear-down paths are soaked too.

Duration: $XVF_SOAK_SECONDS (default 20; CI runs longer).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from tests.conftest import needs_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.drivers.i2c import VirtioI2c
from xvf.platform.sim.guest import attach, wait_served

pytestmark = [pytest.mark.e2e, pytest.mark.slow, needs_qsd]

MIB = 1 << 20
GUESTS = 3
LINE = (
    'virtio = [ "type=virtio,device2, transport=mmio, grant_usage={g}", '
    '"type=virtio,device22, transport=mmio, grant_usage={g}" ]'
)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def guest_workload(dom, seed: int, deadline: float, image: str, errors: list, stats: dict):
    rng = random.Random(seed)
    try:
        while True:
            blk = VirtioBlk(attach(dom, 0), event_idx=rng.random() < 0.5)
            blk.start()
            i2c = VirtioI2c(attach(dom, 1, vcpu=1))
            i2c.start()
            for _ in range(rng.randint(5, 20)):  # a burst, then a device reset
                sector = rng.randrange(0, 8 * MIB // 512 - 64)
                data = rng.randbytes(512 * rng.randint(1, 64))
                blk.write(sector, data)
                assert blk.read(sector, len(data) // 512) == data
                i2c.write_reg(0x50, sector & 0xF0, data[:8])
                assert i2c.read_reg(0x50, sector & 0xF0, 8) == data[:8]
                stats["ops"] += 1
            blk.close()
            i2c.close()
            stats["resets"] += 1
            if time.monotonic() >= deadline:
                return
    except BaseException as exc:
        errors.append(exc)


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign", "grant"])
def test_soak(hypervisor, start_frontend, start_blk_backend, start_ref_backend, foreign, sockets):
    seconds = float(os.environ.get("XVF_SOAK_SECONDS", "20"))
    images = [start_blk_backend(sockets, f"blk.sock{n}", size=8 * MIB)[1] for n in range(GUESTS)]
    for n in range(GUESTS):
        start_ref_backend("i2c", os.path.join(sockets, f"i2c.sock{n}"))
    fe = start_frontend(sockets, foreign=foreign, extra=["--log-level", "warning"])
    line = LINE.format(g="0" if foreign else "1")
    doms = [
        hypervisor.create_domain(f"soak{g}", memory_mib=48, vcpus=2, virtio=line)
        for g in range(GUESTS)
    ]
    # warm-up: every device served once, then the baseline is taken
    for g, dom in enumerate(doms):
        wait_served(dom, 0)
        wait_served(dom, 1)
        # one burst and reset per guest: the state every workload loop ends in
        guest_workload(dom, g, 0, images[g], [], {"ops": 0, "resets": 0})
    base_fds, base_rss = fd_count(fe.proc.pid), rss_kib(fe.proc.pid)

    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []
    stats = [{"ops": 0, "resets": 0} for _ in doms]
    threads = [
        threading.Thread(
            target=guest_workload, args=(dom, 100 + g, deadline, images[g], errors, stats[g])
        )
        for g, dom in enumerate(doms)
    ]
    for t in threads:
        t.start()
    # meanwhile one extra guest comes and goes
    churn = 0
    while time.monotonic() < deadline:
        extra = hypervisor.create_domain("churn", memory_mib=16, virtio=line)
        time.sleep(0.3)
        hypervisor.destroy_domain(extra.domid)
        churn += 1
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert all(s["ops"] > 0 for s in stats), stats
    time.sleep(1)  # let xvf finish tearing the last churn guest down
    fds, rss = fd_count(fe.proc.pid), rss_kib(fe.proc.pid)
    print(
        f"soak {seconds:.0f}s: {sum(s['ops'] for s in stats)} ops, "
        f"{sum(s['resets'] for s in stats)} device resets, {churn} guests churned; "
        f"fds {base_fds} -> {fds}, RSS {base_rss} -> {rss} KiB"
    )
    assert fds == base_fds, f"xvf leaks file descriptors: {base_fds} -> {fds}"
    assert rss - base_rss < 16 * 1024, f"xvf memory grew {rss - base_rss} KiB"
    assert fe.proc.poll() is None
    assert "Traceback" not in fe.log()
