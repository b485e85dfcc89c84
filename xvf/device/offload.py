"""Kernel offload of one device's notifications and interrupts (privcmd, Linux 6.7+).

With privcmd ioeventfd the Dom0 kernel completes the guest's QueueNotify write
itself and signals the queue's kick eventfd; with privcmd irqfd it raises the
guest's SPI when a backend signals the call eventfd. Either is used only where the
platform offers it (probed once per Dom0). ioeventfd needs a backend that works on
the guest's rings itself (foreign or grant regions; not the relay, which must see
every kick); irqfd serves the relay too: xvf signals it after completing requests,
one eventfd write instead of a set_irq_level dm_op (and none to lower the line). A
refused assignment falls back to xvf, said once.
"""

from __future__ import annotations

import logging
import os

from xvf.errors import XvfError
from xvf.guest.guest import Guest
from xvf.hotpath._ioreq import MmioState
from xvf.platform.interface import Platform
from xvf.protocols import virtio as V

log = logging.getLogger("xvf.device")


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class KernelOffload:
    """What the kernel does for one device: `notify` (ioeventfd) and `interrupts` (irqfd)."""

    def __init__(
        self,
        label: str,
        platform: Platform,
        guest: Guest,
        base: int,
        irq: int,
        state: MmioState,
        wanted: bool,
    ) -> None:
        self.label = label
        self.platform = platform
        self.guest = guest
        self.base = base
        self.irq = irq
        self.state = state
        self.wanted = wanted
        self.notify = False  # QueueNotify completed by the kernel (ioeventfd)
        self.interrupts = False  # interrupts injected by the kernel (irqfd)
        self._refused: set[str] = set()  # what the kernel refused once: not tried again
        self._irqfd = -1  # the device's one call eventfd while irqfd is assigned

    def allow(self, direct_rings: bool) -> None:
        """A connection's memory strategy is known: the kernel may take kicks only where
        the backend works on the guest's rings itself (not relayed); it may inject the
        interrupts of either (a relay signals the irqfd itself)."""
        self.notify = (
            self.wanted and direct_rings and self.platform.supports_ioeventfd
            and "notify" not in self._refused
        )  # fmt: skip
        self.interrupts = (
            self.wanted and self.platform.supports_irqfd and "interrupts" not in self._refused
        )

    def call_fd(self) -> int:
        """A new call eventfd for a queue: the shared irqfd (dup'd) when the kernel
        injects, else one xvf reads."""
        if self.interrupts:
            try:
                return os.dup(self._shared_irqfd())
            except XvfError as exc:
                log.warning("%s: privcmd irqfd refused (%s); interrupts stay with xvf",
                            self.label, exc)  # fmt: skip
                self.interrupts = False
                self._refused.add("interrupts")
        return new_eventfd()

    def relay_interrupts(self) -> None:
        """A relayed queue is live: xvf raises its interrupts through the irqfd (the
        backend's calls still come to xvf, which copies the completions first)."""
        if not self.interrupts:
            return
        try:
            self.state.set_irq_fd(self._shared_irqfd())
        except XvfError as exc:
            log.warning("%s: privcmd irqfd refused (%s); interrupts stay with xvf",
                        self.label, exc)  # fmt: skip
            self.interrupts = False
            self._refused.add("interrupts")

    def _shared_irqfd(self) -> int:
        if self._irqfd < 0:
            efd = new_eventfd()
            try:
                self.platform.assign_irqfd(self.guest.domid, self.irq, efd)
            except Exception:
                os.close(efd)
                raise
            self._irqfd = efd
            self.state.vring_sticky = True
        return self._irqfd

    def assign_kick(self, index: int, kick: int) -> bool:
        """Let the kernel complete QueueNotify writes of queue `index` into `kick`."""
        if not self.notify:
            return False
        server = self.guest.server
        if server is None:
            return False
        try:
            self.platform.assign_ioeventfd(
                server, self.guest.ports, self.base + V.QUEUE_NOTIFY, kick, index
            )
        except XvfError as exc:
            log.warning("%s: privcmd ioeventfd refused (%s); QueueNotify stays with xvf",
                        self.label, exc)  # fmt: skip
            self.notify = False
            self._refused.add("notify")
            return False
        return True

    def release_kick(self, index: int, kick: int) -> None:
        server = self.guest.server
        if server is None:
            return
        try:
            self.platform.assign_ioeventfd(
                server, self.guest.ports, self.base + V.QUEUE_NOTIFY, kick, index, deassign=True
            )
        except XvfError as exc:  # the guest may be gone already
            log.debug("%s: deassigning ioeventfd of queue %d: %s", self.label, index, exc)

    def release_interrupts(self) -> None:
        """No queue uses the shared irqfd any more."""
        if self._irqfd < 0:
            return
        self.state.set_irq_fd(-1)  # before the fd closes
        try:
            self.platform.assign_irqfd(self.guest.domid, self.irq, self._irqfd, deassign=True)
        except XvfError as exc:  # the guest may be gone already
            log.debug("%s: deassigning irqfd: %s", self.label, exc)
        os.close(self._irqfd)
        self._irqfd = -1
        self.state.vring_sticky = False
