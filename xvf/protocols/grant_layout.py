"""Grant-mode memory for a backend that maps grants itself (vhost-user Xen mmap).

A guest using Linux's grant DMA ops puts grant addresses in its rings and
descriptors: bit 63 set, then (first grant ref << 12) + offset. A Xen-aware
backend (rust-vmm built with `xen`) maps them through /dev/xen/gntdev when each
region is described with XEN_MMAP_GRANT and the guest's domid. The rings are
mapped in advance; the rest of the grant space, as large as the guest's RAM,
is mapped on demand (XEN_MMAP_MAP_ON_DEMAND), as the seed xen-vhost-frontend
describes it. Region addresses double as the frontend addresses
(userspace_addr == guest_phys_addr), so SET_VRING_ADDR takes the ring's grant
addresses as they are.
"""

from __future__ import annotations

from xvf.errors import ConfigError
from xvf.protocols.vhost_user_wire import XEN_MMAP_GRANT, XEN_MMAP_MAP_ON_DEMAND, VhostUserRegion
from xvf.protocols.virtqueue import (
    GRANT_DMA_ADDR_OFF,
    PAGE_SIZE,
    align_up,
    avail_bytes,
    desc_bytes,
    used_bytes,
)


def ring_spans(desc: int, avail: int, used: int, num: int) -> list[tuple[int, int]]:
    """The three parts of a split ring, with room for used_event/avail_event."""
    return [(desc, desc_bytes(num)), (avail, avail_bytes(num)), (used, used_bytes(num))]


def grant_regions(
    rings: list[tuple[int, int]], guest_bytes: int, domid: int, fd: int
) -> list[VhostUserRegion]:
    """Regions covering the grant space [2**63, 2**63 + guest_bytes): each ring span
    mapped in advance, the gaps between them on demand."""
    if guest_bytes <= 0:
        raise ConfigError(f"guest of domain {domid} reports no memory")
    end = GRANT_DMA_ADDR_OFF + guest_bytes
    spans = sorted(rings)
    for addr, size in spans:
        if not GRANT_DMA_ADDR_OFF <= addr or addr + size > end or size <= 0:
            raise ConfigError(
                f"ring at {addr:#x} (+{size:#x}) is not a grant address inside the guest's "
                f"{guest_bytes >> 20} MiB; does the guest use grant DMA (xen,grant-dma)?"
            )
    regions: list[VhostUserRegion] = []

    def add(addr: int, size: int, flags: int) -> None:
        if size > 0:
            regions.append(
                VhostUserRegion(
                    gpa=addr,
                    size=size,
                    uva=addr,
                    fd=fd,
                    fd_offset=0,
                    xen_mmap_flags=flags,
                    domid=domid,
                )
            )

    cursor = GRANT_DMA_ADDR_OFF
    for addr, size in spans:
        # Rings that share a page, or start on the page right after the previous one
        # (Linux allocates a queue's desc, avail and used in one block), extend the
        # previous region: SET_MEM_TABLE carries at most 8 regions.
        if regions and regions[-1].xen_mmap_flags == XEN_MMAP_GRANT and addr <= cursor:
            last = regions[-1]
            grown = max(last.gpa + last.size, addr + size) - last.gpa
            regions[-1] = VhostUserRegion(
                gpa=last.gpa,
                size=grown,
                uva=last.uva,
                fd=fd,
                fd_offset=0,
                xen_mmap_flags=last.xen_mmap_flags,
                domid=domid,
            )
        else:
            add(cursor, addr - cursor, XEN_MMAP_GRANT | XEN_MMAP_MAP_ON_DEMAND)
            add(addr, size, XEN_MMAP_GRANT)
        cursor = max(cursor, align_up(addr + size, PAGE_SIZE))
    add(cursor, end - cursor, XEN_MMAP_GRANT | XEN_MMAP_MAP_ON_DEMAND)
    return regions
