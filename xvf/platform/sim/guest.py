"""Attaching the guest-side virtio-mmio driver to a simulated domain's devices.

Each register access of the driver is a trapped MMIO access of one vCPU,
forwarded by the software Xen as an ioreq to whichever device model serves
the window: exactly what a Linux guest's virtio_mmio driver causes on Xen.
"""

from __future__ import annotations

import time

from xvf.errors import SimulatorError
from xvf.platform.sim.dma import DirectDma, DmaOps, GrantDma
from xvf.platform.sim.hypervisor import Domain
from xvf.platform.sim.ioreq import GuestDataAbort
from xvf.platform.sim.virtio_driver import DomainMmioTransport, VirtioMmioDevice


def attach(dom: Domain, index: int, vcpu: int = 0, timeout: float = 20.0) -> VirtioMmioDevice:
    """The driver for the guest's `index`-th virtio device (order of its virtio line).

    As a guest started paused and unpaused once its device model answered (what
    the docs ask on real Xen), it first waits up to `timeout` for the device's
    backend state to say served (4) or refused (6); a device model that never
    answers is the driver's to find out."""
    _wait_answered(dom, index, timeout)
    spec = dom.virtio[index]
    dma: DmaOps
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


def backend_state_path(dom: Domain, index: int) -> str:
    """Where the device model publishes the guest's `index`-th device's xenbus state."""
    from xvf.platform.sim.toolstack import backend_path

    spec = dom.virtio[index]
    return f"{backend_path(spec.backend_domid, dom.domid, spec.devid)}/state"


def _wait_answered(dom: Domain, index: int, timeout: float) -> None:
    from xvf.protocols.xenbus import XENBUS_STATE_CLOSED, XENBUS_STATE_CONNECTED
    from xvf.protocols.xenstore import XenStore

    answered = {str(XENBUS_STATE_CONNECTED), str(XENBUS_STATE_CLOSED)}
    path = backend_state_path(dom, index)
    deadline = time.monotonic() + timeout
    with XenStore(dom.hv.xenstore_path) as xs:
        while (xs.read(path) or "").strip() not in answered and time.monotonic() < deadline:
            time.sleep(0.02)


def wait_served(dom: Domain, index: int, timeout: float = 20.0) -> None:
    """Wait until xvf serves the guest's `index`-th device, as a script on real Xen
    would: its backend node's xenstore `state` becomes 4 (Connected); 6 (Closed)
    means xvf gave up on it."""
    from xvf.protocols.xenbus import XENBUS_STATE_CLOSED, XENBUS_STATE_CONNECTED
    from xvf.protocols.xenstore import XenStore

    spec = dom.virtio[index]
    path = backend_state_path(dom, index)
    deadline = time.monotonic() + timeout
    with XenStore(dom.hv.xenstore_path) as xs:
        while True:
            state = (xs.read(path) or "").strip()
            if state == str(XENBUS_STATE_CONNECTED):
                break
            if state == str(XENBUS_STATE_CLOSED):
                raise SimulatorError(
                    f"xvf refused device {index} of domain {dom.domid} ({path} = 6)"
                )
            if time.monotonic() > deadline:
                raise SimulatorError(
                    f"no device model served device {index} of domain {dom.domid} within "
                    f"{timeout}s ({path} = {state!r})"
                )
            time.sleep(0.02)
    try:
        dom.mmio(0, spec.base, 4, False)
    except GuestDataAbort:
        raise SimulatorError(
            f"{path} says served, but nothing answers at {spec.base:#x} (domain {dom.domid})"
        ) from None
