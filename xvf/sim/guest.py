"""Attaching the guest-side virtio-mmio driver to a simulated domain's devices.

Each register access of the driver is a trapped MMIO access of one vCPU,
forwarded by the software Xen as an ioreq to whichever device model serves
the window: exactly what a Linux guest's virtio_mmio driver causes on Xen.
"""

from __future__ import annotations

from xvf.sim.dma import DirectDma, GrantDma
from xvf.sim.hypervisor import Domain
from xvf.sim.virtio_driver import VirtioMmioDevice


class VcpuMmio:
    """The register window of one device as seen from one vCPU."""

    def __init__(self, dom: Domain, vcpu: int, base: int) -> None:
        self.dom = dom
        self.vcpu = vcpu
        self.base = base

    def read(self, offset: int, size: int) -> int:
        return self.dom.mmio(self.vcpu, self.base + offset, size, False)

    def write(self, offset: int, size: int, value: int) -> None:
        self.dom.mmio(self.vcpu, self.base + offset, size, True, value)


def attach(dom: Domain, index: int, vcpu: int = 0) -> VirtioMmioDevice:
    """The driver for the guest's `index`-th virtio device (order of its virtio line)."""
    spec = dom.virtio[index]
    if spec.grants:
        dma = GrantDma(dom.ram, dom.grants, spec.backend_domid)
    else:
        dma = DirectDma(dom.ram)
    return VirtioMmioDevice(
        VcpuMmio(dom, vcpu, spec.base),
        dom.ram,
        dma,
        wait_irq=lambda timeout: dom.wait_irq(spec.irq, timeout),
    )
