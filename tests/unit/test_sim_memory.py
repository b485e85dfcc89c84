"""Guest RAM, grant table v1 and the guest's DMA ops (direct and Xen grant DMA)."""

from __future__ import annotations

import errno
import os
import re
import threading

import pytest

from xvf.errors import GrantError, SimulatorError
from xvf.hotpath._layout import PAGE_SIZE
from xvf.platform.sim import grant_table as G
from xvf.platform.sim import memory as M
from xvf.platform.sim.dma import DirectDma, GrantDma, dma_to_grant, grant_to_dma
from xvf.platform.sim.grant_table import GrantTable
from xvf.platform.sim.memory import GUEST_RAM0_BASE, GUEST_RAM1_BASE, GuestRam
from xvf.protocols.virtqueue import GRANT_DMA_ADDR_OFF
from xvf.protocols.virtqueue import PAGE_SIZE as PAGE

MIB = 1 << 20
XEN_INCLUDE = "/usr/include/xen"


def _header_define(path: str, name: str) -> int:
    with open(path) as f:
        text = f.read()
    m = re.search(rf"#define\s+{name}\s+(.+)", text)
    assert m, f"{name} not in {path}"
    expr = m.group(1).split("/*")[0].strip()
    expr = re.sub(r"xen_mk_ullong\((\w+)\)", r"\1", expr)
    expr = re.sub(r"(\d)[uU][lL]*\b", r"\1", expr)
    # Defines built from other defines (GTF_readonly is 1U<<_GTF_readonly).
    expr = re.sub(
        r"\b[A-Za-z_]\w*\b",
        lambda n: (
            str(_header_define(path, n.group(0))) if not n.group(0).startswith("0x") else n.group(0)
        ),
        expr,
    )
    return int(eval(expr, {}, {}))  # constant expressions from a trusted system header


@pytest.fixture
def ram():
    r = GuestRam(8 * MIB, bank0_size=4 * MIB)
    yield r
    r.close()


# -- RAM layout -----------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists(f"{XEN_INCLUDE}/arch-arm.h"), reason="libxen-dev missing")
def test_bank_constants_match_xen_arch_arm_header():
    h = f"{XEN_INCLUDE}/arch-arm.h"
    assert _header_define(h, "GUEST_RAM0_BASE") == M.GUEST_RAM0_BASE
    assert _header_define(h, "GUEST_RAM0_SIZE") == M.GUEST_RAM0_SIZE
    assert _header_define(h, "GUEST_RAM1_BASE") == M.GUEST_RAM1_BASE
    assert _header_define(h, "GUEST_RAM1_SIZE") == M.GUEST_RAM1_SIZE


def test_small_guest_has_one_bank():
    r = GuestRam(2 * MIB)
    try:
        assert [(x.gpa, x.size, x.fd_offset) for x in r.regions] == [(GUEST_RAM0_BASE, 2 * MIB, 0)]
        assert os.fstat(r.fd).st_size == 2 * MIB
    finally:
        r.close()


def test_two_banks_share_one_memfd(ram):
    assert [(x.gpa, x.size, x.fd_offset) for x in ram.regions] == [
        (GUEST_RAM0_BASE, 4 * MIB, 0),
        (GUEST_RAM1_BASE, 4 * MIB, 4 * MIB),
    ]
    ram.write(GUEST_RAM0_BASE + 10, b"bank0")
    ram.write(GUEST_RAM1_BASE + 20, b"bank1")
    # What a backend mapping the fd sees.
    assert os.pread(ram.fd, 5, 10) == b"bank0"
    assert os.pread(ram.fd, 5, 4 * MIB + 20) == b"bank1"
    assert ram.gpa_to_offset(GUEST_RAM1_BASE + 20) == 4 * MIB + 20
    assert ram.read(GUEST_RAM1_BASE + 20, 5) == b"bank1"


def test_memfd_is_cloexec(ram):
    import fcntl

    assert fcntl.fcntl(ram.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


@pytest.mark.parametrize(
    "gpa,length",
    [
        (GUEST_RAM0_BASE - 1, 1),  # below RAM
        (GUEST_RAM0_BASE + 4 * MIB, 1),  # in the hole
        (GUEST_RAM0_BASE + 4 * MIB - 2, 4),  # crosses from bank 0 into the hole
        (GUEST_RAM1_BASE + 4 * MIB - 1, 2),  # past the end of bank 1
        (0x3FFFFFFF, 2),  # straddles the start of RAM
    ],
)
def test_accesses_outside_ram_are_refused(ram, gpa, length):
    with pytest.raises(SimulatorError):
        ram.view(gpa, length)
    assert not ram.contains(gpa, length)


def test_view_is_writable_and_shared(ram):
    v = ram.view(GUEST_RAM0_BASE + PAGE, 4)
    v.cast("H")[1] = 0xBEEF
    assert ram.read(GUEST_RAM0_BASE + PAGE + 2, 2) == b"\xef\xbe"


def test_bad_sizes_rejected():
    with pytest.raises(SimulatorError):
        GuestRam(1000)
    with pytest.raises(SimulatorError):
        GuestRam(8 * MIB, bank0_size=M.GUEST_RAM0_SIZE + PAGE)


# -- page allocator ----------------------------------------------------------------


def test_alloc_is_first_fit_zeroed_and_page_granular(ram):
    a = ram.alloc(1)
    b = ram.alloc(PAGE + 1)
    assert a == GUEST_RAM0_BASE
    assert b == a + PAGE
    ram.write(a, b"x" * 10)
    ram.free(a)
    c = ram.alloc(100)
    assert c == a  # the freed first page is reused
    assert ram.read(c, 10) == bytes(10)  # and zeroed again
    assert ram.allocated_bytes() == 3 * PAGE


def test_alloc_alignment(ram):
    ram.alloc(PAGE)
    g = ram.alloc(PAGE, align=64 * 1024)
    assert g % (64 * 1024) == 0


def test_alloc_spills_into_bank1_and_never_spans_the_hole(ram):
    big = ram.alloc(3 * MIB)
    assert big == GUEST_RAM0_BASE
    # 1 MiB left in bank 0 cannot hold 2 MiB: the allocator goes to bank 1.
    g = ram.alloc(2 * MIB)
    assert g == GUEST_RAM1_BASE
    with pytest.raises(SimulatorError, match="exhausted"):
        ram.alloc(3 * MIB)


def test_free_merges_neighbours(ram):
    pages = [ram.alloc(PAGE) for _ in range(4)]
    for p in (pages[1], pages[3], pages[2], pages[0]):
        ram.free(p)
    # All of bank 0 is one span again: a bank-sized allocation fits.
    assert ram.alloc(4 * MIB) == GUEST_RAM0_BASE


def test_double_free_refused(ram):
    g = ram.alloc(PAGE)
    ram.free(g)
    with pytest.raises(SimulatorError, match="not allocated"):
        ram.free(g)


def test_allocator_is_thread_safe(ram):
    got: list[int] = []
    lock = threading.Lock()

    def worker():
        mine = [ram.alloc(PAGE) for _ in range(100)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 400


# -- grant table ---------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists(f"{XEN_INCLUDE}/grant_table.h"), reason="libxen-dev missing")
def test_grant_constants_match_xen_header():
    h = f"{XEN_INCLUDE}/grant_table.h"
    assert _header_define(h, "GTF_permit_access") == G.GTF_PERMIT_ACCESS
    assert _header_define(h, "GTF_readonly") == G.GTF_READONLY
    assert _header_define(h, "GTF_reading") == G.GTF_READING
    assert _header_define(h, "GTF_writing") == G.GTF_WRITING
    assert _header_define(h, "GNTTAB_NR_RESERVED_ENTRIES") == G.GNTTAB_NR_RESERVED_ENTRIES


def test_grant_constants_match_xvf_header():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "include", "xvf", "xen_grant.h")
    assert _header_define(path, "XVF_GTF_permit_access") == G.GTF_PERMIT_ACCESS
    assert _header_define(path, "XVF_GTF_readonly") == G.GTF_READONLY
    assert _header_define(path, "XVF_GTF_reading") == G.GTF_READING
    assert _header_define(path, "XVF_GTF_writing") == G.GTF_WRITING


def test_entries_have_v1_layout_in_the_memfd():
    gt = GrantTable(64)
    try:
        ref = gt.alloc_refs(1)
        gt.grant_access(ref, 7, 0x12345, readonly=True)
        raw = os.pread(gt.fd, 8, ref * 8)
        assert raw == (5).to_bytes(2, "little") + (7).to_bytes(2, "little") + (0x12345).to_bytes(
            4, "little"
        )
    finally:
        gt.close()


def test_reserved_refs_are_never_handed_out():
    gt = GrantTable(16)
    try:
        first = gt.alloc_refs(8)
        assert first == G.GNTTAB_NR_RESERVED_ENTRIES
        with pytest.raises(GrantError) as ei:
            gt.alloc_refs(1)
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(GrantError, match="reserved"):
            gt.free_refs(0, 1)
    finally:
        gt.close()


def test_alloc_refs_are_consecutive_and_recycled():
    gt = GrantTable(32)
    try:
        a = gt.alloc_refs(10)  # 8..17
        b = gt.alloc_refs(10)  # 18..27
        assert (a, b) == (8, 18)
        gt.free_refs(a, 10)
        # 4 free at the end, 10 at the start: a run of 6 wraps round to the start.
        c = gt.alloc_refs(6)
        assert c == 8
        with pytest.raises(GrantError, match="consecutive"):
            gt.alloc_refs(5)  # 4 free at 14..17 and 4 at 28..31, never 5 in a row
        with pytest.raises(GrantError, match="twice"):
            gt.free_refs(a + 6, 1)
    finally:
        gt.close()


@pytest.fixture
def gt():
    t = GrantTable(64)
    yield t
    t.close()


def test_lookup_returns_the_granted_frame(gt):
    ref = gt.alloc_refs(1)
    gt.grant_access(ref, 0, 0x40123, readonly=False)
    assert gt.lookup(ref, 0, writable=True) == 0x40123


def test_lookup_refuses_bad_ref(gt):
    with pytest.raises(GrantError, match="bad grant ref") as ei:
        gt.lookup(64, 0, False)
    assert ei.value.errno == errno.EINVAL


def test_lookup_refuses_ungranted_and_revoked(gt):
    ref = gt.alloc_refs(1)
    with pytest.raises(GrantError, match="not granted"):
        gt.lookup(ref, 0, False)
    gt.grant_access(ref, 0, 0x40000, readonly=False)
    assert gt.end_access(ref)
    with pytest.raises(GrantError, match="not granted"):
        gt.lookup(ref, 0, False)


def test_lookup_refuses_other_domain(gt):
    ref = gt.alloc_refs(1)
    gt.grant_access(ref, 3, 0x40000, readonly=False)
    with pytest.raises(GrantError, match="granted to domain 3, not 0") as ei:
        gt.lookup(ref, 0, False)
    assert ei.value.errno == errno.EPERM


def test_lookup_refuses_writable_map_of_readonly_grant(gt):
    ref = gt.alloc_refs(1)
    gt.grant_access(ref, 0, 0x40000, readonly=True)
    assert gt.lookup(ref, 0, writable=False) == 0x40000
    with pytest.raises(GrantError, match="read-only"):
        gt.lookup(ref, 0, writable=True)


def test_end_access_fails_while_mapped(gt):
    ref = gt.alloc_refs(1)
    gt.grant_access(ref, 0, 0x40000, readonly=False)
    gt.mark_mapped(ref, writable=True)
    assert gt.flags(ref) & (G.GTF_READING | G.GTF_WRITING) == G.GTF_READING | G.GTF_WRITING
    assert not gt.end_access(ref)
    with pytest.raises(GrantError, match="while mapped"):
        gt.free_refs(ref, 1)
    gt.mark_unmapped(ref)
    assert gt.flags(ref) == G.GTF_PERMIT_ACCESS
    assert gt.end_access(ref)
    gt.free_refs(ref, 1)


def test_mapping_pins_are_counted(gt):
    ref = gt.alloc_refs(1)
    gt.grant_access(ref, 0, 0x40000, readonly=False)
    gt.mark_mapped(ref, writable=False)
    gt.mark_mapped(ref, writable=True)
    gt.mark_unmapped(ref)  # drops the read-only pin first: still writing
    assert gt.flags(ref) & G.GTF_WRITING
    gt.mark_unmapped(ref)
    assert not gt.flags(ref) & (G.GTF_READING | G.GTF_WRITING)
    with pytest.raises(GrantError, match="not mapped"):
        gt.mark_unmapped(ref)


def test_map_after_revocation_is_refused(gt):
    ref = gt.alloc_refs(1)
    gt.grant_access(ref, 0, 0x40000, readonly=True)
    assert gt.map_ref(ref, 0, writable=False) == 0x40000
    gt.mark_unmapped(ref)
    gt.end_access(ref)
    with pytest.raises(GrantError, match="revoked"):
        gt.mark_mapped(ref, writable=False)


# -- DMA ops -------------------------------------------------------------------------


def test_grant_dma_address_encoding():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "include", "xvf", "xen_grant.h")
    assert _header_define(path, "XVF_GRANT_DMA_ADDR_OFF") == GRANT_DMA_ADDR_OFF == 1 << 63
    assert grant_to_dma(0x123) == 0x8000000000123000
    assert dma_to_grant(0x8000000000123ABC) == 0x123


def test_direct_dma_is_identity(ram):
    dma = DirectDma(ram)
    assert not dma.uses_grants
    gpa, addr = dma.alloc_coherent(100)
    assert addr == gpa
    assert dma.map(gpa + 5, 10, device_writes=True) == gpa + 5
    with pytest.raises(SimulatorError):
        dma.map(GUEST_RAM0_BASE + 4 * MIB, 16, device_writes=False)
    dma.free_coherent(gpa, 100, addr)


def test_grant_dma_map_covers_every_page_with_consecutive_refs(ram, gt):
    dma = GrantDma(ram, gt, backend_domid=0)
    buf = ram.alloc(3 * PAGE)
    # 0x800 into the first page, 2 pages long: touches 3 pages.
    addr = dma.map(buf + 0x800, 2 * PAGE, device_writes=False)
    assert addr & GRANT_DMA_ADDR_OFF
    assert addr & 0xFFF == 0x800
    first = dma_to_grant(addr)
    for i in range(3):
        flags, domid, frame = gt.entry(first + i)
        assert frame == (buf >> 12) + i
        assert domid == 0
        assert flags == G.GTF_PERMIT_ACCESS | G.GTF_READONLY  # the device only reads
    with pytest.raises(GrantError):
        gt.lookup(first + 3, 0, False)  # nothing beyond the buffer is granted
    dma.unmap(addr, 2 * PAGE)
    for i in range(3):
        assert gt.entry(first + i)[0] == 0
    assert dma.outstanding() == 0


def test_grant_dma_device_writable_buffers(ram, gt):
    dma = GrantDma(ram, gt, backend_domid=5)
    buf = ram.alloc(PAGE)
    addr = dma.map(buf + 16, 1, device_writes=True)
    ref = dma_to_grant(addr)
    assert gt.lookup(ref, 5, writable=True) == buf >> 12
    dma.unmap(addr, 1)


def test_grant_dma_coherent_alloc_is_writable_and_grant_addressed(ram, gt):
    dma = GrantDma(ram, gt)
    gpa, addr = dma.alloc_coherent(2 * PAGE + 1)
    first = dma_to_grant(addr)
    assert addr & 0xFFF == 0
    assert [gt.entry(first + i)[2] for i in range(3)] == [(gpa >> 12) + i for i in range(3)]
    assert gt.lookup(first + 2, 0, writable=True) == (gpa >> 12) + 2
    free_before = gt.free_count()
    dma.free_coherent(gpa, 2 * PAGE + 1, addr)
    assert gt.free_count() == free_before + 3


def test_grant_dma_buffers_in_bank1(ram, gt):
    dma = GrantDma(ram, gt)
    ram.alloc(4 * MIB)  # fill bank 0
    buf = ram.alloc(PAGE)
    addr = dma.map(buf, PAGE, device_writes=False)
    assert gt.entry(dma_to_grant(addr))[2] == GUEST_RAM1_BASE >> 12
    dma.unmap(addr, PAGE)


def test_grant_dma_breaks_when_backend_keeps_a_mapping(ram, gt):
    dma = GrantDma(ram, gt)
    buf = ram.alloc(PAGE)
    addr = dma.map(buf, 64, device_writes=True)
    ref = dma_to_grant(addr)
    gt.mark_mapped(ref, writable=True)  # the backend still maps it
    dma.unmap(addr, 64)
    assert dma.broken
    # The ref is leaked, not recycled under the backend's feet.
    assert gt.entry(ref)[0] & G.GTF_PERMIT_ACCESS
    with pytest.raises(GrantError, match="disabled"):
        dma.map(buf, 64, device_writes=True)


@pytest.mark.parametrize(
    "pages",
    [[0], [3, 4, 5, 6], [5, 1, 2, 3, 9], [7, 6, 5], [2, 2, 3], [0, 1, 8, 9, 4]],
    ids=["one", "one-run", "runs-and-gaps", "backwards", "repeated", "mixed"],
)
def test_map_file_pages_puts_each_page_where_its_offset_says(pages) -> None:
    """The simulator's gntdev mapping (xvf.hotpath._gnttab.map_file_pages): one mmap
    per run of consecutive pages, the pages in the order asked, writes reaching the file."""
    from xvf.hotpath._gnttab import map_file_pages

    fd = os.memfd_create("xvf-test-pages", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 16 * PAGE_SIZE)
        for p in range(16):
            os.pwrite(fd, bytes([p]) * PAGE_SIZE, p * PAGE_SIZE)
        m = map_file_pages(fd, [p * PAGE_SIZE for p in pages], True)
        with memoryview(m) as view:
            assert [view[i * PAGE_SIZE] for i in range(len(pages))] == pages
            assert all(view[i * PAGE_SIZE + PAGE_SIZE - 1] == p for i, p in enumerate(pages))
            view[len(pages) * PAGE_SIZE - 1] = 0xEE  # the last page, through the mapping
        m.close()
        assert os.pread(fd, 1, pages[-1] * PAGE_SIZE + PAGE_SIZE - 1) == b"\xee"
    finally:
        os.close(fd)
