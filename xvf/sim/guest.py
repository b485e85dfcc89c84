"""Attaching the guest-side virtio-mmio driver to a simulated domain's devices.

Each register access of the driver is a trapped MMIO access of one vCPU,
forwarded by the software Xen as an ioreq to whichever device model serves
the window: exactly what a Linux guest's virtio_mmio driver causes on Xen.
"""

from __future__ import annotations

import time

from xvf.errors import SimulatorError
from xvf.sim.dma import DirectDma, GrantDma
from xvf.sim.hypervisor import Domain
from xvf.sim.ioreq import GuestDataAbort
from xvf.sim.virtio_driver import DomainMmioTransport, VirtioMmioDevice


def attach(dom: Domain, index: int, vcpu: int = 0, timeout: float = 20.0) -> VirtioMmioDevice:
    """The driver for the guest's `index`-th virtio device (order of its virtio line)."""
    spec = dom.virtio[index]
    if spec.grants:
        dma = GrantDma(dom.ram, dom.grants, spec.backend_domid)
    else:
        dma = DirectDma(dom.ram)
    return VirtioMmioDevice(
        DomainMmioTransport(dom, spec.base, vcpu),
        dom.ram,
        dma,
        wait_irq=lambda t: dom.wait_irq(spec.irq, t),
        name=f"dom{dom.domid}/{spec.type}#{spec.devid}",
        timeout=timeout,
    )


def wait_served(dom: Domain, index: int, timeout: float = 20.0) -> None:
    """Wait until a device model serves the guest's `index`-th device window.

    xvf claims the window once it has found the backend; until then the guest's
    accesses abort, as they would on Xen.
    """
    base = dom.virtio[index].base
    deadline = time.monotonic() + timeout
    while True:
        try:
            dom.mmio(0, base, 4, False)
            return
        except GuestDataAbort:
            if time.monotonic() > deadline:
                raise SimulatorError(
                    f"no device model served device {index} of domain {dom.domid} within {timeout}s"
                ) from None
            time.sleep(0.02)
