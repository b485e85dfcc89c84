"""Chaos soak: guests write while their backends and xvf itself are killed (SIGKILL) and
started again at random. A guest whose device stops answering does what a driver does
after DEVICE_NEEDS_RESET or a device model restart: it waits until the device is served
again and starts its driver anew, then goes on. At the end every write a guest saw
complete is on its image, and the last xvf serves every guest.

Duration: $XVF_CHAOS_SECONDS (default 15).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from tests.conftest import needs_qsd
from xvf.platform.sim.backends import start_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach, wait_served

pytestmark = [pytest.mark.e2e, pytest.mark.slow, needs_qsd]

MIB = 1 << 20
GUESTS = 2
BLOCK = 4096
IMAGE = 8 * MIB
SLOTS = IMAGE // BLOCK


class Writer(threading.Thread):
    """One guest: 4 KiB writes with fresh contents at random slots; each completed one
    is remembered (its latest contents per slot)."""

    def __init__(self, dom, seed: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.dom = dom
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.acked: dict[int, bytes] = {}
        self.restarts = 0
        self.errors: list[BaseException] = []

    def _driver(self) -> VirtioBlk:
        while True:
            try:
                wait_served(self.dom, 0, timeout=30)
                blk = VirtioBlk(attach(self.dom, 0, timeout=3))
                blk.start()
                return blk
            except Exception:  # served, then lost again before the driver was up
                time.sleep(0.1)

    def run(self) -> None:
        try:
            blk = self._driver()
            while time.monotonic() < self.deadline:
                slot = self.rng.randrange(SLOTS)
                data = self.rng.randbytes(BLOCK)
                try:
                    blk.write(slot * (BLOCK // 512), data)
                except Exception:  # the device stopped answering: start over
                    self.acked.pop(slot, None)  # whether it landed is unknown
                    self.restarts += 1
                    blk = self._driver()
                    continue
                self.acked[slot] = data
            # Service is back for good: one last write must complete.
            while True:
                try:
                    blk.write(0, b"\xee" * BLOCK)
                    self.acked[0] = b"\xee" * BLOCK
                    return
                except Exception:
                    blk = self._driver()
        except BaseException as exc:
            self.errors.append(exc)


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign", "grant-relay"])
def test_backends_and_xvf_killed_at_random_lose_no_completed_write(
    hypervisor, start_frontend, start_blk_backend, sockets, request, foreign
):
    seconds = float(os.environ.get("XVF_CHAOS_SECONDS", "15"))
    rng = random.Random(77)
    backends, images = [], []
    for n in range(GUESTS):
        proc, image = start_blk_backend(sockets, f"blk.sock{n}", size=IMAGE)
        backends.append(proc)
        images.append(image)
    fe = start_frontend(sockets, foreign=foreign, extra=["--log-level", "info"])
    usage = "0" if foreign else "1"
    line = f'virtio = [ "type=virtio,device2, transport=mmio, grant_usage={usage}" ]'
    doms = [
        hypervisor.create_domain(f"chaos{g}", memory_mib=64, vcpus=1, virtio=line)
        for g in range(GUESTS)
    ]
    for dom in doms:
        wait_served(dom, 0)
    deadline = time.monotonic() + seconds
    writers = [Writer(dom, 100 + g, deadline) for g, dom in enumerate(doms)]
    for w in writers:
        w.start()

    events = {"backend": 0, "xvf": 0}
    round_ = 0
    while time.monotonic() < deadline - 1.0:
        time.sleep(rng.uniform(0.8, 2.0))
        round_ += 1
        if round_ % 3:  # two backend kills, then xvf's own
            n = rng.randrange(GUESTS)
            backends[n].kill()
            time.sleep(rng.uniform(0.1, 0.5))
            backends[n] = start_qsd(images[n], os.path.join(sockets, f"blk.sock{n}"))
            request.addfinalizer(backends[n].stop)
            events["backend"] += 1
        else:
            fe.proc.kill()
            fe.proc.wait(timeout=10)
            time.sleep(rng.uniform(0.1, 0.5))
            fe = start_frontend(sockets, foreign=foreign, extra=["--log-level", "info"])
            events["xvf"] += 1

    for w in writers:
        w.join(timeout=120)
        assert not w.is_alive(), "a guest never got its device back"
        assert not w.errors, w.errors
    print(
        f"chaos: {events['backend']} backend kills, {events['xvf']} xvf kills; "
        f"guest restarts {[w.restarts for w in writers]}, "
        f"writes kept {[len(w.acked) for w in writers]}"
    )
    assert events["backend"] and events["xvf"], events
    for w, image in zip(writers, images, strict=True):
        with open(image, "rb") as f:
            disk = f.read()
        lost = [s for s, d in w.acked.items() if disk[s * BLOCK : (s + 1) * BLOCK] != d]
        assert not lost, f"{len(lost)} completed writes not on {image}"
    assert fe.proc.poll() is None
    assert "Traceback" not in fe.log()
