"""Guest memory as a backend sees it: the regions of SET_MEM_TABLE, mmapped from the passed fds.

Guest-physical addresses (descriptor addresses) and front-end virtual addresses (SET_VRING_ADDR)
are both translated through the region table; anything not wholly inside one region is refused.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
from dataclasses import dataclass

from xvf.errors import GuestError, VhostUserError

log = logging.getLogger(__name__)

# Xen mmap description flags (rust-vmm vm-memory MmapXenFlags; QEMU's spec text differs for the
# "no advance map" bit, rust-vmm is what the real backends run, so its value is used).
XEN_MMAP_UNIX = 0x0
XEN_MMAP_FOREIGN = 0x1
XEN_MMAP_GRANT = 0x2
XEN_MMAP_NO_ADVANCE_MAP = 0x8
_XEN_MMAP_KNOWN = XEN_MMAP_FOREIGN | XEN_MMAP_GRANT | XEN_MMAP_NO_ADVANCE_MAP


class GuestMemoryError(GuestError):
    """A guest address range is not (wholly) inside the mapped guest memory."""


def check_xen_mmap(flags: int, domid: int) -> None:
    """The one place that decides whether a region with a Xen mmap description can be mapped here.

    rust-vmm accepts: UNIX (0: plain mmap of the fd), FOREIGN without NO_ADVANCE_MAP (privcmd
    foreign mapping of the whole region) and GRANT with or without NO_ADVANCE_MAP (gntdev). This
    process cannot do privcmd or gntdev mappings, so only UNIX (plain fd semantics) is mapped;
    valid Xen mappings are refused as unsupported and invalid combinations as invalid.
    """
    if flags & ~_XEN_MMAP_KNOWN:
        raise VhostUserError(f"xen mmap flags {flags:#x}: unknown bits")
    foreign, grant = bool(flags & XEN_MMAP_FOREIGN), bool(flags & XEN_MMAP_GRANT)
    in_advance = not flags & XEN_MMAP_NO_ADVANCE_MAP
    if flags == XEN_MMAP_UNIX:
        return
    if grant and not foreign:
        what = "grant mapping (gntdev)"
    elif foreign and not grant and in_advance:
        what = "foreign mapping (privcmd)"
    else:
        raise VhostUserError(f"xen mmap flags {flags:#x}: invalid combination")
    raise VhostUserError(
        f"xen mmap flags {flags:#x} ask for a {what} of domain {domid}; this reference backend "
        "can only map plain fds (flags 0)"
    )


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    offset: int
    map: mmap.mmap
    view: memoryview  # the guest-visible part: map[offset:offset + size]

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            # A slice handed out earlier is still alive; the mapping goes when it does.
            pass


def map_region(fd: int, gpa: int, size: int, uva: int, offset: int) -> Region:
    """mmap `fd` from file offset 0 for offset + size bytes (offsets need no page alignment)."""
    if size == 0:
        raise VhostUserError("memory region of size 0")
    for name, value in (("guest_phys_addr", gpa), ("userspace_addr", uva), ("mmap_offset", offset)):
        if value + size > 1 << 64:
            raise VhostUserError(f"memory region {name} {value:#x} + size {size:#x} overflows")
    st = os.fstat(fd)
    # A file shorter than the mapping would SIGBUS this process on first touch.
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
        raise VhostUserError(
            f"memory region fd is {st.st_size:#x} bytes, region needs {offset + size:#x}"
        )
    try:
        m = mmap.mmap(
            fd, offset + size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    except (OSError, ValueError, OverflowError) as e:
        raise VhostUserError(f"cannot mmap memory region: {e}") from e
    view = memoryview(m)[offset : offset + size]
    return Region(gpa, size, uva, offset, m, view)


class GuestMemory:
    """The current memory table. Replaced wholesale by each SET_MEM_TABLE."""

    def __init__(self, regions: list[Region] | None = None) -> None:
        self.regions = sorted(regions or [], key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.gpa + a.size > b.gpa:
                raise VhostUserError(f"memory regions at {a.gpa:#x} and {b.gpa:#x} overlap")

    def __bool__(self) -> bool:
        return bool(self.regions)

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []

    def slice(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest-physical [gpa, gpa + length), which must lie in one region."""
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} overflows")
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size or (length == 0 and gpa == r.gpa + r.size):
                start = gpa - r.gpa
                if start + length > r.size:
                    raise GuestMemoryError(
                        f"guest range {gpa:#x}+{length:#x} runs past the region ending at "
                        f"{r.gpa + r.size:#x}"
                    )
                return r.view[start : start + length]
        raise GuestMemoryError(f"guest address {gpa:#x} is outside guest memory")

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.slice(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.slice(gpa, len(data))[:] = data

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Front-end virtual address (SET_VRING_ADDR) to guest-physical, range checked."""
        for r in self.regions:
            if r.uva <= uva < r.uva + r.size:
                if uva - r.uva + length > r.size:
                    raise GuestMemoryError(f"ring at uva {uva:#x}+{length:#x} runs past its region")
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError(f"front-end address {uva:#x} is in no memory region")
