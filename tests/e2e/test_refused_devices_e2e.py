"""Devices xvf refuses: the guest finds "no device" in the window (DeviceID 0), not a
data abort or a hang, xenstore says Closed, and the guest's other devices work."""

from __future__ import annotations

import os
import threading

import pytest

from tests.conftest import needs_qsd
from xvf.daemon.frontend import Frontend
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach, wait_served
from xvf.platform.sim.platform import SimPlatform
from xvf.protocols import virtio as R

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20


def _reads_as_no_device(dom, base: int) -> bool:
    regs = [dom.mmio(0, base + off, 4, False) for off in (R.MAGIC_VALUE, R.VERSION, R.DEVICE_ID)]
    return regs == [R.MAGIC, R.MMIO_VERSION_2, 0]


def test_unknown_device_type_reads_as_no_device(
    hypervisor, sockets, start_frontend, start_blk_backend
):
    start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    fe = start_frontend(sockets, foreign=True)
    line = (
        'virtio = [ "type=virtio,device7e, transport=mmio, grant_usage=0",'
        ' "type=virtio,device2, transport=mmio, grant_usage=0" ]'
    )
    dom = hypervisor.create_domain("unknown", memory_mib=32, virtio=line)
    wait_served(dom, 1)
    fe.wait_log("now reads as 'no device'")
    assert _reads_as_no_device(dom, dom.virtio[0].base)
    dom.mmio(0, dom.virtio[0].base + R.STATUS, 4, True, 0xFF)  # ignored, harmlessly
    blk = VirtioBlk(attach(dom, 1))
    blk.start()
    blk.write(0, b"\x33" * 4096)
    assert blk.read(0, 8) == b"\x33" * 4096
    blk.close()
    hypervisor.destroy_domain(dom.domid)
    assert hypervisor.backends_closed[dom.domid] is True
    assert "Traceback" not in fe.log(), fe.log()


def test_foreign_mapping_with_a_backend_that_cannot_map_xen_is_refused_before_the_guest(
    hypervisor, sockets, start_blk_backend, caplog
):
    """On Xen a backend without XEN_MMAP cannot reach a foreign-mapped guest: xvf says
    so at the handshake, before the guest starts a driver that would hang on its
    first request (seen on the real-Xen rig with qemu-storage-daemon)."""
    start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    platform = SimPlatform(hypervisor.run_dir)
    platform.guest_ram_shareable = False  # as on Xen: RAM is no fd to hand over
    frontend = Frontend(platform, sockets, foreign_mapping=True, socket_timeout=10)
    thread = threading.Thread(target=frontend.run, daemon=True)
    thread.start()
    try:
        dom = hypervisor.create_domain(
            "nomap", memory_mib=32, virtio='virtio = [ "type=virtio,device2, grant_usage=0" ]'
        )
        with pytest.raises(Exception, match=r"refused device 0"):
            wait_served(dom, 0)
        assert _reads_as_no_device(dom, dom.virtio[0].base)
        assert "does not offer it" in caplog.text and "grant_usage=1" in caplog.text
    finally:
        frontend.stop()
        thread.join(timeout=10)
        frontend.close()
        platform.close()


def test_a_backend_with_fewer_queues_than_the_device_is_refused_before_the_guest(
    hypervisor, sockets, start_frontend, start_ref_backend
):
    """GET_QUEUE_NUM is checked before the guest sees QueueNumMax: an i2c backend
    (one queue) behind gpio.sock0 cannot serve virtio-gpio (two queues)."""
    start_ref_backend("i2c", os.path.join(sockets, "gpio.sock0"))
    fe = start_frontend(sockets, foreign=True)
    dom = hypervisor.create_domain(
        "fewq", memory_mib=32, virtio='virtio = [ "type=virtio,device29, grant_usage=0" ]'
    )
    with pytest.raises(Exception, match=r"refused device 0"):
        wait_served(dom, 0)
    fe.wait_log("serves 1 queue(s) (GET_QUEUE_NUM) but virtio gpio needs 2")
    assert _reads_as_no_device(dom, dom.virtio[0].base)
