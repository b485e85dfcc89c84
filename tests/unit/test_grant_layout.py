"""How grant-mode memory is described to a Xen-aware backend."""

from __future__ import annotations

import itertools

import pytest

from xvf.errors import ConfigError
from xvf.protocols.grant_layout import grant_regions, ring_spans
from xvf.protocols.vhost_user_wire import XEN_MMAP_GRANT, XEN_MMAP_MAP_ON_DEMAND
from xvf.protocols.virtqueue import GRANT_DMA_ADDR_OFF, PAGE_SIZE, align_up, ring_layout

G = GRANT_DMA_ADDR_OFF
MIB = 1 << 20
ON_DEMAND = XEN_MMAP_GRANT | XEN_MMAP_MAP_ON_DEMAND


def covered(regions) -> list[tuple[int, int]]:
    return [(r.gpa, r.gpa + r.size) for r in regions]


def test_one_queue_in_its_own_pages():
    rings = ring_spans(G + 0x10000, G + 0x11000, G + 0x13000, 256)
    regions = grant_regions(rings, 64 * MIB, domid=3, fd=9)
    # desc fills its page exactly, so avail follows it without a gap: one region for both
    assert [r.xen_mmap_flags for r in regions] == [
        ON_DEMAND,
        XEN_MMAP_GRANT,
        ON_DEMAND,
        XEN_MMAP_GRANT,
        ON_DEMAND,
    ]
    assert regions[0].gpa == G and regions[-1].gpa + regions[-1].size == G + 64 * MIB
    assert (regions[1].gpa, regions[1].size) == (G + 0x10000, 16 * 256 + 6 + 2 * 256)
    # uva mirrors the grant address so SET_VRING_ADDR can pass the ring addresses through
    assert all(r.uva == r.gpa and r.domid == 3 and r.fd == 9 and r.fd_offset == 0 for r in regions)
    spans = covered(regions)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlap


def test_rings_sharing_pages_become_one_region():
    # Linux allocates desc, avail and used of a small queue in one coherent block
    rings = ring_spans(G + 0x3000, G + 0x3000 + 16 * 64, G + 0x4000, 64)
    regions = grant_regions(rings, 16 * MIB, domid=1, fd=5)
    advance = [r for r in regions if r.xen_mmap_flags == XEN_MMAP_GRANT]
    # desc and avail share a page and used starts on the next one: one region
    assert len(advance) == 1
    assert advance[0].gpa == G + 0x3000 and advance[0].size == 0x1000 + 6 + 8 * 64
    spans = covered(regions)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("addr", [0x40000000, G - 4096, G + 64 * MIB])
def test_addresses_that_are_not_grants_are_refused(addr):
    with pytest.raises(ConfigError, match="grant DMA"):
        grant_regions(ring_spans(addr, addr + 0x1000, addr + 0x2000, 8), 64 * MIB, 1, 5)


def test_guest_without_memory_is_refused():
    with pytest.raises(ConfigError, match="no memory"):
        grant_regions([], 0, 1, 5)


def test_four_queues_laid_out_like_linux_fit_one_mem_table():
    """Linux allocates each split ring (desc, avail, used) as one block of consecutive
    grants: spans that merely touch are one region, so a 4-queue device (sound, console)
    stays within SET_MEM_TABLE's 8 regions when its rings follow each other."""
    rings, base = [], G + 0x20000
    for _ in range(4):
        num = 64
        avail_off, used_off, total = ring_layout(num)
        rings += ring_spans(base, base + avail_off, base + used_off, num)
        base = align_up(base + total, PAGE_SIZE)
    regions = grant_regions(rings, 64 * MIB, domid=2, fd=7)
    assert [r.xen_mmap_flags for r in regions] == [ON_DEMAND, XEN_MMAP_GRANT, ON_DEMAND]
    assert len(regions) <= 8
    spans = covered(regions)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
