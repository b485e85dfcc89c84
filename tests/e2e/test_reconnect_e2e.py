"""qemu-storage-daemon killed and restarted during a write stream.

xvf marks the device DEVICE_NEEDS_RESET (with a config-change interrupt),
reconnects when the socket comes back, and the guest, after resetting the
device as a virtio driver must, resubmits what never completed. Every write
the guest saw complete is on the image; at the end the image holds exactly
the stream.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.conftest import needs_qsd
from xvf.errors import SimulatorError
from xvf.platform.sim.backends import start_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach
from xvf.protocols import virtio as R

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
CHUNK = 64 * 1024


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign", "grant"])
def test_backend_restart_during_write_stream(
    hypervisor, start_frontend, start_blk_backend, foreign, request, sockets
):
    qsd, image = start_blk_backend(sockets, "blk.sock0", size=16 * MIB)
    fe = start_frontend(sockets, foreign=foreign)
    usage = "0" if foreign else "1"
    dom = hypervisor.create_domain(
        "restart",
        memory_mib=64,
        vcpus=1,
        virtio=f'virtio = [ "type=virtio,device2, transport=mmio, grant_usage={usage}" ]',
    )
    fe.wait_log("serving virtio blk")
    payload = random.Random(7).randbytes(8 * MIB)
    chunks = list(range(0, len(payload), CHUNK))
    completed: set[int] = set()
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    ram = blk.ram
    pending = list(chunks)
    restarted = False
    inflight: dict[int, tuple[object, int, int]] = {}  # id(req) -> (req, offset, gpa)

    while pending or inflight:
        while pending and len(inflight) < 4:
            off = pending.pop(0)
            gpa = ram.alloc(CHUNK)
            ram.write(gpa, payload[off : off + CHUNK])
            req = blk.submit(1, off // 512, gpa, CHUNK)
            inflight[id(req)] = (req, off, gpa)
        if not restarted and len(completed) >= len(chunks) // 3:
            qsd.kill()  # crash, mid-stream, with requests in flight
            restarted = True
            crashed_at = time.monotonic()
        try:
            for req in blk.complete(timeout=3 if restarted else 20):
                r, off, gpa = inflight.pop(id(req))
                assert r.status == 0, r.describe()
                completed.add(off)
                ram.free(gpa)
            continue
        except SimulatorError:
            assert restarted, "no completion although the backend was alive"
        # The device stopped answering: the driver looks at the status, as Linux does
        # on a config-change interrupt, and recovers.
        status = blk.dev.status
        assert status & R.STATUS_DEVICE_NEEDS_RESET, f"status {status:#x}"
        assert time.monotonic() - crashed_at < 30
        qsd = start_qsd(image, os.path.join(sockets, "blk.sock0"))
        request.addfinalizer(qsd.stop)
        fe.wait_log("reconnected to backend")
        blk.dev.reset()
        for _req, off, _gpa in inflight.values():  # never completed: submit again
            pending.insert(0, off)
        inflight.clear()  # the old buffers stay with the dead ring, as after a real reset
        blk = VirtioBlk(attach(dom, 0))
        blk.start()
        ram = blk.ram

    blk.flush()
    assert restarted
    with open(image, "rb") as f:
        on_disk = f.read(len(payload))
    for off in sorted(completed):
        assert on_disk[off : off + CHUNK] == payload[off : off + CHUNK], f"chunk at {off} lost"
    assert on_disk == payload
    blk.close()
