"""A guest resets its device with large writes in flight, frees their buffers and
rings, and initialises the device again, over and over.

A reset (Status 0) completes only once the backend has stopped each ring and
completed what it held, so no completion from before lands in the rings (or
buffers) the re-initialised driver allocates from the same memory. This used to
break the device in about half the runs ("used id not in flight"; in relay mode a
new write then never completed).
"""

from __future__ import annotations

import os
import random

import pytest

from tests.conftest import needs_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
REQUEST = 256 * 1024
IN_FLIGHT = 8
ROUNDS = 12
VIRTIO_BLK_T_OUT = 1


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign", "grant-relay"])
def test_resets_with_writes_in_flight_never_reach_the_new_rings(
    hypervisor, start_frontend, start_blk_backend, sockets, foreign
):
    _, image = start_blk_backend(sockets, "blk.sock0", size=32 * MIB)
    fe = start_frontend(sockets, foreign=foreign)
    usage = "0" if foreign else "1"
    dom = hypervisor.create_domain(
        "resets", memory_mib=64, vcpus=1,
        virtio=f'virtio = [ "type=virtio,device2, transport=mmio, grant_usage={usage}" ]',
    )  # fmt: skip
    fe.wait_log("serving virtio blk")
    rng = random.Random(11)
    for _ in range(ROUNDS):
        blk = VirtioBlk(attach(dom, 0))
        blk.start()
        buffers = []
        for i in range(IN_FLIGHT):
            gpa = blk.ram.alloc(REQUEST)
            blk.ram.write(gpa, rng.randbytes(REQUEST))
            blk.submit(VIRTIO_BLK_T_OUT, i * REQUEST // 512, gpa, REQUEST)
            buffers.append(gpa)
        blk.dev.reset()  # with those writes in the backend
        for gpa in buffers:  # safe once the reset completed: nobody writes there any more
            blk.ram.free(gpa)
        blk.close()

    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    data = rng.randbytes(REQUEST)
    blk.write(0, data)
    blk.flush()
    assert blk.read(0, REQUEST // 512) == data
    with open(image, "rb") as f:
        assert f.read(REQUEST) == data
    log = fe.log()
    assert "not in flight" not in log
    assert "closed the connection" not in log, "the backend's session broke"
    gave_up = [ln for ln in log.splitlines() if "still in the backend" in ln]
    assert not gave_up, gave_up
    with open(os.path.join(sockets, "blk.sock0.log"), errors="replace") as f:
        backend_log = f.read()
    assert "vu_panic" not in backend_log, backend_log[-500:]  # a completion after its stop
    blk.close()
