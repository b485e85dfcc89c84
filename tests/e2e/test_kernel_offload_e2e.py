"""privcmd ioeventfd/irqfd (Linux 6.7+): QueueNotify and the used-buffer interrupt
bypass xvf where the Dom0 kernel offers them; detected at run time, with the
ioreq path as the fallback and a log line saying which is used."""

from __future__ import annotations

import random

import pytest

from tests.conftest import needs_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach
from xvf.protocols import virtio as R

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
LINE = 'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=0" ]'


def run_io(hypervisor, sockets, start_frontend, start_blk_backend, extra=()):
    _, image = start_blk_backend(sockets, "blk.sock0", size=16 * MIB)
    fe = start_frontend(sockets, foreign=True, extra=list(extra))
    dom = hypervisor.create_domain("offload", memory_mib=48, vcpus=2, virtio=LINE)
    fe.wait_log("interrupts injected by")
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    data = random.Random(9).randbytes(4 * MIB)
    for off in range(0, len(data), 128 * 1024):
        blk.write(off // 512, data[off : off + 128 * 1024])
    blk.flush()
    assert blk.read(2048, 256) == data[2048 * 512 : 2304 * 512]
    with open(image, "rb") as f:
        assert f.read(len(data)) == data
    return fe, dom, blk


@pytest.mark.kernel_eventfds
def test_kernel_takes_notifies_and_interrupts(
    hypervisor, sockets, start_frontend, start_blk_backend
):
    fe, dom, blk = run_io(hypervisor, sockets, start_frontend, start_blk_backend)
    assert "QueueNotify handled by the kernel (privcmd ioeventfd)" in fe.log()
    assert "interrupts injected by the kernel (privcmd irqfd)" in fe.log()
    assert dom.ioeventfd_hits > 0  # notifies completed without an ioreq to xvf
    # xvf cannot see irqfd interrupts, so InterruptStatus keeps the vring bit set
    base = dom.virtio[0].base
    assert dom.mmio(0, base + R.INTERRUPT_STATUS, 4, False) & R.INT_VRING
    blk.close()
    # a reset releases the offloads: the next driver works the same way
    again = VirtioBlk(attach(dom, 0))
    again.start()
    again.write(0, b"\x5a" * 4096)
    assert again.read(0, 8) == b"\x5a" * 4096
    # xl destroy with the offloads live: xvf releases them before it answers Closed
    # (on real Xen a destroy with Dom0 still holding them hung in its hypercall)
    hypervisor.destroy_domain(dom.domid)
    assert hypervisor.backends_closed[dom.domid]
    assert hypervisor.held_at_destroy[dom.domid] == []


@pytest.mark.kernel_eventfds
def test_ioreq_only_keeps_everything_in_xvf(hypervisor, sockets, start_frontend, start_blk_backend):
    fe, dom, blk = run_io(
        hypervisor, sockets, start_frontend, start_blk_backend, extra=["--ioreq-only"]
    )
    assert "QueueNotify handled by xvf (ioreq service loop)" in fe.log()
    assert dom.ioeventfd_hits == 0
    blk.close()


def test_fallback_without_kernel_support(hypervisor, sockets, start_frontend, start_blk_backend):
    fe, dom, blk = run_io(hypervisor, sockets, start_frontend, start_blk_backend)
    assert "interrupts injected by xvf (dm_op set_irq_level)" in fe.log()
    assert dom.ioeventfd_hits == 0
    blk.close()
