"""A simulated guest reads virtio-mmio registers of a device xvf serves with a real backend."""

from __future__ import annotations

import os

import pytest

from tests.conftest import needs_qsd
from xvf.device.types import BY_NAME
from xvf.platform.sim.ioreq import GuestDataAbort
from xvf.protocols import virtio as R

pytestmark = [pytest.mark.e2e, needs_qsd]

BLK_LINE = 'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=0" ]'


def test_guest_probes_blk_device_through_xvf(
    hypervisor, start_frontend, start_blk_backend, sockets
):
    _, image = start_blk_backend(sockets, "blk.sock0", size=32 << 20)
    fe = start_frontend(sockets, foreign=True)
    dom = hypervisor.create_domain("probe", memory_mib=32, vcpus=2, virtio=BLK_LINE)
    fe.wait_log("serving virtio blk")
    base = dom.virtio[0].base

    for vcpu in (0, 1):
        assert dom.mmio(vcpu, base + R.MAGIC_VALUE, 4, False) == R.MAGIC
    assert dom.mmio(0, base + R.VERSION, 4, False) == 2
    assert dom.mmio(0, base + R.DEVICE_ID, 4, False) == 2
    dom.mmio(0, base + R.DEVICE_FEATURES_SEL, 4, True, 1)
    assert dom.mmio(0, base + R.DEVICE_FEATURES, 4, False) & 1  # VIRTIO_F_VERSION_1
    assert dom.mmio(0, base + R.QUEUE_NUM_MAX, 4, False) == BY_NAME["blk"].queue_size
    # capacity (config offset 0, in 512-byte sectors) comes from QSD via GET_CONFIG
    capacity = dom.mmio(0, base + R.CONFIG, 8, False)
    assert capacity == os.path.getsize(image) // 512
    # nothing maps the next window: the guest gets a data abort, xvf keeps serving
    with pytest.raises(GuestDataAbort):
        dom.mmio(0, base + 0x200, 4, False)
    assert dom.mmio(1, base + R.MAGIC_VALUE, 4, False) == R.MAGIC
