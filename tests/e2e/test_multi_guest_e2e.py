"""Several guests with several devices at once, and a guest that misbehaves."""

from __future__ import annotations

import os
import random
import threading

import pytest

from tests.conftest import needs_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach
from xvf.protocols import virtio as R

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
TWO_BLK = (
    'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=0", '
    '"type=virtio,device2, transport=mmio, grant_usage=0" ]'
)


def _exercise(blk: VirtioBlk, image: str, seed: int, errors: list) -> None:
    try:
        data = random.Random(seed).randbytes(4 * MIB)
        for off in range(0, len(data), 128 * 1024):
            blk.write(off // 512, data[off : off + 128 * 1024])
        blk.flush()
        with open(image, "rb") as f:
            assert f.read(len(data)) == data, f"{image} differs"
        assert blk.read(8, 16) == data[8 * 512 : 24 * 512]
    except BaseException as exc:
        errors.append(exc)


def test_two_guests_two_devices_each(hypervisor, start_frontend, start_blk_backend, sockets):
    images = [start_blk_backend(sockets, f"blk.sock{n}", size=8 * MIB)[1] for n in range(4)]
    fe = start_frontend(sockets, foreign=True)
    doms = [
        hypervisor.create_domain(f"g{i}", memory_mib=32, vcpus=2, virtio=TWO_BLK) for i in range(2)
    ]
    for n in range(4):
        fe.wait_log(f"via {os.path.join(sockets, f'blk.sock{n}')}")
    # which image backs which device: xvf numbers instances in (domid, devid) order
    drivers, errors, threads = [], [], []
    for g, dom in enumerate(doms):
        for d in range(2):
            blk = VirtioBlk(attach(dom, d, vcpu=d))
            blk.start()
            drivers.append(blk)
            t = threading.Thread(
                target=_exercise, args=(blk, images[2 * g + d], 10 * g + d, errors)
            )
            threads.append(t)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for blk in drivers:
        blk.close()


def test_hostile_guest_gets_spec_behaviour_and_others_keep_working(
    hypervisor, start_frontend, start_blk_backend, sockets
):
    image0 = start_blk_backend(sockets, "blk.sock0", size=8 * MIB)[1]
    start_blk_backend(sockets, "blk.sock1", size=8 * MIB)
    fe = start_frontend(sockets, foreign=True)
    dom = hypervisor.create_domain("hostile", memory_mib=32, vcpus=2, virtio=TWO_BLK)
    fe.wait_log("blk.sock1")
    good = VirtioBlk(attach(dom, 0))
    good.start()
    bad = dom.virtio[1].base

    # QueueNotify before DRIVER_OK (nothing set up at all) is dropped
    dom.mmio(1, bad + R.QUEUE_NOTIFY, 4, True, 0)
    # wrong access sizes: reads as 0, writes ignored
    assert dom.mmio(1, bad + R.MAGIC_VALUE, 2, False) == 0
    dom.mmio(1, bad + R.STATUS, 1, True, 0xFF)
    assert dom.mmio(1, bad + R.STATUS, 4, False) == 0
    # out-of-range queue selector: no queue there
    dom.mmio(1, bad + R.QUEUE_SEL, 4, True, 1000)
    assert dom.mmio(1, bad + R.QUEUE_NUM_MAX, 4, False) == 0
    dom.mmio(1, bad + R.QUEUE_READY, 4, True, 1)
    assert dom.mmio(1, bad + R.QUEUE_READY, 4, False) == 0
    # registers that do not exist, and read-only ones
    assert dom.mmio(1, bad + 0x0E8, 4, False) == 0
    dom.mmio(1, bad + R.DEVICE_ID, 4, True, 9)
    assert dom.mmio(1, bad + R.DEVICE_ID, 4, False) == 2
    # DRIVER_OK without FEATURES_OK is refused
    dom.mmio(1, bad + R.STATUS, 4, True, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER)
    dom.mmio(
        1, bad + R.STATUS, 4, True, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_DRIVER_OK
    )
    assert not dom.mmio(1, bad + R.STATUS, 4, False) & R.STATUS_DRIVER_OK
    # an 8-byte write to a control register and a notify on a queue that does not exist
    dom.mmio(1, bad + R.QUEUE_NUM, 8, True, 1 << 40)
    dom.mmio(1, bad + R.QUEUE_NOTIFY, 4, True, 77)

    # the other device of the same guest was never disturbed
    data = random.Random(3).randbytes(256 * 1024)
    good.write(0, data)
    good.flush()
    with open(image0, "rb") as f:
        assert f.read(len(data)) == data
    # and the abused device works after a reset, like a rebooted driver would do
    dom.mmio(1, bad + R.STATUS, 4, True, 0)
    healed = VirtioBlk(attach(dom, 1))
    healed.start()
    healed.write(0, data[:4096])
    assert healed.read(0, 8) == data[:4096]
    assert "guest " in fe.log()  # the nonsense was logged as the guest's
    good.close()
    healed.close()
