"""Lending a simulated guest's vCPU and one virtio device's signals to another process.

The benchmarks' C guest (benchmarks/c/blk_guest.c) runs the I/O of a device that the
simulator's Python driver has set up, at the cost of C rather than of this simulator:
it writes its vCPU's ioreq slot itself and plays the simulated Xen's side of the device
model's event-channel handle (the same socket protocol as xvf.platform.sim.evtchn); it
takes the device's interrupt from an eventfd (the Dom0 kernel's irqfd when xvf gave
one, else one this simulator signals at each assertion of the SPI); and it kicks the
Dom0 kernel's ioeventfd when xvf gave one. While the loan lasts the simulator does none
of this for the domain, and nothing else in this process may access its devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from xvf.errors import SimulatorError
from xvf.hotpath import _layout as L
from xvf.platform.sim.hypervisor import Domain


@dataclass
class VcpuLoan:
    """What the borrower is given (`args`, with the fds in `pass_fds`); `close()` ends it."""

    args: dict[str, int]
    pass_fds: list[int]
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()


def lend_device(dom: Domain, index: int, vcpu: int = 0) -> VcpuLoan:
    """Lend `vcpu` and the `index`-th virtio device's kicks and interrupts of `dom`.

    The device must be served (its window claimed) and idle: no access in flight."""
    spec = dom.virtio[index]
    hv = dom.hv
    with hv.lock:
        servers = [s for _, s in sorted(dom.servers.items(), reverse=True)]
    server = next((s for s in servers if s.claims(spec.base, 4)), None)
    if server is None:
        raise SimulatorError(f"nothing serves device {index} of domain {dom.domid}")
    loan = VcpuLoan(args={}, pass_fds=[])
    try:
        handle, dom0_port, loopback = hv.evtchn.lend_handle(dom.domid)
        loan._undo.append(lambda: hv.evtchn.take_back(handle))
        loan.args.update(
            page_fd=server.fd,
            page_off=L.IOREQ_SERVER_FRAME_IOREQ * L.PAGE_SIZE + vcpu * L.IOREQ_SIZE,
            evt_fd=handle.sock.fileno(),
            port=dom0_port[server.ports[vcpu]],
            mmio_base=spec.base,
            kick_fd=dom.ioeventfds.get((spec.base + L.VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0), -1),
        )
        if loopback:
            # the service thread's wake-up channel: the borrower delivers it as we would
            if len(loopback) != 2:
                raise SimulatorError(f"{len(loopback) // 2} loopback channels on one handle")
            loan.args["wake_a"], loan.args["wake_b"] = sorted(loopback)
        with hv.lock:
            irqfds = [
                s.irqfds[(dom.domid, spec.irq)]
                for s in hv.sessions
                if (dom.domid, spec.irq) in s.irqfds
            ]
        if irqfds:
            (irqfd,) = irqfds
            fire = hv.irqfds.lend(irqfd)
            loan._undo.append(lambda: hv.irqfds.take_back(irqfd, fire))
            loan.args["irq_fd"] = irqfd
        else:
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            with dom.irq_cond:
                dom.irq_eventfds[spec.irq] = efd
                if dom.irq_level(spec.irq):  # a level already high is taken as pending
                    os.eventfd_write(efd, 1)

            def unhook() -> None:
                dom.irq_eventfds.pop(spec.irq, None)
                os.close(efd)

            loan._undo.append(unhook)
            loan.args["irq_fd"] = efd
        loan.pass_fds = [fd for key, fd in loan.args.items() if key.endswith("_fd") and fd >= 0]
    except BaseException:
        loan.close()
        raise
    return loan
