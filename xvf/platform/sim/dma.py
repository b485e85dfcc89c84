"""The guest kernel's DMA ops for a virtio device.

`DirectDma`: no VIRTIO_F_ACCESS_PLATFORM, the device sees guest-physical
addresses (the backend maps all guest RAM: foreign mapping).

`GrantDma`: Linux's Xen grant DMA ops (drivers/xen/grant-dma-ops.c). Every
mapping gets consecutive grant refs, one per Xen page the buffer touches, and
the DMA address is `GRANT_DMA_ADDR_OFF | (first_ref << 12)` plus the
buffer's offset in its first page. Streaming mappings the device only reads are
granted read-only. Unmapping ends access and frees the refs; if the backend
still has a page mapped, the device is marked broken and the refs are leaked,
as Linux does.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Protocol

from xvf.errors import GrantError, SimulatorError
from xvf.platform.sim.grant_table import GrantTable
from xvf.platform.sim.memory import GuestRam, page_align_up
from xvf.protocols.virtqueue import GRANT_DMA_ADDR_OFF, PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger("xvf.platform.sim.dma")

_OFFSET_MASK = PAGE_SIZE - 1


def grant_to_dma(ref: int) -> int:
    return GRANT_DMA_ADDR_OFF | (ref << PAGE_SHIFT)


def dma_to_grant(dma: int) -> int:
    return (dma & ~GRANT_DMA_ADDR_OFF) >> PAGE_SHIFT


def pages_spanned(offset_in_page: int, length: int) -> int:
    return (offset_in_page + length + PAGE_SIZE - 1) >> PAGE_SHIFT


class DmaOps(Protocol):
    uses_grants: bool

    def alloc_coherent(self, size: int) -> tuple[int, int]: ...
    def free_coherent(self, gpa: int, size: int, dma: int) -> None: ...
    def map(self, gpa: int, length: int, device_writes: bool) -> int: ...
    def unmap(self, dma: int, length: int) -> None: ...


class DirectDma:
    """DMA address == guest-physical address."""

    uses_grants = False

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram

    def alloc_coherent(self, size: int) -> tuple[int, int]:
        gpa = self.ram.alloc(size)
        return gpa, gpa

    def free_coherent(self, gpa: int, size: int, dma: int) -> None:
        self.ram.free(gpa)

    def map(self, gpa: int, length: int, device_writes: bool) -> int:
        if length <= 0 or not self.ram.contains(gpa, length):
            raise SimulatorError(f"DMA map of {gpa:#x}+{length:#x}: not guest RAM")
        return gpa

    def unmap(self, dma: int, length: int) -> None:
        pass


class GrantDma:
    """Xen grant DMA ops for a device whose backend runs in `backend_domid`."""

    uses_grants = True

    def __init__(self, ram: GuestRam, grant_table: GrantTable, backend_domid: int = 0) -> None:
        self.ram = ram
        self.grants = grant_table
        self.backend_domid = backend_domid
        self.broken = False
        self._lock = threading.Lock()
        self._live: dict[int, int] = {}  # first ref -> number of refs, for checks

    def _grant_range(self, gpa: int, n_pages: int, readonly: bool) -> int:
        if self.broken:
            raise GrantError(
                "grant DMA disabled: a grant was still in use by the backend", errno.EIO
            )
        first = self.grants.alloc_refs(n_pages)
        gfn = gpa >> PAGE_SHIFT
        for i in range(n_pages):
            self.grants.grant_access(first + i, self.backend_domid, gfn + i, readonly)
        with self._lock:
            self._live[first] = n_pages
        return first

    def _end_range(self, first: int, n_pages: int, what: str) -> None:
        with self._lock:
            live = self._live.get(first)
            if live != n_pages:
                raise SimulatorError(
                    f"{what} of grant ref {first} x{n_pages}: mapped as {live} refs"
                )
            del self._live[first]
        for i in range(n_pages):
            if not self.grants.end_access(first + i):
                log.error(
                    "grant ref %d still in use by domain %d: grant DMA disabled",
                    first + i,
                    self.backend_domid,
                )
                self.broken = True
                return  # the refs are leaked, never reused while mapped
        self.grants.free_refs(first, n_pages)

    def alloc_coherent(self, size: int) -> tuple[int, int]:
        n_pages = page_align_up(size) >> PAGE_SHIFT
        gpa = self.ram.alloc(size)
        try:
            first = self._grant_range(gpa, n_pages, readonly=False)
        except Exception:
            self.ram.free(gpa)
            raise
        return gpa, grant_to_dma(first)

    def free_coherent(self, gpa: int, size: int, dma: int) -> None:
        n_pages = page_align_up(size) >> PAGE_SHIFT
        self._end_range(dma_to_grant(dma), n_pages, "free_coherent")
        self.ram.free(gpa)

    def map(self, gpa: int, length: int, device_writes: bool) -> int:
        if length <= 0 or not self.ram.contains(gpa, length):
            raise SimulatorError(f"DMA map of {gpa:#x}+{length:#x}: not guest RAM")
        offset = gpa & _OFFSET_MASK
        first = self._grant_range(gpa, pages_spanned(offset, length), readonly=not device_writes)
        return grant_to_dma(first) + offset

    def unmap(self, dma: int, length: int) -> None:
        if not dma & GRANT_DMA_ADDR_OFF:
            raise SimulatorError(f"unmapping {dma:#x}, which is not a grant DMA address")
        offset = dma & _OFFSET_MASK
        self._end_range(dma_to_grant(dma), pages_spanned(offset, length), "unmap")

    def outstanding(self) -> int:
        """Grant refs currently held by live mappings."""
        with self._lock:
            return sum(self._live.values())
