"""A grant-mode guest corrupts its own ring and kicks it over and over.

Its avail index jumps 0xFFFF ahead (xvf used to walk 65,535 phantom entries per
kick, write megabytes of log and hold other guests' vCPUs for half a minute), or
names a head outside the queue. xvf does bounded work per kick: the device goes
to DEVICE_NEEDS_RESET with a config interrupt and one log line; another guest's
accesses and I/O are not held up; the broken device works again after a reset.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.conftest import needs_qsd
from tests.e2e.test_isolation_e2e import Bystander
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach
from xvf.protocols import virtio as R
from xvf.protocols.virtqueue import AVAIL_IDX_H, AVAIL_RING_H, avail_bytes, ring_layout

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
GRANT_BLK = 'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=1" ]'
KICKS = 2000


def _corrupt(blk: VirtioBlk, how: str) -> None:
    vq = blk.dev.queues[0]
    avail_gpa = vq.ring_gpa + ring_layout(vq.size)[0]  # split ring: desc table, then avail
    with blk.ram.view(avail_gpa, avail_bytes(vq.size)) as raw, raw.cast("H") as avail:
        idx = avail[AVAIL_IDX_H]
        if how == "avail-jumps":
            avail[AVAIL_IDX_H] = (idx + 0xFFFF) & 0xFFFF
        else:  # one entry naming a head far outside the queue
            avail[AVAIL_RING_H + idx % vq.size] = 0xBEEF
            avail[AVAIL_IDX_H] = (idx + 1) & 0xFFFF


@pytest.mark.parametrize("how", ["avail-jumps", "head-out-of-range"])
def test_a_guest_breaking_its_ring_costs_others_nothing(
    hypervisor, start_frontend, start_blk_backend, sockets, how
):
    _, image_b = start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    start_blk_backend(sockets, "blk.sock1", size=8 * MIB)
    fe = start_frontend(sockets, foreign=False)
    dom_b = hypervisor.create_domain("bystander", memory_mib=32, vcpus=2, virtio=GRANT_BLK)
    fe.wait_log("blk.sock0")
    dom_a = hypervisor.create_domain("hostile", memory_mib=32, virtio=GRANT_BLK)
    fe.wait_log("blk.sock1")
    blk_b = VirtioBlk(attach(dom_b, 0))
    blk_b.start()
    blk_a = VirtioBlk(attach(dom_a, 0))
    blk_a.start()
    blk_a.write(0, b"\x01" * 4096)  # the relay works for it before

    bystander = Bystander(dom_b, 0, vcpu=1)
    bystander.start()
    _corrupt(blk_a, how)
    start = time.monotonic()
    for _ in range(KICKS):
        dom_a.mmio(0, dom_a.virtio[0].base + R.QUEUE_NOTIFY, 4, True, 0)
    kicking = time.monotonic() - start
    data = random.Random(4).randbytes(128 * 1024)
    blk_b.write(0, data)
    blk_b.flush()
    bystander.finish()
    print(
        f"{how}: {KICKS} kicks in {kicking:.2f}s; bystander worst access "
        f"{bystander.worst * 1000:.1f} ms over {bystander.accesses} accesses"
    )
    with open(image_b, "rb") as f:
        assert f.read(len(data)) == data

    status = blk_a.dev.status
    assert status & R.STATUS_DEVICE_NEEDS_RESET, f"status {status:#x}"
    assert dom_a.mmio(0, dom_a.virtio[0].base + R.INTERRUPT_STATUS, 4, False) & R.INT_CONFIG
    log = fe.log()
    assert log.count("guest broke its ring") == 1, "said once, not per kick"
    assert len(log.splitlines()) < 2000, "the log grows with the kicks"

    # A reset and a new driver: the device works again.
    blk_a.dev.reset()
    blk_a = VirtioBlk(attach(dom_a, 0))
    blk_a.start()
    blk_a.write(8, b"\x02" * 4096)
    blk_a.flush()
    assert blk_a.read(8, 8) == b"\x02" * 4096
    assert fe.proc.poll() is None
    blk_a.close()
    blk_b.close()
