"""A device with four queues end to end: virtio-console with MULTIPORT (port 0 receive and
transmit, control receive and transmit), served by the in-tree reference console backend.

In grant mode a Xen-aware backend is given every ring in advance, each ring a region and
the grant space between them regions mapped on demand: four queues whose rings are not
neighbours in grant space take 9 regions, one more than SET_MEM_TABLE carries. xvf then
uses CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG), as QEMU does.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.backends.console import F_MULTIPORT, PORT0_RX, PORT0_TX
from xvf.platform.sim.guest import attach

pytestmark = pytest.mark.e2e

CONSOLE = 3


def _start_console(dev, spaced: bool) -> None:
    """Negotiate MULTIPORT and enable all four queues; `spaced`: a DMA page between each
    queue's rings, as a driver allocating other buffers meanwhile leaves them."""
    dev.negotiate(1 << F_MULTIPORT)
    assert dev.features >> F_MULTIPORT & 1
    spacers = []
    for index in range(4):
        dev.setup_queue(index, 128)
        if spaced:
            spacers.append(dev.dma.alloc_coherent(4096))
    dev.driver_ok()


def _echo(dev, data: bytes) -> bytes:
    rx = dev.ram.alloc(len(data))
    dev.queues[PORT0_RX].add([], [(rx, len(data))], "rx")
    dev.kick(PORT0_RX)
    tx = dev.ram.alloc(len(data))
    dev.ram.write(tx, data)
    dev.queues[PORT0_TX].add([(tx, len(data))], [], "tx")
    dev.kick(PORT0_TX)
    assert dev.wait_used(PORT0_TX, "console transmit", 10) == [("tx", 0)]
    assert dev.wait_used(PORT0_RX, "console echo", 10) == [("rx", len(data))]
    return dev.ram.read(rx, len(data))


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign", "grant"])
def test_four_queue_console_echoes_through_xvf(
    hypervisor, sockets, start_ref_backend, start_frontend, foreign
):
    start_ref_backend("console", os.path.join(sockets, "console.sock0"))
    fe = start_frontend(sockets, foreign=foreign)
    usage = "0" if foreign else "1"
    line = f'virtio = [ "type=virtio,device3, transport=mmio, grant_usage={usage}" ]'
    dom = hypervisor.create_domain("console", memory_mib=32, vcpus=1, virtio=line)
    fe.wait_log("console.sock0")
    dev = attach(dom, 0)
    assert dev.probe() == CONSOLE
    _start_console(dev, spaced=not foreign)
    data = random.Random(9).randbytes(3000)
    assert _echo(dev, data) == data

    # Reset and start again: the old rings' regions go (REM_MEM_REG), new ones come.
    dev.shutdown()
    dev = attach(dom, 0)
    dev.probe()
    _start_console(dev, spaced=not foreign)
    assert _echo(dev, b"again") == b"again"
    dev.shutdown()
    log = fe.log()
    if not foreign:
        assert "ADD_MEM_REG" in log and "REM_MEM_REG" in log
        adds = [ln for ln in log.splitlines() if "-> ADD_MEM_REG" in ln]
        assert len(adds) >= 2 * 9, f"{len(adds)} regions added over two starts"
    assert "ERROR" not in log
