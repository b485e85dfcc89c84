"""IOREQ servers of the software Xen: the shared page and the vCPU side of an access.

The page has Xen's exact layout (include/xvf/xen_ioreq.h): one 32-byte ioreq_t
per vCPU, and the same state machine: the vCPU fills its slot, publishes
IOREQ_READY and signals its event channel; the device model answers with
IORESP_READY and a notify; the vCPU takes the data and returns the slot to NONE.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from xvf.errors import SimulatorError
from xvf.hotpath import _layout as L

# addr, data, count, size, vp_eport (the slot's fields before pad0 and flags)
_REQ_HEAD = struct.Struct("<QQIII")
MAX_VCPUS = L.PAGE_SIZE // L.IOREQ_SIZE
MAX_SERVERS_PER_DOMAIN = 8  # MAX_NR_IOREQ_SERVERS (xen/include/xen/ioreq.h)


class GuestDataAbort(SimulatorError):
    """An access no IOREQ server claims: on Arm, Xen injects a data abort."""


class VcpuStuck(SimulatorError):
    """The device model did not answer an ioreq in time (a real vCPU would hang)."""


@dataclass
class MmioRange:
    start: int
    end: int  # inclusive, as XEN_DMOP_map_io_range_to_ioreq_server takes it


@dataclass
class IoreqServer:
    id: int
    domid: int
    nr_vcpus: int
    ports: list[int]  # guest-side event channel of each vCPU (vp_eport)
    fd: int  # memfd of the resource: frame 0 bufioreq, frame 1 ioreq page
    page: mmap.mmap
    ranges: list[MmioRange] = field(default_factory=list)
    enabled: bool = False
    allocated: bool = False  # the page exists once acquire_resource asked for it
    destroyed: bool = False
    _waiting: int = 0  # vCPUs inside issue() on this server
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, server_id: int, domid: int, ports: list[int]) -> IoreqServer:
        if len(ports) > MAX_VCPUS:
            raise SimulatorError(f"{len(ports)} vCPUs do not fit one ioreq page")
        fd = os.memfd_create(f"xvf-ioreq-d{domid}-s{server_id}", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 * L.PAGE_SIZE)
        page = mmap.mmap(fd, L.PAGE_SIZE, offset=L.IOREQ_SERVER_FRAME_IOREQ * L.PAGE_SIZE)
        return cls(server_id, domid, len(ports), ports, fd, page)

    def allocate_page(self) -> None:
        """acquire_resource: Xen allocates the page on first use and clears it."""
        if not self.allocated:
            self.page[:] = bytes(L.PAGE_SIZE)
            # Already enabled? Then this page gets no ports until the next enable,
            # as in Xen, where ports are written only to a page that exists then.
            self.allocated = True

    def set_enabled(self, enabled: bool) -> None:
        """Like ioreq_server_enable(): the vCPUs' event channels are written into the
        page only now, and only if the page exists; a device model that reads
        vp_eport before enabling reads 0 (as on real Xen)."""
        if enabled and not self.enabled and self.allocated:
            for vcpu, port in enumerate(self.ports):
                struct.pack_into("<I", self.page, vcpu * L.IOREQ_SIZE + L.IOREQ_VP_EPORT, port)
        self.enabled = enabled

    def claims(self, addr: int, size: int) -> bool:
        return self.enabled and any(
            r.start <= addr and addr + size - 1 <= r.end for r in self.ranges
        )

    def close(self) -> None:
        """Destroyed (ioreq_server_destroy). A vCPU still waiting on it completes, as
        in Xen, where it then finds no pending server (vcpu_ioreq_handle_completion);
        the page goes once the last such vCPU has left it."""
        with self._lock:
            self.destroyed = True
            if self._waiting:
                return
        self._release()

    def _release(self) -> None:
        self.page.close()
        os.close(self.fd)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """A vCPU's access on this server: its page is not released meanwhile."""
        with self._lock:
            if self.destroyed:
                raise SimulatorError(f"IOREQ server {self.id} of domain {self.domid} is gone")
            self._waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1
                last = self.destroyed and not self._waiting
            if last:
                self._release()


class VcpuChannel:
    """The vCPU end of ioreq signalling: woken by the device model's notify."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def on_event(self) -> None:
        self.event.set()


def issue(
    server: IoreqServer,
    vcpu: int,
    chan: VcpuChannel,
    notify: Callable[[int, int], object],
    addr: int,
    size: int,
    is_write: bool,
    value: int,
    timeout: float,
    req_type: int = L.IOREQ_TYPE_COPY,
    count: int = 1,
) -> int:
    """Run one access through the ioreq page; returns the value read (0 for writes)."""
    with server.in_use():  # the page stays while this vCPU waits on it, past a destroy
        base = vcpu * L.IOREQ_SIZE
        page = server.page
        state = page[base + L.IOREQ_FLAGS] & L.IOREQ_STATE_MASK
        if state != L.STATE_IOREQ_NONE:
            raise SimulatorError(f"vCPU {vcpu} slot busy (state {state})")
        chan.event.clear()
        _REQ_HEAD.pack_into(
            page, base, addr, value if is_write else 0, count, size, server.ports[vcpu]
        )
        page[base + 31] = req_type
        # The flags byte is the publication point: one single-byte store, last.
        page[base + L.IOREQ_FLAGS] = L.STATE_IOREQ_READY | (0 if is_write else L.IOREQ_DIR_READ_BIT)
        notify(server.domid, server.ports[vcpu])
        deadline = time.monotonic() + timeout
        while True:
            if (page[base + L.IOREQ_FLAGS] & L.IOREQ_STATE_MASK) == L.STATE_IORESP_READY:
                break
            if server.destroyed:
                # Xen completes the access with the request's own data (0 for a read).
                page[base + L.IOREQ_FLAGS] = L.STATE_IOREQ_NONE
                return 0
            left = deadline - time.monotonic()
            if left <= 0:
                what = "write" if is_write else "read"
                raise VcpuStuck(
                    f"domain {server.domid} vCPU {vcpu}: no answer to {what} at {addr:#x} "
                    f"within {timeout}s (device model not running?)"
                )
            chan.event.wait(min(0.5, left))
            chan.event.clear()
        data = struct.unpack_from("<Q", page, base + 8)[0]
        page[base + L.IOREQ_FLAGS] = L.STATE_IOREQ_NONE
        if size < 8:
            data &= (1 << (8 * size)) - 1
        return 0 if is_write else data
