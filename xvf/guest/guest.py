"""One guest as the device model sees it: its IOREQ server, ioreq page, event channels,
the routing of its MMIO windows to devices, and its RAM when foreign-mapped (xvf.guest.ram).

Xen allows at most 8 IOREQ servers per domain and libxl gives a guest up to 11
virtio devices, so all of a guest's devices share ONE server: each device adds
its MMIO window (routing in the hot path, range on the server) and removes it
when it stops; the server lives as long as the guest has a device.

Bring-up order, as Xen requires (xen/common/ioreq.c):
  1. create the server and map its ioreq page (acquire_resource allocates and
     clears the page);
  2. enable it: only now does Xen write each vCPU's event channel (vp_eport)
     into the page;
  3. read vp_eport and bind one local port per vCPU;
  4. map device windows onto the server: only mapped ranges reach it, so no
     ioreq can arrive before its event channel is bound (a notification sent on
     an unbound channel is dropped and that vCPU would wait forever).

With `own_thread` the guest's vCPUs are served by a ServiceThread
(xvf.guest.service_thread) on an event-channel handle of its own; the registers
that need Python are posted back to the daemon's loop (`control_loop`).
"""

from __future__ import annotations

import logging

from xvf.errors import XvfError
from xvf.guest.ram import GuestRam
from xvf.guest.service_thread import ServiceThread
from xvf.hotpath._ioreq import IoreqServer, MmioState, ServiceLoop
from xvf.platform.interface import EventChannelHandle, IoreqServerHandle, Platform

log = logging.getLogger("xvf.guest.guest")


class Guest:
    """The IOREQ server of one domain and the devices (MMIO windows) it serves."""

    def __init__(
        self,
        domid: int,
        platform: Platform,
        loop: ServiceLoop,
        evtchn: EventChannelHandle,
        own_thread: bool = False,
        poll_us: float = 0.0,
    ) -> None:
        self.domid = domid
        self.platform = platform
        self.control_loop = loop  # the daemon's: Python callbacks, posted accesses
        self.thread: ServiceThread | None = None
        if own_thread:
            self.thread = ServiceThread(platform, self.label, poll_us)
            loop, evtchn = self.thread.loop, self.thread.evtchn
        self.loop = loop  # where this guest's ioreqs and backends' calls are served
        self.evtchn = evtchn
        self._posted_fd = -1
        self.server: IoreqServerHandle | None = None
        self.ioreq: IoreqServer | None = None
        self.ports: list[int] = []  # local port of each vCPU, index = vCPU id
        self.enabled = False
        self.ram = GuestRam(platform, domid)  # foreign mapping, shared by its devices

    @property
    def label(self) -> str:
        return f"dom{self.domid}"

    @property
    def device_count(self) -> int:
        return len(self.ioreq.windows) if self.ioreq is not None else 0

    def start(self) -> None:
        """Create, map and enable the server, then bind its vCPUs' event channels."""
        try:
            self.server = server = self.platform.create_ioreq_server(self.domid)
            self.ioreq = IoreqServer(server.page, server.nr_vcpus)
            if self.thread is not None:
                fd = self.ioreq.enable_posting()
                self.control_loop.add_reader(fd, self._serve_posted)
                self._posted_fd = fd
            server.set_enabled(True)
            self.enabled = True
            for vcpu in range(server.nr_vcpus):
                remote = self.ioreq.vp_eport(vcpu)
                if remote == 0:
                    raise XvfError(
                        f"{self.label}: Xen wrote no event channel for vCPU {vcpu} into the "
                        "ioreq page of an enabled IOREQ server"
                    )
                port = self.evtchn.bind_interdomain(self.domid, remote)
                self.ports.append(port)
                self.loop.add_route(port, self.ioreq, vcpu)
            # A deferred access (one waiting for a backend) is answered outside the
            # service loop's dispatch: it then notifies the vCPU's port itself.
            self.ioreq.notify_vcpu = self._notify_vcpu
            if self.thread is not None:
                self.thread.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "%s: IOREQ server %d enabled, %d vCPU event channel(s) bound%s",
            self.label,
            server.id,
            len(self.ports),
            ", served on a thread of its own" if self.thread is not None else "",
        )

    def _serve_posted(self) -> None:
        if self.ioreq is not None:
            self.ioreq.serve_posted()

    @property
    def failure(self) -> str | None:
        """Why this guest's service thread stopped serving on its own, or None."""
        return self.thread.failure if self.thread is not None else None

    def _notify_vcpu(self, vcpu: int) -> None:
        if vcpu < len(self.ports):
            try:
                self.evtchn.channel.notify(self.ports[vcpu])
            except XvfError as exc:  # the guest may be gone
                log.debug("%s: notifying vCPU %d: %s", self.label, vcpu, exc)

    def attach(self, base: int, size: int, state: MmioState) -> None:
        """Serve [base, base + size) with `state`: routed first, then claimed from Xen."""
        if self.ioreq is None or self.server is None:
            raise XvfError(f"{self.label}: IOREQ server not started")
        self.ioreq.add_window(base, size, state)
        try:
            self.server.map_mmio_range(base, base + size - 1)
        except BaseException:
            self.ioreq.remove_window(base)
            raise

    def detach(self, base: int, size: int) -> None:
        """Stop serving a window: Xen stops sending it, then what is in flight is answered."""
        if self.ioreq is None or self.server is None:
            return
        try:
            self.server.unmap_mmio_range(base, base + size - 1)
        except Exception as exc:  # the guest may already be gone
            log.debug("%s: unmapping %#x: %s", self.label, base, exc)
        self.answer_pending()
        try:
            self.ioreq.remove_window(base)
        except XvfError as exc:
            log.debug("%s: %s", self.label, exc)

    def answer_pending(self) -> None:
        """Answer every vCPU already waiting in its slot, so none is left blocked."""
        if self.ioreq is not None:
            self._answer_slots(self.ioreq, self.ports)

    def retire(self, server_id: int) -> int:
        """Take over and destroy a server of this guest that a killed xvf left: answer
        the vCPUs waiting on it (binding its event channels, unbound since its owner
        died), disable it, answer what raced in, destroy it. Returns vCPUs answered.
        Done once this guest's windows are on our own server, so no access is left
        without one."""
        old = self.platform.open_ioreq_server(self.domid, server_id)
        page = IoreqServer(old.page, old.nr_vcpus)  # no windows: every access is answered
        ports: list[int] = []
        answered = 0
        try:
            for vcpu in range(old.nr_vcpus):
                remote = page.vp_eport(vcpu)
                try:
                    ports.append(self.evtchn.bind_interdomain(self.domid, remote))
                except XvfError as exc:
                    ports.append(-1)
                    log.warning("%s: vCPU %d of server %d: %s", self.label, vcpu, server_id, exc)
            answered = self._answer_slots(page, ports)
            old.set_enabled(False)
            answered += self._answer_slots(page, ports)
        finally:
            for port in ports:
                if port >= 0:
                    try:
                        self.evtchn.unbind(port)
                    except Exception as exc:
                        log.debug("%s: unbinding port %d: %s", self.label, port, exc)
            page.release()
            old.destroy()
        return answered

    def _answer_slots(self, page: IoreqServer, ports: list[int]) -> int:
        """Answer each vCPU waiting in its slot of `page` and notify it on its port
        (-1: none bound); returns how many were answered. An access no window claims
        is answered as nobody serves it (reads get all ones)."""
        n = 0
        for vcpu, port in enumerate(ports):
            try:
                if page.service(vcpu):
                    n += 1
                    if port >= 0:
                        self.evtchn.channel.notify(port)
            except XvfError as exc:  # the guest may be gone
                log.debug("%s: answering vCPU %d: %s", self.label, vcpu, exc)
        return n

    def stop(self) -> None:
        """Disable, answer waiting vCPUs, unbind, destroy the server (safe to call twice)."""
        server = self.server
        if server is not None and self.enabled:
            # Disabled first: Xen then sends it nothing new, and a vCPU already
            # waiting on its slot is answered below.
            try:
                server.set_enabled(False)
            except Exception as exc:  # the guest may already be gone
                log.debug("%s: disabling IOREQ server: %s", self.label, exc)
            self.enabled = False
        if self.thread is not None:
            try:
                self.thread.stop()  # nothing serves the page from now on but this thread
            except XvfError as exc:
                log.error("%s", exc)
        if self.ioreq is not None:
            self.ioreq.serve_posted()
        self.answer_pending()
        if self._posted_fd >= 0:
            self.control_loop.remove_fd(self._posted_fd)
            self._posted_fd = -1
        for port in self.ports:
            self.loop.remove_route(port)
            try:
                self.evtchn.unbind(port)
            except Exception as exc:
                log.debug("%s: unbinding port %d: %s", self.label, port, exc)
        self.ports.clear()
        if self.ioreq is not None:
            self.ioreq.notify_vcpu = None
            self.ioreq.release()
            self.ioreq = None
        if self.thread is not None:
            self.thread.close()  # a thread that would not stop keeps its handle
        if server is not None:
            try:
                server.destroy()
            except Exception as exc:  # the guest may already be gone
                log.debug("%s: destroying IOREQ server: %s", self.label, exc)
            self.server = None
