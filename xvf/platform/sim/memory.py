"""Guest RAM of a simulated Arm Xen guest: one memfd, laid out in Xen's two RAM banks.

Bank 0 starts at GUEST_RAM0_BASE; RAM beyond the bank-0 size goes to bank 1 at
GUEST_RAM1_BASE, with a hole in between (xen/include/public/arch-arm.h). The
memfd holds bank 0 at file offset 0 and bank 1 right after it, so a backend
that maps the fd sees exactly the bytes the guest does.

`alloc`/`free` are the guest kernel's page allocator (first fit, page granular).
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from dataclasses import dataclass

from xvf.errors import SimulatorError
from xvf.hotpath._layout import (
    GUEST_RAM0_BASE,
    GUEST_RAM0_SIZE,
    GUEST_RAM1_BASE,
    GUEST_RAM1_SIZE,
    PAGE_SIZE,
)


def page_align_up(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclass(frozen=True)
class RamRegion:
    """One contiguous bank of guest RAM and where it lives in the memfd."""

    gpa: int
    size: int
    fd_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestRam:
    """The RAM of one guest, shared through a memfd with whoever maps it."""

    def __init__(self, size: int, bank0_size: int | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise SimulatorError(f"guest RAM size {size:#x} is not a positive number of pages")
        bank0 = GUEST_RAM0_SIZE if bank0_size is None else bank0_size
        if bank0 <= 0 or bank0 % PAGE_SIZE or bank0 > GUEST_RAM0_SIZE:
            raise SimulatorError(
                f"bank-0 size {bank0:#x} must be pages, at most {GUEST_RAM0_SIZE:#x}"
            )
        if size - min(size, bank0) > GUEST_RAM1_SIZE:
            raise SimulatorError(f"guest RAM size {size:#x} exceeds both banks")
        self.size = size
        self.regions: list[RamRegion] = [RamRegion(GUEST_RAM0_BASE, min(size, bank0), 0)]
        if size > bank0:
            self.regions.append(RamRegion(GUEST_RAM1_BASE, size - bank0, bank0))
        self.fd = os.memfd_create("xvf-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self._mem = memoryview(self._mmap)
        self._closed = False
        # The page allocator: sorted free spans (gpa, size) and live allocations.
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(r.gpa, r.size) for r in self.regions]
        self._allocated: dict[int, int] = {}

    # -- address translation ------------------------------------------------
    def _region(self, gpa: int, length: int) -> RamRegion:
        if length < 0:
            raise SimulatorError(f"negative length {length} at {gpa:#x}")
        for r in self.regions:
            if r.gpa <= gpa < r.end or (length == 0 and gpa == r.end):
                if gpa + length > r.end:
                    raise SimulatorError(
                        f"guest range {gpa:#x}+{length:#x} runs past the RAM bank ending at "
                        f"{r.end:#x}"
                    )
                return r
        raise SimulatorError(f"guest address {gpa:#x} is not RAM")

    def gpa_to_offset(self, gpa: int) -> int:
        """File offset of `gpa` in the memfd."""
        r = self._region(gpa, 1)
        return r.fd_offset + (gpa - r.gpa)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._region(gpa, length)
        except SimulatorError:
            return False
        return True

    def banks(self) -> list[tuple[int, memoryview]]:
        """(gpa, writable view) of each RAM bank."""
        if self._closed:
            raise SimulatorError("guest RAM is closed")
        return [(r.gpa, self._mem[r.fd_offset : r.fd_offset + r.size]) for r in self.regions]

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; the range must lie within one bank."""
        if self._closed:
            raise SimulatorError("guest RAM is closed")
        r = self._region(gpa, length)
        off = r.fd_offset + (gpa - r.gpa)
        return self._mem[off : off + length]

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.view(gpa, n))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    # -- the guest kernel's page allocator -------------------------------------
    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        """Allocate zeroed, page-granular guest memory; returns its gpa."""
        if size <= 0:
            raise SimulatorError(f"cannot allocate {size} bytes")
        if align < PAGE_SIZE or align & (align - 1):
            raise SimulatorError(f"alignment {align} must be a power of two >= a page")
        size = page_align_up(size)
        with self._lock:
            for i, (start, span) in enumerate(self._free):
                gpa = (start + align - 1) & ~(align - 1)
                if gpa + size > start + span:
                    continue
                pieces = []
                if gpa > start:
                    pieces.append((start, gpa - start))
                if gpa + size < start + span:
                    pieces.append((gpa + size, start + span - gpa - size))
                self._free[i : i + 1] = pieces
                self._allocated[gpa] = size
                break
            else:
                raise SimulatorError(
                    f"guest RAM exhausted: no {size:#x} bytes aligned to {align:#x}"
                )
        self.view(gpa, size)[:] = bytes(size)
        return gpa

    def free(self, gpa: int) -> None:
        with self._lock:
            size = self._allocated.pop(gpa, None)
            if size is None:
                raise SimulatorError(f"freeing {gpa:#x}, which was not allocated")
            i = bisect.bisect_left(self._free, (gpa, 0))
            self._free.insert(i, (gpa, size))
            # Merge with the neighbours, but never across the hole between banks.
            if i + 1 < len(self._free):
                s, n = self._free[i]
                s2, n2 = self._free[i + 1]
                if s + n == s2:
                    self._free[i : i + 2] = [(s, n + n2)]
            if i > 0:
                s0, n0 = self._free[i - 1]
                s, n = self._free[i]
                if s0 + n0 == s:
                    self._free[i - 1 : i + 1] = [(s0, n0 + n)]

    def allocated_bytes(self) -> int:
        with self._lock:
            return sum(self._allocated.values())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._mem.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still exported somewhere; the mapping goes with it
        os.close(self.fd)
