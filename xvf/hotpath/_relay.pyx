# cython: language_level=3
"""The shadow-virtqueue relay's rings and copies, in C (xvf.protocols.grant_relay
says what the relay is and does; this module is how).

Per request nothing here builds a Python object: the chain is walked and checked
into C arrays, the shadow descriptors and bounce space are taken from C tables, and
the guest's and the shadow's ring words are read and written through pointers with
the fences the split ring needs (aarch64 included). The data moves by grant copy
(Xen's GNTTABOP_copy through gntdev, as QEMU's xen-block does): the segments of a
batch of requests into bounce buffers in one call, the device-written segments of a
batch of completions back in one call; nothing but the rings is ever mapped.
The copy call is C too (a GrantCopier: gntdev's ioctl on Xen, a message to the
software Xen here), made with the GIL released. Python remains in the ring mapping at
start and in the rate-limited logs.

Layout: every ring field is little-endian (virtio 1.x); the hosts xvf runs on
(aarch64, x86-64) are little-endian, so the C structs of include/xvf/virtio_ring.h
are the rings as they lie in memory.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memmove, memset

from xvf.hotpath._gnttab cimport GrantCopier, GrantMapping
from xvf.hotpath._grow cimport regrow
from xvf.hotpath._ioreq cimport MmioState
from xvf.hotpath.includes.barrier cimport (
    xvf_acquire, xvf_full, xvf_load_u16, xvf_release, xvf_store_u16,
)
from xvf.hotpath.includes.linux_xen cimport xvf_gntdev_grant_copy_segment_t
from xvf.hotpath.includes.system cimport read, write
from xvf.hotpath.includes.virtio_ring cimport (
    XVF_VRING_AVAIL_ALIGN, XVF_VRING_AVAIL_BYTES, XVF_VRING_DESC_ALIGN, XVF_VRING_DESC_BYTES,
    XVF_VRING_DESC_F_INDIRECT, XVF_VRING_DESC_F_NEXT, XVF_VRING_DESC_F_WRITE, XVF_VRING_MAX_SIZE,
    XVF_VRING_USED_ALIGN, XVF_VRING_USED_BYTES, xvf_vring_avail_t, xvf_vring_desc_t,
    xvf_vring_used_t,
)
from xvf.hotpath.includes.xen_grant cimport (
    XVF_GNTCOPY_dest_gref, XVF_GNTCOPY_source_gref, XVF_GNTST_bad_copy_arg,
    XVF_GNTST_bad_domain, XVF_GNTST_bad_gntref, XVF_GNTST_general_error, XVF_GNTST_okay,
    XVF_GNTST_permission_denied, XVF_GRANT_DMA_ADDR_OFF, XVF_XEN_PAGE_SHIFT,
)

import ctypes
import logging
import mmap
import os

from xvf.errors import GrantError, GuestError, RelayError, XvfError
from xvf.ratelimit import RateLimitedLog

log = logging.getLogger("xvf.protocols.grant_relay")

cdef enum:
    SHADOW_ALIGN = 64   # bounce buffers and small shadow allocations
    MAX_REFS = 4096     # gntdev / the simulator refuse more in one map
    # Requests one kick copies in together (with QD32 and EVENT_IDX a kick usually
    # finds many): one grant copy call for all of their segments.
    BATCH = 64

cdef size_t DESC_SIZE_C = sizeof(xvf_vring_desc_t)
cdef uint64_t PAGE_SIZE_C = (<uint64_t>1) << XVF_XEN_PAGE_SHIFT  # Xen's page

MAX_REFS_PER_MAP = MAX_REFS
MAX_BATCH = BATCH
DEFAULT_SHADOW_SIZE = 64 << 20
PAGE_SIZE = PAGE_SIZE_C

cdef uint64_t GRANT_BIT = XVF_GRANT_DMA_ADDR_OFF


cdef inline uint64_t _round(uint64_t n, uint64_t align) noexcept nogil:
    return (n + align - 1) // align * align


cdef int _span(uint64_t addr, uint64_t length, uint64_t *first, uint32_t *count,
               uint32_t *offset) except -1:
    """The grant refs a grant DMA address range covers: first, count, offset in page."""
    cdef uint64_t raw, n
    if not addr & GRANT_BIT:
        raise RelayError(f"address {addr:#x} is not a grant address (bit 63 clear)")
    if length == 0:
        raise RelayError(f"grant range of length {length}")
    raw = addr & ~GRANT_BIT
    offset[0] = <uint32_t>(raw & (PAGE_SIZE_C - 1))
    first[0] = raw >> XVF_XEN_PAGE_SHIFT
    n = (offset[0] + length + PAGE_SIZE_C - 1) >> XVF_XEN_PAGE_SHIFT
    if n > MAX_REFS or first[0] + n > (<uint64_t>1 << 32):
        raise RelayError(f"grant range {addr:#x}+{length:#x} is too large or out of range")
    count[0] = <uint32_t>n
    return 0


def grant_span(uint64_t addr, int64_t length) -> tuple:
    """The grant refs a grant DMA address range covers and its offset in the first page."""
    cdef uint64_t first
    cdef uint32_t count, offset
    if length <= 0:
        raise RelayError(f"grant range of length {length}")
    _span(addr, <uint64_t>length, &first, &count, &offset)
    return list(range(first, first + count)), offset


_GNTST_NAMES = {
    XVF_GNTST_okay: "okay",
    XVF_GNTST_general_error: "general error",
    XVF_GNTST_bad_domain: "bad domain",
    XVF_GNTST_bad_gntref: "bad grant ref",
    XVF_GNTST_permission_denied: "permission denied",
    XVF_GNTST_bad_copy_arg: "bad copy argument",
}


def _gntst_name(int status) -> str:
    """A GNTTABOP_copy status as Xen's messages name it (public/grant_table.h)."""
    return f"GNTST {status}: {_GNTST_NAMES.get(status, 'error')}"


# -- shadow memory ----------------------------------------------------------------
cdef class ShadowMemory:
    """One memfd owned by xvf: the only memory region the backend sees (gpa 0..size).

    A first-fit allocator hands out shadow rings and bounce buffers; the first
    page is never handed out so no shadow address is 0."""

    ALIGN = SHADOW_ALIGN

    cdef readonly uint64_t size
    cdef readonly uint64_t capacity
    cdef readonly uint64_t uva
    cdef readonly int fd
    cdef readonly object mem
    # Queues stalled for lack of space; retried whenever space is freed.
    cdef public list waiters
    cdef object _mmap
    cdef char *base
    # free extents, sorted by offset
    cdef uint64_t *free_off
    cdef uint64_t *free_len
    cdef uint32_t nfree
    cdef uint32_t free_cap
    cdef dict _used  # what alloc() (the Python callers) handed out: offset -> length

    def __cinit__(self):
        self.fd = -1

    def __init__(self, uint64_t size=DEFAULT_SHADOW_SIZE):
        if size < 2 * PAGE_SIZE_C or size % PAGE_SIZE_C:
            raise XvfError(f"shadow memory size {size:#x} must be pages, at least two")
        self.size = size
        self.fd = os.memfd_create("xvf-shadow", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mmap = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            self.fd = -1
            raise
        self.uva = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        self.base = <char *><size_t>self.uva
        self.mem = memoryview(self._mmap)
        self.free_cap = 16
        self.free_off = <uint64_t *>calloc(self.free_cap, sizeof(uint64_t))
        self.free_len = <uint64_t *>calloc(self.free_cap, sizeof(uint64_t))
        if self.free_off == NULL or self.free_len == NULL:
            raise MemoryError()
        self.free_off[0] = PAGE_SIZE_C
        self.free_len[0] = size - PAGE_SIZE_C
        self.nfree = 1
        self.capacity = size - PAGE_SIZE_C
        self.waiters = []
        self._used = {}

    def __dealloc__(self):
        free(self.free_off)
        free(self.free_len)

    cdef int _room(self) except -1:
        """Room for two more extents (an alloc splits one into two)."""
        cdef uint32_t n
        if self.nfree + 2 <= self.free_cap:
            return 0
        n = self.free_cap * 2
        if not (regrow(<void **>&self.free_off, n * sizeof(uint64_t))
                and regrow(<void **>&self.free_len, n * sizeof(uint64_t))):
            raise MemoryError()
        self.free_cap = n
        return 0

    cdef int64_t c_alloc(self, uint64_t length, uint64_t align) except -2:
        """Offset (== shadow gpa) of `length` free bytes rounded up to `align`, or -1."""
        cdef uint32_t i
        cdef uint64_t off, span, start, pad
        self._room()
        length = max(align, _round(length, align))
        for i in range(self.nfree):
            off = self.free_off[i]
            span = self.free_len[i]
            start = _round(off, align)
            pad = start - off
            if span < pad + length:
                continue
            if pad and span > pad + length:  # both ends stay free: one more extent
                memmove(&self.free_off[i + 2], &self.free_off[i + 1],
                        (self.nfree - i - 1) * sizeof(uint64_t))
                memmove(&self.free_len[i + 2], &self.free_len[i + 1],
                        (self.nfree - i - 1) * sizeof(uint64_t))
                self.free_len[i] = pad
                self.free_off[i + 1] = start + length
                self.free_len[i + 1] = span - pad - length
                self.nfree += 1
            elif pad:
                self.free_len[i] = pad
            elif span > length:
                self.free_off[i] = start + length
                self.free_len[i] = span - length
            else:  # taken whole
                memmove(&self.free_off[i], &self.free_off[i + 1],
                        (self.nfree - i - 1) * sizeof(uint64_t))
                memmove(&self.free_len[i], &self.free_len[i + 1],
                        (self.nfree - i - 1) * sizeof(uint64_t))
                self.nfree -= 1
            return <int64_t>start
        return -1

    cdef int c_free(self, uint64_t offset, uint64_t length) except -1:
        """Give back what c_alloc(length) returned at `offset`, merged with neighbours."""
        cdef uint32_t i = 0
        cdef bint left, right
        self._room()
        while i < self.nfree and self.free_off[i] < offset:
            i += 1
        left = i > 0 and self.free_off[i - 1] + self.free_len[i - 1] == offset
        right = i < self.nfree and offset + length == self.free_off[i]
        if left and right:
            self.free_len[i - 1] += length + self.free_len[i]
            memmove(&self.free_off[i], &self.free_off[i + 1],
                    (self.nfree - i - 1) * sizeof(uint64_t))
            memmove(&self.free_len[i], &self.free_len[i + 1],
                    (self.nfree - i - 1) * sizeof(uint64_t))
            self.nfree -= 1
        elif left:
            self.free_len[i - 1] += length
        elif right:
            self.free_off[i] = offset
            self.free_len[i] += length
        else:
            memmove(&self.free_off[i + 1], &self.free_off[i], (self.nfree - i) * sizeof(uint64_t))
            memmove(&self.free_len[i + 1], &self.free_len[i], (self.nfree - i) * sizeof(uint64_t))
            self.free_off[i] = offset
            self.free_len[i] = length
            self.nfree += 1
        return 0

    def alloc(self, uint64_t length, uint64_t align=SHADOW_ALIGN):
        """Offset (== shadow gpa) of `length` free bytes, or None when full."""
        cdef int64_t off = self.c_alloc(length, align)
        if off < 0:
            return None
        self._used[off] = max(align, _round(length, align))
        return off

    def free(self, uint64_t offset) -> None:
        self.c_free(offset, self._used.pop(offset))

    @property
    def free_extents(self) -> list:
        """(offset, length) of every free extent, in order (for tests and `status`)."""
        return [(self.free_off[i], self.free_len[i]) for i in range(self.nfree)]

    def wake_waiters(self) -> None:
        waiters, self.waiters = self.waiters, []
        for retry in waiters:
            retry()

    def close(self) -> None:
        if self.fd < 0:
            return
        self.mem.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still exported; the mapping goes with the process
        os.close(self.fd)
        self.fd = -1
        self.base = NULL


# -- one relayed queue --------------------------------------------------------------
cdef class GrantRelayQueue:
    """Relays one guest split virtqueue through a shadow ring in `shadow`.

    Each shadow descriptor carries one segment of a guest request (its guest
    address, length, direction, bounce offset, and for a device-writable segment
    where its guest bytes are mapped); a request is known by its shadow head."""

    cdef readonly uint32_t index
    cdef readonly uint32_t num
    cdef readonly str where
    cdef public object mapper
    cdef readonly ShadowMemory shadow
    cdef readonly MmioState state
    cdef readonly int backend_kick_fd
    cdef readonly int backend_call_fd
    cdef readonly int guest_kick_fd
    cdef readonly uint64_t bad_requests
    cdef readonly uint64_t relayed_requests
    cdef readonly uint64_t copied_bytes
    cdef readonly bint stalled
    cdef readonly bint stopped
    cdef readonly bint broken     # the guest or the backend broke a ring: nothing more is relayed
    cdef readonly bint quiesced   # a reset is stopping the ring: nothing more is posted
    cdef public object on_broken
    cdef bint _backend_lied       # its used ring can no longer be trusted
    cdef readonly uint16_t last_avail  # next guest avail slot to take
    cdef readonly uint64_t shadow_desc
    cdef readonly uint64_t shadow_avail
    cdef readonly uint64_t shadow_used
    cdef object _refusals
    cdef object _lies
    cdef list _ring_maps   # (GrantMapping, refs) of the guest's three ring parts
    cdef readonly uint16_t domid  # whose grants (the copies name it per segment)
    cdef readonly GrantCopier copier
    cdef int64_t _ring_base
    cdef uint16_t _guest_used_idx
    cdef uint16_t _shadow_avail_idx
    cdef uint16_t _shadow_last_used
    # the guest's rings and the shadow's, where they are mapped
    cdef xvf_vring_desc_t *gdesc
    cdef xvf_vring_avail_t *gavail
    cdef xvf_vring_used_t *gused
    cdef uint16_t *g_avail_event
    cdef xvf_vring_desc_t *sdesc
    cdef xvf_vring_avail_t *savail
    cdef xvf_vring_used_t *sused
    cdef uint16_t *s_used_event
    # per shadow descriptor
    cdef uint16_t *free_stack
    cdef uint32_t nfree
    cdef uint64_t *seg_addr
    cdef uint32_t *seg_len
    cdef uint8_t *seg_write
    cdef uint64_t *seg_bounce
    cdef uint16_t *seg_next
    # per request, at its shadow head
    cdef uint16_t *req_guest
    cdef uint16_t *req_nseg
    cdef uint64_t *req_bounce
    cdef uint64_t *req_bounce_len
    cdef uint8_t *req_live      # published to the backend, not yet completed
    cdef uint32_t inflight
    # the chain being walked
    cdef uint64_t *tmp_addr
    cdef uint32_t *tmp_len
    cdef uint8_t *tmp_write
    cdef uint16_t batch[BATCH]
    # grant copies of one call: each at most a page of the grant side, and whose
    # (batch index or completion index) it is
    cdef xvf_gntdev_grant_copy_segment_t *copies
    cdef uint32_t *copy_owner
    cdef uint32_t copies_cap
    # completions taken from the shadow used ring, copied back together
    cdef uint16_t *done_head
    cdef uint32_t *done_len
    cdef uint64_t scratch           # shadow offset an indirect table is copied to

    def __cinit__(self):
        self.guest_kick_fd = -1
        self._ring_base = -1

    def __init__(self, uint32_t index, uint32_t num, uint64_t desc, uint64_t avail,
                 uint64_t used, mapper, ShadowMemory shadow, MmioState state,
                 int kick_fd_to_backend, int call_fd_from_backend=-1, str label="",
                 on_broken=None):
        """`on_broken(why)`: the guest broke the ring itself (an avail index further
        ahead than the queue is long, a head outside it), or the backend its used ring
        (a used index further ahead than the requests in flight): the queue stops and
        the device is to be marked DEVICE_NEEDS_RESET, as QEMU's virtio_error does."""
        cdef uint32_t i
        if not 0 < num <= XVF_VRING_MAX_SIZE or num & (num - 1):
            raise GuestError(
                f"queue {index}: size {num} is not a power of two up to {XVF_VRING_MAX_SIZE}"
            )
        for name, addr, align in (("desc", desc, XVF_VRING_DESC_ALIGN),
                                  ("avail", avail, XVF_VRING_AVAIL_ALIGN),
                                  ("used", used, XVF_VRING_USED_ALIGN)):
            if addr % align:
                raise GuestError(f"queue {index}: {name} ring {addr:#x} is not {align}-aligned")
        self.index = index
        # who logs: domN/typeM queue I (the journal shows no other context)
        self.where = f"{label} queue {index}".strip()
        self.num = num
        self.mapper = mapper
        self.domid = mapper.domid
        self.shadow = shadow
        self.state = state
        self.backend_kick_fd = kick_fd_to_backend
        self.backend_call_fd = call_fd_from_backend  # drained by on_backend_call if >= 0
        self.on_broken = on_broken
        self._refusals = RateLimitedLog(log)
        self._lies = RateLimitedLog(log)
        self._ring_maps = []
        self._alloc_tables()
        # Grant copies go to and from the shadow memory (the software Xen must see it).
        self.copier = mapper.copier(shadow.uva, shadow.size)
        try:
            self.gdesc = <xvf_vring_desc_t *>self._map_ring(desc, XVF_VRING_DESC_BYTES(num), False)
            self.gavail = <xvf_vring_avail_t *>self._map_ring(
                avail, XVF_VRING_AVAIL_BYTES(num), False)
            self.gused = <xvf_vring_used_t *>self._map_ring(used, XVF_VRING_USED_BYTES(num), True)
            self.g_avail_event = <uint16_t *>&self.gused.ring[num]
            self._build_shadow_ring()
        except BaseException:
            self._release_rings()
            self.copier.close()
            raise
        for i in range(num):
            self.free_stack[i] = <uint16_t>(num - 1 - i)
        self.nfree = num
        self.guest_kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    cdef int _alloc_tables(self) except -1:
        cdef uint32_t n = self.num
        self.free_stack = <uint16_t *>calloc(n, sizeof(uint16_t))
        self.seg_addr = <uint64_t *>calloc(n, sizeof(uint64_t))
        self.seg_len = <uint32_t *>calloc(n, sizeof(uint32_t))
        self.seg_write = <uint8_t *>calloc(n, sizeof(uint8_t))
        self.seg_bounce = <uint64_t *>calloc(n, sizeof(uint64_t))
        self.seg_next = <uint16_t *>calloc(n, sizeof(uint16_t))
        self.req_guest = <uint16_t *>calloc(n, sizeof(uint16_t))
        self.req_nseg = <uint16_t *>calloc(n, sizeof(uint16_t))
        self.req_bounce = <uint64_t *>calloc(n, sizeof(uint64_t))
        self.req_bounce_len = <uint64_t *>calloc(n, sizeof(uint64_t))
        self.req_live = <uint8_t *>calloc(n, sizeof(uint8_t))
        self.tmp_addr = <uint64_t *>calloc(n, sizeof(uint64_t))
        self.tmp_len = <uint32_t *>calloc(n, sizeof(uint32_t))
        self.tmp_write = <uint8_t *>calloc(n, sizeof(uint8_t))
        self.done_head = <uint16_t *>calloc(n, sizeof(uint16_t))
        self.done_len = <uint32_t *>calloc(n, sizeof(uint32_t))
        self.copies_cap = 4 * BATCH
        self.copies = <xvf_gntdev_grant_copy_segment_t *>calloc(
            self.copies_cap, sizeof(xvf_gntdev_grant_copy_segment_t))
        self.copy_owner = <uint32_t *>calloc(self.copies_cap, sizeof(uint32_t))
        if (self.free_stack == NULL or self.seg_addr == NULL or self.seg_len == NULL
                or self.seg_write == NULL or self.seg_bounce == NULL
                or self.seg_next == NULL or self.req_guest == NULL
                or self.req_nseg == NULL or self.req_bounce == NULL
                or self.req_bounce_len == NULL or self.req_live == NULL
                or self.tmp_addr == NULL or self.tmp_len == NULL or self.tmp_write == NULL
                or self.done_head == NULL or self.done_len == NULL
                or self.copies == NULL or self.copy_owner == NULL):
            raise MemoryError()
        return 0

    def __dealloc__(self):
        free(self.free_stack)
        free(self.seg_addr)
        free(self.seg_len)
        free(self.seg_write)
        free(self.seg_bounce)
        free(self.seg_next)
        free(self.req_guest)
        free(self.req_nseg)
        free(self.req_bounce)
        free(self.req_bounce_len)
        free(self.req_live)
        free(self.tmp_addr)
        free(self.tmp_len)
        free(self.tmp_write)
        free(self.done_head)
        free(self.done_len)
        free(self.copies)
        free(self.copy_owner)

    @property
    def counters(self) -> tuple:
        """(requests relayed, bytes copied, bad requests), for `xvf status`."""
        return self.relayed_requests, self.copied_bytes, self.bad_requests

    cdef tuple _map_span(self, uint64_t addr, uint64_t length, bint writable):
        """(mapping, refs, offset of the range in it); RelayError if refused."""
        cdef uint64_t first
        cdef uint32_t count, offset
        _span(addr, length, &first, &count, &offset)
        refs = list(range(first, first + count))
        try:
            mapping = self.mapper.map(refs, writable)
        except GrantError as exc:
            raise RelayError(f"grant {addr:#x}+{length:#x} refused: {exc}") from None
        return mapping, refs, offset

    cdef char *_map_ring(self, uint64_t addr, uint64_t length, bint writable) except NULL:
        cdef GrantMapping m
        try:
            mapping, refs, offset = self._map_span(addr, length, writable)
        except RelayError as exc:
            raise GuestError(f"queue {self.index}: ring: {exc}") from None
        m = mapping
        self._ring_maps.append((m, refs))
        return <char *>m.addr + <uint32_t>offset

    cdef int _build_shadow_ring(self) except -1:
        cdef uint32_t n = self.num
        cdef uint64_t avail_off = _round(XVF_VRING_DESC_BYTES(n), XVF_VRING_AVAIL_ALIGN)
        cdef uint64_t used_off = _round(avail_off + XVF_VRING_AVAIL_BYTES(n), XVF_VRING_USED_ALIGN)
        cdef uint64_t scratch_off = _round(used_off + XVF_VRING_USED_BYTES(n), SHADOW_ALIGN)
        cdef uint64_t total = scratch_off + XVF_VRING_DESC_BYTES(n)  # + an indirect table
        base = self.shadow.alloc(total, PAGE_SIZE_C)
        if base is None:
            raise XvfError(f"queue {self.index}: no room for a shadow ring of {total} bytes")
        self._ring_base = base
        memset(self.shadow.base + <uint64_t>base, 0, total)
        self.shadow_desc = base
        self.shadow_avail = base + avail_off
        self.shadow_used = base + used_off
        self.scratch = base + scratch_off
        self.sdesc = <xvf_vring_desc_t *>(self.shadow.base + self.shadow_desc)
        self.savail = <xvf_vring_avail_t *>(self.shadow.base + self.shadow_avail)
        self.sused = <xvf_vring_used_t *>(self.shadow.base + self.shadow_used)
        self.s_used_event = <uint16_t *>&self.savail.ring[n]
        return 0

    @property
    def vring_addrs(self) -> tuple:
        """(desc, avail, used) front-end addresses of the shadow ring, for SET_VRING_ADDR."""
        u = self.shadow.uva
        return u + self.shadow_desc, u + self.shadow_avail, u + self.shadow_used

    # -- guest -> backend --------------------------------------------------------
    def on_guest_kick(self) -> None:
        cdef uint64_t count
        read(self.guest_kick_fd, &count, 8)  # nonblocking: nothing pending is fine
        self._process_avail()

    def resume(self) -> None:
        """Relay what the guest made available (a stalled queue, once space is freed)."""
        self._process_avail()

    cdef void _break(self, str why):
        self.broken = True
        if self.on_broken is not None:
            self.on_broken(f"guest broke its ring (queue {self.index}: {why})")

    cdef void _backend_broke(self, str why):
        self.broken = True
        self._backend_lied = True
        if self.on_broken is not None:
            self.on_broken(f"the backend broke its used ring (queue {self.index}: {why})")

    cdef int _process_avail(self) except -1:
        cdef uint16_t avail_idx, head, ahead
        cdef uint32_t n, nb = 0, batch_refs = 0, refs
        cdef int posted = 0, completed = 0, p, c, shead
        cdef uint64_t one = 1
        if self.stopped or self.broken or self.quiesced:
            return 0
        self.stalled = False
        while True:
            avail_idx = xvf_load_u16(&self.gavail.idx)
            ahead = <uint16_t>(avail_idx - self.last_avail)
            if ahead > self.num:
                # Bounded work per kick: never walk entries that cannot exist.
                self._break(
                    f"avail index {avail_idx} is {ahead} entries ahead of "
                    f"{self.last_avail}, more than the queue's {self.num}"
                )
                break
            if ahead == 0:
                # EVENT_IDX: ask for a kick at the very next buffer, then look again
                # so a buffer published meanwhile (guest saw the old value) is not lost.
                xvf_store_u16(self.g_avail_event, self.last_avail)
                xvf_full()
                if self.last_avail == xvf_load_u16(&self.gavail.idx):
                    break
                continue
            xvf_acquire()  # the entry and its descriptors after the index that covers them
            head = xvf_load_u16(&self.gavail.ring[self.last_avail % self.num])
            if head >= self.num:
                self.bad_requests += 1
                self._break(f"avail entry {self.last_avail} names head {head} of {self.num}")
                break
            try:
                n = self._walk_chain(head)
                refs = self._chain_refs(n)
            except RelayError as exc:
                self._refuse(head, exc)
                completed += 1
                self.last_avail += 1
                continue
            if nb and (nb >= BATCH or batch_refs + refs > MAX_REFS):
                p, c = self._post_batch(nb)
                posted += p
                completed += c
                nb = batch_refs = 0
            shead = self._reserve(head, n)
            if shead < 0 and nb:
                # Post what the batch holds first: if all of it is refused, nothing
                # in flight would ever wake a stalled queue.
                p, c = self._post_batch(nb)
                posted += p
                completed += c
                nb = batch_refs = 0
                shead = self._reserve(head, n)
            if shead < 0:
                self.stalled = True
                self.shadow.waiters.append(self.resume)
                break  # resumed by the completions that free room
            self.batch[nb] = <uint16_t>shead
            nb += 1
            batch_refs += refs
            self.last_avail += 1
        if nb:
            p, c = self._post_batch(nb)
            posted += p
            completed += c
        if posted:
            write(self.backend_kick_fd, &one, 8)
        if completed:
            xvf_release()
            xvf_store_u16(&self.gused.idx, self._guest_used_idx)
            with nogil:
                self.state.c_raise(1)
        return 0

    cdef uint32_t _chain_refs(self, uint32_t n) except 0:
        """Grant refs the walked chain spans; RelayError if a segment cannot be mapped."""
        cdef uint32_t i, count, offset
        cdef uint64_t first
        cdef uint64_t total = 0
        for i in range(n):
            _span(self.tmp_addr[i], self.tmp_len[i], &first, &count, &offset)
            total += count
        return <uint32_t>min(total, <uint64_t>0xffffffff)

    cdef int _refuse(self, uint16_t head, exc) except -1:
        self._refusals(logging.WARNING, "%s: request %d refused: %s", self.where, head, exc)
        self.bad_requests += 1
        self._complete_guest(head, 0)
        return 0

    cdef uint32_t _walk_chain(self, uint16_t head) except 0:
        """Read and check the chain once, into tmp_* (the guest may change it behind
        us); returns its length. RelayError if it is malformed."""
        cdef xvf_vring_desc_t d = self.gdesc[head]
        cdef uint32_t n = 0
        cdef uint16_t idx
        if d.flags & XVF_VRING_DESC_F_INDIRECT:
            if d.flags & XVF_VRING_DESC_F_NEXT:
                raise RelayError("indirect descriptor chained with NEXT")
            return self._walk_indirect(d.addr, d.len)
        while True:
            if d.flags & XVF_VRING_DESC_F_INDIRECT:
                raise RelayError("indirect descriptor inside a chain")
            self._take(n, &d)
            n += 1
            if not d.flags & XVF_VRING_DESC_F_NEXT:
                return self._checked(n)
            if n >= self.num:
                raise RelayError(f"chain from {head} is longer than the queue (a loop)")
            idx = d.next
            if idx >= self.num:
                raise RelayError(f"next index {idx} out of range")
            d = self.gdesc[idx]

    cdef inline void _take(self, uint32_t n, const xvf_vring_desc_t *d) noexcept:
        """Segment n of the walked chain is descriptor d (a copy: read once)."""
        self.tmp_addr[n] = d.addr
        self.tmp_len[n] = d.len
        self.tmp_write[n] = (d.flags & XVF_VRING_DESC_F_WRITE) != 0

    cdef uint32_t _walk_indirect(self, uint64_t addr, uint32_t length) except 0:
        cdef xvf_vring_desc_t *table
        cdef xvf_vring_desc_t d
        cdef uint32_t count, n = 0, i = 0, ncopies = 0
        if length == 0 or length % DESC_SIZE_C or length // DESC_SIZE_C > self.num:
            raise RelayError(f"indirect table of {length} bytes")
        count = length // DESC_SIZE_C
        # A copy, read once: the guest may rewrite its table while we walk it.
        self._add_copies(addr, length, self.scratch, False, False, 0, &ncopies)
        self._run_copies(ncopies)
        self._raise_failure(ncopies, "indirect table")
        table = <xvf_vring_desc_t *>(self.shadow.base + self.scratch)
        while True:
            d = table[i]
            if d.flags & XVF_VRING_DESC_F_INDIRECT:
                raise RelayError("nested indirect descriptor")
            self._take(n, &d)
            n += 1
            if not d.flags & XVF_VRING_DESC_F_NEXT:
                return self._checked(n)
            if n >= count:
                raise RelayError("indirect chain longer than its table (a loop)")
            if d.next >= count:
                raise RelayError(f"indirect next index {d.next} out of range")
            i = d.next

    cdef uint32_t _checked(self, uint32_t n) except 0:
        cdef uint32_t i
        cdef uint64_t total = 0
        for i in range(n):
            if not self.tmp_addr[i] & GRANT_BIT:
                raise RelayError(f"address {self.tmp_addr[i]:#x} is not a grant address")
            if self.tmp_len[i] == 0:
                raise RelayError("zero-length descriptor")
            total += _round(self.tmp_len[i], SHADOW_ALIGN)
        if total > self.shadow.capacity // 2:
            raise RelayError(f"request of {total} bytes exceeds the relay's bounce space")
        return n

    cdef int _reserve(self, uint16_t guest_head, uint32_t n) except -2:
        """Shadow descriptors and a bounce block for the walked chain (tmp_*): its shadow
        head, or -1 (nothing held) if either is short."""
        cdef uint32_t i
        cdef uint64_t total = 0, off
        cdef int64_t bounce
        cdef uint16_t d, head
        if n > self.nfree:
            return -1
        for i in range(n):
            total += _round(self.tmp_len[i], SHADOW_ALIGN)
        bounce = self.shadow.c_alloc(total, SHADOW_ALIGN)
        if bounce < 0:
            return -1
        off = <uint64_t>bounce
        head = self.free_stack[self.nfree - 1]
        for i in range(n):
            self.nfree -= 1
            d = self.free_stack[self.nfree]
            self.seg_addr[d] = self.tmp_addr[i]
            self.seg_len[d] = self.tmp_len[i]
            self.seg_write[d] = self.tmp_write[i]
            self.seg_bounce[d] = off
            self.seg_next[d] = self.free_stack[self.nfree - 1] if i + 1 < n else 0
            off += _round(self.tmp_len[i], SHADOW_ALIGN)
        self.req_guest[head] = guest_head
        self.req_nseg[head] = <uint16_t>n
        self.req_bounce[head] = <uint64_t>bounce
        self.req_bounce_len[head] = max(<uint64_t>SHADOW_ALIGN, total)
        return head

    cdef tuple _post_batch(self, uint32_t nb):
        """Copy the batch's segments in (one grant copy for all of them), post; returns
        (posted, refused). A request with a grant Xen refused is refused alone; if the
        call fails as a whole, each request is copied on its own, as without batching.

        Device-writable segments are copied in too: the whole area goes back at
        completion (backends under-report `len`), so it starts as the guest's bytes,
        never stale bounce bytes. Each of their pages also gets its first byte written
        back in the same call: a grant the guest gave read-only (or not at all) is
        refused here, before the backend sees the request, as a writable map was."""
        cdef uint32_t i, kept = 0
        cdef uint16_t head
        failed = self._copy_requests(self.batch, nb, False, "request")
        for i in range(nb):
            head = self.batch[i]
            if failed is not None and i in failed:
                self._release_request(head)
                self._refuse(self.req_guest[head], failed[i])
                continue
            self.copied_bytes += self._request_bytes(head, False)
            self.batch[kept] = head
            kept += 1
        for i in range(kept):
            self._publish(self.batch[i])
        if kept:
            xvf_release()  # descriptors, bounce data and entries before the index
            xvf_store_u16(&self.savail.idx, self._shadow_avail_idx)  # published last
        return kept, nb - kept

    # -- grant copies ---------------------------------------------------------------
    cdef object _copy_requests(self, const uint16_t *heads, uint32_t count, bint back,
                               str what):
        """Copy these requests in (back False) or their device-writable areas back
        (back True), in one call; {index in heads: RelayError} of those Xen refused, or
        None. If the call fails as a whole, each request is copied on its own, so that
        only one with a bad grant fails, as without batching."""
        cdef uint32_t i, n = 0, alone
        try:
            for i in range(count):
                self._copy_request(heads[i], back, i, &n)
            self._run_copies(n)
            return self._failures(n, what)
        except RelayError:
            pass
        failed = {}
        for i in range(count):
            alone = 0
            try:
                self._copy_request(heads[i], back, 0, &alone)
                self._run_copies(alone)
                self._raise_failure(alone, what)
            except RelayError as exc:
                failed[i] = exc
        return failed

    cdef int _copy_request(self, uint16_t head, bint back, uint32_t owner,
                           uint32_t *n) except -1:
        """Queue the copies of a request's segments: all of them into the shadow, with
        the write probes of its device-writable ones (back False), or its
        device-writable ones back to the guest (back True)."""
        cdef uint16_t d = head
        cdef uint32_t _j
        for _j in range(self.req_nseg[head]):
            if self.seg_write[d] or not back:
                self._add_copies(self.seg_addr[d], self.seg_len[d], self.seg_bounce[d],
                                 back, self.seg_write[d] and not back, owner, n)
            d = self.seg_next[d]
        return 0

    cdef uint64_t _request_bytes(self, uint16_t head, bint writable_only) noexcept:
        cdef uint16_t d = head
        cdef uint32_t _j
        cdef uint64_t total = 0
        for _j in range(self.req_nseg[head]):
            if self.seg_write[d] or not writable_only:
                total += self.seg_len[d]
            d = self.seg_next[d]
        return total

    cdef int _add_copies(self, uint64_t addr, uint64_t length, uint64_t local, bint back,
                         bint probe, uint32_t owner, uint32_t *n) except -1:
        """Queue the copies between grant range addr+length and shadow offset `local`
        (into the shadow, or back out to the guest): one per granted page, as
        GNTTABOP_copy takes no grant-side piece across a page. `probe`: after each
        page copied in, its first byte written back (Xen does a call's copies in
        order, so the guest's own byte), which fails if the page is not writable."""
        cdef uint64_t first
        cdef uint32_t count, offset, k, piece
        cdef char *virt = self.shadow.base + local
        _span(addr, length, &first, &count, &offset)
        self._grow_copies(n[0] + count * (2 if probe else 1))
        for k in range(count):
            piece = <uint32_t>min(length, PAGE_SIZE_C - offset)
            self._queue_copy(<uint32_t>(first + k), offset, virt, piece, back, owner, n)
            if probe:
                self._queue_copy(<uint32_t>(first + k), offset, virt, 1, True, owner, n)
            virt += piece
            length -= piece
            offset = 0
        return 0

    cdef inline void _queue_copy(self, uint32_t ref, uint32_t offset, char *virt,
                                 uint32_t length, bint to_guest, uint32_t owner,
                                 uint32_t *n) noexcept:
        cdef xvf_gntdev_grant_copy_segment_t *c = &self.copies[n[0]]
        if to_guest:
            c.source.virt = virt
            c.dest.foreign.ref = ref
            c.dest.foreign.offset = <uint16_t>offset
            c.dest.foreign.domid = self.domid
            c.flags = XVF_GNTCOPY_dest_gref
        else:
            c.source.foreign.ref = ref
            c.source.foreign.offset = <uint16_t>offset
            c.source.foreign.domid = self.domid
            c.dest.virt = virt
            c.flags = XVF_GNTCOPY_source_gref
        c.len = <uint16_t>length
        c.status = XVF_GNTST_okay
        self.copy_owner[n[0]] = owner
        n[0] += 1

    cdef int _grow_copies(self, uint64_t need) except -1:
        cdef uint64_t cap = self.copies_cap
        if need <= cap:
            return 0
        while cap < need:
            cap *= 2
        # A RelayError: the requests it was for are refused, none is lost.
        if cap > 0xffffffff:
            raise RelayError(f"{need} grant copies in one call")
        if (not regrow(<void **>&self.copies, cap * sizeof(xvf_gntdev_grant_copy_segment_t))
                or not regrow(<void **>&self.copy_owner, cap * sizeof(uint32_t))):
            raise RelayError(f"out of memory for {need} grant copies")
        self.copies_cap = <uint32_t>cap
        return 0

    cdef int _run_copies(self, uint32_t n) except -1:
        """The queued copies, in one call; RelayError if the call failed as a whole
        (each copy's own status says whether it was done)."""
        cdef int rc
        if n == 0:
            return 0
        with nogil:
            rc = self.copier.run(self.copies, n)
        if rc < 0:
            raise RelayError(f"grant copy of {n} segments refused: {os.strerror(-rc)}")
        return 0

    cdef object _failures(self, uint32_t n, str what):
        """{owner: RelayError} for the owners of the copies Xen refused, or None."""
        cdef uint32_t k
        failed = None
        for k in range(n):
            if self.copies[k].status != XVF_GNTST_okay:
                if failed is None:
                    failed = {}
                if self.copy_owner[k] not in failed:
                    failed[self.copy_owner[k]] = self._refusal(k, what)
        return failed

    cdef int _raise_failure(self, uint32_t n, str what) except -1:
        cdef uint32_t k
        for k in range(n):
            if self.copies[k].status != XVF_GNTST_okay:
                raise self._refusal(k, what)
        return 0

    cdef object _refusal(self, uint32_t k, str what):
        cdef xvf_gntdev_grant_copy_segment_t *c = &self.copies[k]
        ref = c.dest.foreign.ref if c.flags & XVF_GNTCOPY_dest_gref else c.source.foreign.ref
        way = "to" if c.flags & XVF_GNTCOPY_dest_gref else "from"
        return RelayError(
            f"{what}: copy {way} grant ref {ref} refused ({_gntst_name(c.status)})"
        )

    cdef void _publish(self, uint16_t head) noexcept:
        cdef uint16_t d = head
        cdef uint32_t k, n = self.req_nseg[head]
        cdef xvf_vring_desc_t *s
        for k in range(n):
            s = &self.sdesc[d]
            s.addr = self.seg_bounce[d]
            s.len = self.seg_len[d]
            s.flags = ((XVF_VRING_DESC_F_WRITE if self.seg_write[d] else 0)
                       | (XVF_VRING_DESC_F_NEXT if k + 1 < n else 0))
            s.next = self.seg_next[d] if k + 1 < n else 0
            d = self.seg_next[d]
        self.req_live[head] = 1
        self.inflight += 1
        xvf_store_u16(&self.savail.ring[self._shadow_avail_idx % self.num], head)
        self._shadow_avail_idx += 1
        self.relayed_requests += 1

    cdef int _release_request(self, uint16_t head) except -1:
        """Free its bounce block and shadow descriptors."""
        cdef uint16_t d = head
        cdef uint32_t _j
        self.shadow.c_free(self.req_bounce[head], self.req_bounce_len[head])
        for _j in range(self.req_nseg[head]):
            self.free_stack[self.nfree] = d
            self.nfree += 1
            d = self.seg_next[d]
        if self.req_live[head]:
            self.req_live[head] = 0
            self.inflight -= 1
        return 0

    # -- backend -> guest ----------------------------------------------------------
    def on_backend_call(self) -> None:
        cdef uint64_t count
        cdef uint16_t used_idx
        cdef uint32_t slot, shead, written, ndone = 0
        if self.backend_call_fd >= 0:
            read(self.backend_call_fd, &count, 8)  # nonblocking: nothing pending is fine
        if self.stopped or self._backend_lied:
            return
        used_idx = xvf_load_u16(&self.sused.idx)
        while self._shadow_last_used != used_idx:
            if <uint16_t>(used_idx - self._shadow_last_used) > self.inflight:
                # More completions than requests it holds: the entries past them are
                # stale, and taking one would complete a request the backend still has.
                self._backend_broke(
                    f"used index {used_idx} is "
                    f"{<uint16_t>(used_idx - self._shadow_last_used)} ahead of "
                    f"{self._shadow_last_used}, with {self.inflight} requests in flight"
                )
                break
            xvf_acquire()  # entries after the index that covers them
            slot = self._shadow_last_used % self.num
            shead = self.sused.ring[slot].id
            written = self.sused.ring[slot].len
            self._shadow_last_used += 1
            if shead >= self.num or not self.req_live[shead]:
                self._lies(
                    logging.ERROR, "%s: backend used id %d is not in flight", self.where, shead
                )
            else:
                # Taken now (a second entry with this id is a lie), completed below.
                self.req_live[shead] = 0
                self.inflight -= 1
                self.done_head[ndone] = <uint16_t>shead
                self.done_len[ndone] = written
                ndone += 1
            if self._shadow_last_used == used_idx:
                # EVENT_IDX on the shadow ring: call me at the next completion.
                xvf_store_u16(self.s_used_event, self._shadow_last_used)
                xvf_full()
                used_idx = xvf_load_u16(&self.sused.idx)
        if ndone:
            self._complete_batch(ndone)
            xvf_release()  # used entries before the index (the copies are done)
            xvf_store_u16(&self.gused.idx, self._guest_used_idx)  # published last
            with nogil:
                self.state.c_raise(1)
            self.shadow.wake_waiters()

    cdef int _complete_batch(self, uint32_t ndone) except -1:
        """Copy the completed requests' device-writable areas back (one grant copy for
        all of them), then complete them on the guest's used ring.

        The whole area, not the `len` the backend reported: backends under-report
        (rust-vmm's vhost-device-i2c says 1 for a failed transfer whose status byte
        trails the read buffer), and a guest driver may read the status and ignore the
        length. Bytes the backend did not write go back as the guest's own (copied in
        with the request). A request whose bytes could not be copied back (the guest
        ended its grant early) completes with len 0."""
        cdef uint32_t k
        cdef uint16_t head
        cdef uint64_t total
        failed = self._copy_requests(self.done_head, ndone, True, "completion")
        for k in range(ndone):
            head = self.done_head[k]
            if failed is not None and k in failed:
                self._refusals(logging.WARNING, "%s: request %d lost its data: %s",
                               self.where, self.req_guest[head], failed[k])
                self.bad_requests += 1
                self._complete_guest(self.req_guest[head], 0)
            else:
                total = self._request_bytes(head, True)
                self.copied_bytes += total
                self._complete_guest(self.req_guest[head],
                                     <uint32_t>min(<uint64_t>self.done_len[k], total))
            self._release_request(head)
        return 0

    cdef void _complete_guest(self, uint16_t head, uint32_t length) noexcept:
        cdef uint32_t slot = self._guest_used_idx % self.num
        self.gused.ring[slot].id = head
        self.gused.ring[slot].len = length
        self._guest_used_idx += 1

    # -- teardown ---------------------------------------------------------------------
    def in_flight(self) -> int:
        return self.inflight

    def quiesce(self) -> None:
        """Post nothing more to the backend (its ring is being stopped): also when
        freed shadow space would have resumed this queue."""
        self.quiesced = True
        self._unwait()

    cdef void _unwait(self):
        waiters = self.shadow.waiters
        while self.resume in waiters:
            waiters.remove(self.resume)

    def backend_used_idx(self) -> int:
        """The used index the backend has published on the shadow ring (any thread)."""
        return xvf_load_u16(&self.sused.idx)

    def shadow_avail_idx(self) -> int:
        """The avail index xvf has published to the backend on the shadow ring."""
        return xvf_load_u16(&self.savail.idx)

    def stop(self) -> int:
        """Drop every request in flight and all grant mappings; returns the guest's
        last avail index consumed. Stop the backend's ring first (GET_VRING_BASE)."""
        cdef uint32_t head
        if self.stopped:
            return self.last_avail
        self.stopped = True
        self._unwait()
        for head in range(self.num):
            if self.req_live[head]:
                self._release_request(<uint16_t>head)
        self._release_rings()
        self.copier.close()
        if self._ring_base >= 0:
            self.shadow.free(<uint64_t>self._ring_base)
            self._ring_base = -1
        if self.guest_kick_fd >= 0:
            os.close(self.guest_kick_fd)
            self.guest_kick_fd = -1
        return self.last_avail

    cdef void _release_rings(self):
        cdef GrantMapping m
        self.gdesc = NULL
        self.gavail = NULL
        self.gused = NULL
        for mapping, refs in reversed(self._ring_maps):
            m = mapping
            m.close()
            self.mapper.unmap(refs)
        self._ring_maps = []
