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
The copy call is C too (a GrantCopier: gntdev's ioctl on Xen, the software Xen's
copier here). A kick or a call is handled without the GIL, on the thread of the
guest's ServiceLoop (a queue is an FdHandler): Python remains in the ring mapping
at start and in what the queue posts to the daemon's thread (`notice_fd`): its
rate-limited logs and a broken ring.

Layout: every ring field is little-endian (virtio 1.x); the hosts xvf runs on
(aarch64, x86-64) are little-endian, so the C structs of include/xvf/virtio_ring.h
are the rings as they lie in memory.
"""

from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memmove, memset, strerror

from xvf.hotpath._gnttab cimport GrantCopier, GrantMapping
from xvf.hotpath._grow cimport regrow
from xvf.hotpath._ioreq cimport FdHandler, MmioState
from xvf.hotpath.includes.barrier cimport (
    xvf_acquire, xvf_full, xvf_load_u16, xvf_release, xvf_store_u16,
)
from xvf.hotpath.includes.linux_xen cimport xvf_gntdev_grant_copy_segment_t
from xvf.hotpath.includes.system cimport (
    pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock, pthread_mutex_t,
    pthread_mutex_unlock, read, write,
)
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
    WHY_LEN = 200       # a refusal's reason, formatted without the GIL
    MAX_NOTES = 32      # refusals and lies kept for the daemon's thread to log

# What a queue posts to the daemon's thread (GrantRelayQueue.drain_notices).
cdef enum:
    NOTE_REFUSED = 0    # a request refused, completed with len 0
    NOTE_LOST = 1       # a completed request whose data could not be copied back
    NOTE_LIE = 2        # a used id the backend never got
    NOTE_KINDS = 3

# Why a request's grant copy failed (GrantRelayQueue.fails, per request of a call).
cdef enum:
    FAIL_NONE = 0
    FAIL_STATUS = 1     # Xen refused one of its copies: value = GNTST_*, ref, to_guest
    FAIL_CALL = 2       # its own copy call failed whole: value = errno, ref = copies
    FAIL_MEMORY = 3     # its copies could not be queued: ref = how many


cdef struct failure:
    uint8_t kind
    uint8_t to_guest
    int32_t value
    uint32_t ref


cdef struct note:
    int kind
    uint32_t head     # the guest's request, or the backend's used id
    char text[WHY_LEN]

cdef size_t DESC_SIZE_C = sizeof(xvf_vring_desc_t)
cdef uint64_t PAGE_SIZE_C = (<uint64_t>1) << XVF_XEN_PAGE_SHIFT  # Xen's page

MAX_REFS_PER_MAP = MAX_REFS
MAX_BATCH = BATCH
DEFAULT_SHADOW_SIZE = 64 << 20
PAGE_SIZE = PAGE_SIZE_C

cdef uint64_t GRANT_BIT = XVF_GRANT_DMA_ADDR_OFF


cdef inline uint64_t _round(uint64_t n, uint64_t align) noexcept nogil:
    return (n + align - 1) // align * align


cdef int _span_c(uint64_t addr, uint64_t length, uint64_t *first, uint32_t *count,
                 uint32_t *offset, char *why) noexcept nogil:
    """The grant refs a grant DMA address range covers: first, count, offset in page;
    -1 (and why) if it is not a range of grants."""
    cdef uint64_t raw, n
    if not addr & GRANT_BIT:
        snprintf(why, WHY_LEN, "address %#llx is not a grant address (bit 63 clear)",
                 <unsigned long long>addr)
        return -1
    if length == 0:
        snprintf(why, WHY_LEN, "grant range of length 0")
        return -1
    raw = addr & ~GRANT_BIT
    offset[0] = <uint32_t>(raw & (PAGE_SIZE_C - 1))
    first[0] = raw >> XVF_XEN_PAGE_SHIFT
    n = (offset[0] + length + PAGE_SIZE_C - 1) >> XVF_XEN_PAGE_SHIFT
    if n > MAX_REFS or first[0] + n > (<uint64_t>1 << 32):
        snprintf(why, WHY_LEN, "grant range %#llx+%#llx is too large or out of range",
                 <unsigned long long>addr, <unsigned long long>length)
        return -1
    count[0] = <uint32_t>n
    return 0


cdef int _span(uint64_t addr, uint64_t length, uint64_t *first, uint32_t *count,
               uint32_t *offset) except -1:
    """_span_c for Python callers: RelayError if it is not a range of grants."""
    cdef char why[WHY_LEN]
    if _span_c(addr, length, first, count, offset, why) < 0:
        raise RelayError(why.decode())
    return 0


def grant_span(uint64_t addr, int64_t length) -> tuple:
    """The grant refs a grant DMA address range covers and its offset in the first page."""
    cdef uint64_t first
    cdef uint32_t count, offset
    if length <= 0:
        raise RelayError(f"grant range of length {length}")
    _span(addr, <uint64_t>length, &first, &count, &offset)
    return list(range(first, first + count)), offset


cdef const char *_gntst_name(int status) noexcept nogil:
    """A GNTTABOP_copy status as Xen's messages name it (public/grant_table.h)."""
    if status == XVF_GNTST_okay:
        return "okay"
    if status == XVF_GNTST_general_error:
        return "general error"
    if status == XVF_GNTST_bad_domain:
        return "bad domain"
    if status == XVF_GNTST_bad_gntref:
        return "bad grant ref"
    if status == XVF_GNTST_permission_denied:
        return "permission denied"
    if status == XVF_GNTST_bad_copy_arg:
        return "bad copy argument"
    return "error"


# -- shadow memory ----------------------------------------------------------------
cdef class ShadowMemory:
    """One memfd owned by xvf: the only memory region the backend sees (gpa 0..size).

    A first-fit allocator hands out shadow rings and bounce buffers; the first
    page is never handed out so no shadow address is 0. Its queues' kicks and calls
    run on their guest's service thread, their set-up on the daemon's: the
    allocator and the queues waiting for space are under `lock`."""

    ALIGN = SHADOW_ALIGN

    cdef readonly uint64_t size
    cdef readonly uint64_t capacity
    cdef readonly uint64_t uva
    cdef readonly int fd
    cdef readonly object mem
    cdef object _mmap
    cdef char *base
    # free extents, sorted by offset
    cdef uint64_t *free_off
    cdef uint64_t *free_len
    cdef uint32_t nfree
    cdef uint32_t free_cap
    cdef dict _used  # what alloc() (the Python callers) handed out: offset -> length
    cdef pthread_mutex_t lock
    # Queues stalled for lack of space (borrowed: a queue leaves before it goes),
    # retried whenever space is freed.
    cdef PyObject **waiting
    cdef uint32_t nwaiting
    cdef uint32_t waiting_cap

    def __cinit__(self):
        self.fd = -1
        pthread_mutex_init(&self.lock, NULL)

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
        self._used = {}

    def __dealloc__(self):
        free(self.free_off)
        free(self.free_len)
        free(self.waiting)
        pthread_mutex_destroy(&self.lock)

    cdef int _room(self) noexcept nogil:
        """Room for two more extents (an alloc splits one into two); -1 if out of
        memory (lock held)."""
        cdef uint32_t n
        if self.nfree + 2 <= self.free_cap:
            return 0
        n = self.free_cap * 2
        if not (regrow(<void **>&self.free_off, n * sizeof(uint64_t))
                and regrow(<void **>&self.free_len, n * sizeof(uint64_t))):
            return -1
        self.free_cap = n
        return 0

    cdef int64_t c_alloc(self, uint64_t length, uint64_t align) noexcept nogil:
        """Offset (== shadow gpa) of `length` free bytes rounded up to `align`, or -1
        (none free, or no memory to track them)."""
        cdef int64_t off
        pthread_mutex_lock(&self.lock)
        off = self._alloc_locked(length, align) if self._room() == 0 else -1
        pthread_mutex_unlock(&self.lock)
        return off

    cdef int64_t _alloc_locked(self, uint64_t length, uint64_t align) noexcept nogil:
        cdef uint32_t i
        cdef uint64_t off, span, start, pad
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

    cdef void c_free(self, uint64_t offset, uint64_t length) noexcept nogil:
        """Give back what c_alloc(length) returned at `offset`, merged with neighbours."""
        pthread_mutex_lock(&self.lock)
        # Out of memory to track one more extent: those bytes stay lost, nothing breaks.
        if self._room() == 0:
            self._free_locked(offset, length)
        pthread_mutex_unlock(&self.lock)

    cdef void _free_locked(self, uint64_t offset, uint64_t length) noexcept nogil:
        cdef uint32_t i = 0
        cdef bint left, right
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

    cdef int c_wait(self, PyObject *queue) noexcept nogil:
        """`queue` is stalled for space: retry it when space is freed (-1: no memory)."""
        cdef uint32_t i, n
        cdef int rc = 0
        pthread_mutex_lock(&self.lock)
        for i in range(self.nwaiting):
            if self.waiting[i] == queue:
                break
        else:
            if self.nwaiting == self.waiting_cap:
                n = max(<uint32_t>8, 2 * self.waiting_cap)
                if regrow(<void **>&self.waiting, n * sizeof(PyObject *)):
                    self.waiting_cap = n
            if self.nwaiting < self.waiting_cap:
                self.waiting[self.nwaiting] = queue
                self.nwaiting += 1
            else:
                rc = -1
        pthread_mutex_unlock(&self.lock)
        return rc

    cdef void c_unwait(self, PyObject *queue) noexcept nogil:
        cdef uint32_t i = 0
        pthread_mutex_lock(&self.lock)
        while i < self.nwaiting:
            if self.waiting[i] == queue:
                self.nwaiting -= 1
                self.waiting[i] = self.waiting[self.nwaiting]
            else:
                i += 1
        pthread_mutex_unlock(&self.lock)

    cdef uint32_t c_waiting(self) noexcept nogil:
        cdef uint32_t n
        pthread_mutex_lock(&self.lock)
        n = self.nwaiting
        pthread_mutex_unlock(&self.lock)
        return n

    cdef PyObject *c_next_waiter(self) noexcept nogil:
        """Take the first queue waiting for space, or NULL."""
        cdef PyObject *q = NULL
        pthread_mutex_lock(&self.lock)
        if self.nwaiting:
            q = self.waiting[0]
            self.nwaiting -= 1
            memmove(&self.waiting[0], &self.waiting[1], self.nwaiting * sizeof(PyObject *))
        pthread_mutex_unlock(&self.lock)
        return q

    @property
    def waiting_queues(self) -> int:
        """Queues stalled for space (for tests and `status`)."""
        return self.c_waiting()

    def alloc(self, uint64_t length, uint64_t align=SHADOW_ALIGN):
        """Offset (== shadow gpa) of `length` free bytes, or None when full."""
        cdef int64_t off
        with nogil:
            off = self.c_alloc(length, align)
        if off < 0:
            return None
        self._used[off] = max(align, _round(length, align))
        return off

    def free(self, uint64_t offset) -> None:
        cdef uint64_t length = self._used.pop(offset)
        with nogil:
            self.c_free(offset, length)

    @property
    def free_extents(self) -> list:
        """(offset, length) of every free extent, in order (for tests and `status`)."""
        cdef uint32_t i, n
        cdef uint64_t *copy = NULL
        with nogil:
            pthread_mutex_lock(&self.lock)
            n = self.nfree
            copy = <uint64_t *>calloc(2 * n + 1, sizeof(uint64_t))
            if copy != NULL:
                memcpy(copy, self.free_off, n * sizeof(uint64_t))
                memcpy(copy + n, self.free_len, n * sizeof(uint64_t))
            pthread_mutex_unlock(&self.lock)
        if copy == NULL:
            raise MemoryError()
        try:
            return [(copy[i], copy[n + i]) for i in range(n)]
        finally:
            free(copy)

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
cdef class GrantRelayQueue(FdHandler):
    """Relays one guest split virtqueue through a shadow ring in `shadow`.

    Each shadow descriptor carries one segment of a guest request (its guest
    address, length, direction, bounce offset); a request is known by its shadow
    head. The guest's kicks (`guest_kick_fd`) and the backend's calls
    (`backend_call_fd`) are handled by `c_ready`, without the GIL, on the thread of
    the ServiceLoop they are added to; what needs Python (logs, `on_broken`) is
    posted on `notice_fd` for `drain_notices` on the daemon's thread. The Python
    methods on_guest_kick, on_backend_call and resume do the same work and drain
    at once."""

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
    # Why the request at hand is refused (formatted without the GIL), and why each
    # request of the last copy call failed, if it did.
    cdef char why[WHY_LEN]
    cdef failure *fails
    # For the daemon's thread: refusals and lies to log (and how many did not fit),
    # and a broken ring on_broken has not been told of. notice_fd says there are some.
    cdef pthread_mutex_t notes_lock
    cdef note notes[MAX_NOTES]
    cdef uint32_t nnotes
    cdef uint64_t notes_dropped[NOTE_KINDS]
    cdef readonly int notice_fd
    # Broken rings on_broken is yet to hear of: [0] the guest's, [1] the backend's.
    cdef bint broke[2]
    cdef char broke_why[2][WHY_LEN]
    cdef int _last_errno  # of the last copy call that failed whole
    # Held while the queue relays: the guest's thread runs kicks and calls (and, for
    # freed space, other queues' resumes), the daemon's stops the queue.
    cdef pthread_mutex_t work_lock

    def __cinit__(self):
        self.guest_kick_fd = -1
        self.notice_fd = -1
        self._ring_base = -1
        pthread_mutex_init(&self.notes_lock, NULL)
        pthread_mutex_init(&self.work_lock, NULL)

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
        self.notice_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

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
        # one per request of a copy call: a batch, or the completions one call found
        self.fails = <failure *>calloc(max(n, <uint32_t>BATCH), sizeof(failure))
        if (self.free_stack == NULL or self.seg_addr == NULL or self.seg_len == NULL
                or self.seg_write == NULL or self.seg_bounce == NULL
                or self.seg_next == NULL or self.req_guest == NULL
                or self.req_nseg == NULL or self.req_bounce == NULL
                or self.req_bounce_len == NULL or self.req_live == NULL
                or self.tmp_addr == NULL or self.tmp_len == NULL or self.tmp_write == NULL
                or self.done_head == NULL or self.done_len == NULL
                or self.copies == NULL or self.copy_owner == NULL or self.fails == NULL):
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
        free(self.fails)
        if self.shadow is not None:  # never left waiting for space once gone
            self.shadow.c_unwait(<PyObject *>self)
        if self.notice_fd >= 0:
            os.close(self.notice_fd)
        pthread_mutex_destroy(&self.notes_lock)
        pthread_mutex_destroy(&self.work_lock)

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

    # -- the loop's entry points ------------------------------------------------------
    cdef void c_ready(self, int fd) noexcept nogil:
        if fd == self.guest_kick_fd:
            self._on_kick()
        elif fd == self.backend_call_fd:
            self._on_call()

    def on_guest_kick(self) -> None:
        with nogil:
            self._on_kick()
        self.drain_notices()

    def resume(self) -> None:
        """Relay what the guest made available (a stalled queue, once space is freed)."""
        with nogil:
            self._resume()
        self.drain_notices()

    def on_backend_call(self) -> None:
        with nogil:
            self._on_call()
        self.drain_notices()

    # -- what the daemon's thread is told --------------------------------------------
    cdef void _note(self, int kind, uint32_t head) noexcept nogil:
        """Post `why` about the guest's request `head` for the daemon's thread to log."""
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.notes_lock)
        if self.nnotes < MAX_NOTES:
            self.notes[self.nnotes].kind = kind
            self.notes[self.nnotes].head = head
            memcpy(self.notes[self.nnotes].text, self.why, WHY_LEN)
            self.nnotes += 1
        else:
            self.notes_dropped[kind] += 1  # still counted by the rate-limited log
        pthread_mutex_unlock(&self.notes_lock)
        write(self.notice_fd, &one, 8)

    cdef void _break(self, bint backend) noexcept nogil:
        """A ring is broken (why says how): nothing more is relayed, on_broken is told."""
        cdef uint64_t one = 1
        self.broken = True
        if backend:
            self._backend_lied = True
        pthread_mutex_lock(&self.notes_lock)
        if not self.broke[backend]:
            self.broke[backend] = True
            memcpy(self.broke_why[backend], self.why, WHY_LEN)
        pthread_mutex_unlock(&self.notes_lock)
        write(self.notice_fd, &one, 8)

    def drain_notices(self) -> None:
        """Log what the queue posted (rate-limited) and tell on_broken of a broken ring
        (not once the queue is quiesced: its reset is under way). The daemon's thread."""
        cdef uint64_t count
        cdef uint32_t i, n
        cdef note taken[MAX_NOTES]
        cdef uint64_t dropped[NOTE_KINDS]
        cdef bint broke[2]
        cdef char broke_why[2][WHY_LEN]
        read(self.notice_fd, &count, 8)  # nonblocking: nothing pending is fine
        with nogil:
            pthread_mutex_lock(&self.notes_lock)
            n = self.nnotes
            memcpy(taken, self.notes, n * sizeof(note))
            memcpy(dropped, self.notes_dropped, sizeof(dropped))
            memcpy(broke, self.broke, sizeof(broke))
            memcpy(broke_why, self.broke_why, sizeof(broke_why))
            self.nnotes = 0
            memset(self.notes_dropped, 0, sizeof(self.notes_dropped))
            memset(self.broke, 0, sizeof(self.broke))
            pthread_mutex_unlock(&self.notes_lock)
        for i in range(n):
            text = taken[i].text.decode(errors="replace")
            if taken[i].kind == NOTE_REFUSED:
                self._refusals(logging.WARNING, "%s: request %d refused: %s",
                               self.where, taken[i].head, text)
            elif taken[i].kind == NOTE_LOST:
                self._refusals(logging.WARNING, "%s: request %d lost its data: %s",
                               self.where, taken[i].head, text)
            else:
                self._lies(logging.ERROR, "%s: backend used id %d is not in flight",
                           self.where, taken[i].head)
        self._refusals.skip(dropped[NOTE_REFUSED] + dropped[NOTE_LOST])
        self._lies.skip(dropped[NOTE_LIE])
        for backend in (False, True):
            if not broke[backend]:
                continue
            why = broke_why[backend].decode(errors="replace")
            what = (f"the backend broke its used ring (queue {self.index}: {why})" if backend
                    else f"guest broke its ring (queue {self.index}: {why})")
            if self.quiesced or self.on_broken is None:
                # Its ring is being stopped anyway: said, not acted on.
                log.warning("%s: %s", self.where, what)
            else:
                self.on_broken(what)

    # -- guest -> backend --------------------------------------------------------
    cdef void _on_kick(self) noexcept nogil:
        cdef uint64_t count
        read(self.guest_kick_fd, &count, 8)  # nonblocking: nothing pending is fine
        self._resume()

    cdef void _resume(self) noexcept nogil:
        pthread_mutex_lock(&self.work_lock)
        self._process_avail()
        pthread_mutex_unlock(&self.work_lock)

    cdef int _process_avail(self) noexcept nogil:
        cdef uint16_t avail_idx, head, ahead
        cdef uint32_t n, nb = 0, batch_refs = 0, refs = 0
        cdef uint32_t posted = 0, completed = 0, p, c
        # Entries one pass takes: a guest that keeps adding them must not keep its
        # thread (and the loop's lock) here for good.
        cdef uint32_t budget = self.num
        cdef int shead
        cdef uint64_t one = 1
        if self.stopped or self.broken or self.quiesced:
            return 0
        self.stalled = False
        while True:
            if budget == 0:
                write(self.guest_kick_fd, &one, 8)  # the rest next pass, after the others
                break
            avail_idx = xvf_load_u16(&self.gavail.idx)
            ahead = <uint16_t>(avail_idx - self.last_avail)
            if ahead > self.num:
                # Bounded work per kick: never walk entries that cannot exist.
                snprintf(self.why, WHY_LEN,
                         "avail index %u is %u entries ahead of %u, more than the queue's %u",
                         avail_idx, ahead, self.last_avail, self.num)
                self._break(False)
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
                snprintf(self.why, WHY_LEN, "avail entry %u names head %u of %u",
                         self.last_avail, head, self.num)
                self._break(False)
                break
            n = self._walk_chain(head)
            if n:
                refs = self._chain_refs(n)
            budget -= 1
            if n == 0 or refs == 0:
                self._refuse(head)
                completed += 1
                self.last_avail += 1
                continue
            if nb and (nb >= BATCH or batch_refs + refs > MAX_REFS):
                self._post_batch(nb, &p, &c)
                posted += p
                completed += c
                nb = batch_refs = 0
            shead = self._reserve(head, n)
            if shead < 0 and nb:
                # Post what the batch holds first: if all of it is refused, nothing
                # in flight would ever wake a stalled queue.
                self._post_batch(nb, &p, &c)
                posted += p
                completed += c
                nb = batch_refs = 0
                shead = self._reserve(head, n)
            if shead < 0:
                if self.shadow.c_wait(<PyObject *>self) < 0:
                    # No memory to wait with: refused rather than stalled for good.
                    snprintf(self.why, WHY_LEN, "no memory to wait for bounce space")
                    self._refuse(head)
                    completed += 1
                    self.last_avail += 1
                    continue
                self.stalled = True
                break  # resumed by the completions that free room
            self.batch[nb] = <uint16_t>shead
            nb += 1
            batch_refs += refs
            self.last_avail += 1
        if nb:
            self._post_batch(nb, &p, &c)
            posted += p
            completed += c
        if posted:
            write(self.backend_kick_fd, &one, 8)
        if completed:
            xvf_release()
            xvf_store_u16(&self.gused.idx, self._guest_used_idx)
            self.state.c_raise(1)
        return 0

    cdef uint32_t _chain_refs(self, uint32_t n) noexcept nogil:
        """Grant refs the walked chain spans; 0 (and why) if a segment is not grants."""
        cdef uint32_t i, count, offset
        cdef uint64_t first
        cdef uint64_t total = 0
        for i in range(n):
            if _span_c(self.tmp_addr[i], self.tmp_len[i], &first, &count, &offset,
                       self.why) < 0:
                return 0
            total += count
        return <uint32_t>min(total, <uint64_t>0xffffffff)

    cdef void _refuse(self, uint16_t head) noexcept nogil:
        """Complete the guest's request with len 0, for the reason in why."""
        self._note(NOTE_REFUSED, head)
        self.bad_requests += 1
        self._complete_guest(head, 0)

    cdef uint32_t _walk_chain(self, uint16_t head) noexcept nogil:
        """Read and check the chain once, into tmp_* (the guest may change it behind
        us); returns its length, or 0 (and why) if it is malformed."""
        cdef xvf_vring_desc_t d = self.gdesc[head]
        cdef uint32_t n = 0
        cdef uint16_t idx
        if d.flags & XVF_VRING_DESC_F_INDIRECT:
            if d.flags & XVF_VRING_DESC_F_NEXT:
                snprintf(self.why, WHY_LEN, "indirect descriptor chained with NEXT")
                return 0
            return self._walk_indirect(d.addr, d.len)
        while True:
            if d.flags & XVF_VRING_DESC_F_INDIRECT:
                snprintf(self.why, WHY_LEN, "indirect descriptor inside a chain")
                return 0
            self._take(n, &d)
            n += 1
            if not d.flags & XVF_VRING_DESC_F_NEXT:
                return self._checked(n)
            if n >= self.num:
                snprintf(self.why, WHY_LEN, "chain from %u is longer than the queue (a loop)",
                         head)
                return 0
            idx = d.next
            if idx >= self.num:
                snprintf(self.why, WHY_LEN, "next index %u out of range", idx)
                return 0
            d = self.gdesc[idx]

    cdef inline void _take(self, uint32_t n, const xvf_vring_desc_t *d) noexcept nogil:
        """Segment n of the walked chain is descriptor d (a copy: read once)."""
        self.tmp_addr[n] = d.addr
        self.tmp_len[n] = d.len
        self.tmp_write[n] = (d.flags & XVF_VRING_DESC_F_WRITE) != 0

    cdef uint32_t _walk_indirect(self, uint64_t addr, uint32_t length) noexcept nogil:
        cdef xvf_vring_desc_t *table
        cdef xvf_vring_desc_t d
        cdef uint32_t count, n = 0, i = 0, ncopies = 0
        if length == 0 or length % DESC_SIZE_C or length // DESC_SIZE_C > self.num:
            snprintf(self.why, WHY_LEN, "indirect table of %u bytes", length)
            return 0
        count = length // DESC_SIZE_C
        # A copy, read once: the guest may rewrite its table while we walk it.
        if (self._add_copies(addr, length, self.scratch, False, False, 0, &ncopies) < 0
                or self._run_copies(ncopies) < 0
                or self._first_failure(ncopies, "indirect table") < 0):
            return 0
        table = <xvf_vring_desc_t *>(self.shadow.base + self.scratch)
        while True:
            d = table[i]
            if d.flags & XVF_VRING_DESC_F_INDIRECT:
                snprintf(self.why, WHY_LEN, "nested indirect descriptor")
                return 0
            self._take(n, &d)
            n += 1
            if not d.flags & XVF_VRING_DESC_F_NEXT:
                return self._checked(n)
            if n >= count:
                snprintf(self.why, WHY_LEN, "indirect chain longer than its table (a loop)")
                return 0
            if d.next >= count:
                snprintf(self.why, WHY_LEN, "indirect next index %u out of range", d.next)
                return 0
            i = d.next

    cdef uint32_t _checked(self, uint32_t n) noexcept nogil:
        cdef uint32_t i
        cdef uint64_t total = 0
        for i in range(n):
            if not self.tmp_addr[i] & GRANT_BIT:
                snprintf(self.why, WHY_LEN, "address %#llx is not a grant address",
                         <unsigned long long>self.tmp_addr[i])
                return 0
            if self.tmp_len[i] == 0:
                snprintf(self.why, WHY_LEN, "zero-length descriptor")
                return 0
            total += _round(self.tmp_len[i], SHADOW_ALIGN)
        if total > self.shadow.capacity // 2:
            snprintf(self.why, WHY_LEN, "request of %llu bytes exceeds the relay's bounce space",
                     <unsigned long long>total)
            return 0
        return n

    cdef int _reserve(self, uint16_t guest_head, uint32_t n) noexcept nogil:
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

    cdef void _post_batch(self, uint32_t nb, uint32_t *posted, uint32_t *refused) noexcept nogil:
        """Copy the batch's segments in (one grant copy for all of them), post. A
        request with a grant Xen refused is refused alone; if the call fails as a
        whole, each request is copied on its own, as without batching.

        Device-writable segments are copied in too: the whole area goes back at
        completion (backends under-report `len`), so it starts as the guest's bytes,
        never stale bounce bytes. Each of their pages also gets its first byte written
        back in the same call: a grant the guest gave read-only (or not at all) is
        refused here, before the backend sees the request, as a writable map was."""
        cdef uint32_t i, kept = 0
        cdef uint16_t head
        self._copy_requests(self.batch, nb, False)
        for i in range(nb):
            head = self.batch[i]
            if self.fails[i].kind != FAIL_NONE:
                self._release_request(head)
                self._describe_failure(i, "request")
                self._refuse(self.req_guest[head])
                continue
            self.copied_bytes += self._request_bytes(head, False)
            self.batch[kept] = head
            kept += 1
        for i in range(kept):
            self._publish(self.batch[i])
        if kept:
            xvf_release()  # descriptors, bounce data and entries before the index
            xvf_store_u16(&self.savail.idx, self._shadow_avail_idx)  # published last
        posted[0] = kept
        refused[0] = nb - kept

    # -- grant copies ---------------------------------------------------------------
    cdef void _copy_requests(self, const uint16_t *heads, uint32_t count,
                             bint back) noexcept nogil:
        """Copy these requests in (back False) or their device-writable areas back
        (back True), in one call; fails[i] says why request i failed (FAIL_NONE: it
        did not). If the call fails as a whole, each request is copied on its own, so
        that only one with a bad grant fails, as without batching."""
        cdef uint32_t i, n = 0, alone
        cdef int rc = 0
        memset(self.fails, 0, count * sizeof(failure))
        for i in range(count):
            rc = self._copy_request(heads[i], back, i, &n)
            if rc < 0:
                break
        if rc == 0:
            rc = self._run_copies(n)
        if rc == 0:
            self._mark_failures(n)
            return
        memset(self.fails, 0, count * sizeof(failure))
        for i in range(count):
            alone = 0
            if self._copy_request(heads[i], back, i, &alone) < 0:
                self.fails[i].kind = FAIL_MEMORY
                self.fails[i].ref = alone
            elif self._run_copies(alone) < 0:
                self.fails[i].kind = FAIL_CALL
                self.fails[i].value = self._last_errno
                self.fails[i].ref = alone
            else:
                self._mark_failures(alone)

    cdef int _copy_request(self, uint16_t head, bint back, uint32_t owner,
                           uint32_t *n) noexcept nogil:
        """Queue the copies of a request's segments: all of them into the shadow, with
        the write probes of its device-writable ones (back False), or its
        device-writable ones back to the guest (back True). -1 if they cannot be."""
        cdef uint16_t d = head
        cdef uint32_t _j
        for _j in range(self.req_nseg[head]):
            if self.seg_write[d] or not back:
                if self._add_copies(self.seg_addr[d], self.seg_len[d], self.seg_bounce[d],
                                    back, self.seg_write[d] and not back, owner, n) < 0:
                    return -1
            d = self.seg_next[d]
        return 0

    cdef uint64_t _request_bytes(self, uint16_t head, bint writable_only) noexcept nogil:
        cdef uint16_t d = head
        cdef uint32_t _j
        cdef uint64_t total = 0
        for _j in range(self.req_nseg[head]):
            if self.seg_write[d] or not writable_only:
                total += self.seg_len[d]
            d = self.seg_next[d]
        return total

    cdef int _add_copies(self, uint64_t addr, uint64_t length, uint64_t local, bint back,
                         bint probe, uint32_t owner, uint32_t *n) noexcept nogil:
        """Queue the copies between grant range addr+length and shadow offset `local`
        (into the shadow, or back out to the guest): one per granted page, as
        GNTTABOP_copy takes no grant-side piece across a page. `probe`: after each
        page copied in, its first byte written back (Xen does a call's copies in
        order, so the guest's own byte), which fails if the page is not writable.
        -1 (and why) if the range is not grants or the copies cannot be queued."""
        cdef uint64_t first
        cdef uint32_t count, offset, k, piece
        cdef char *virt = self.shadow.base + local
        if _span_c(addr, length, &first, &count, &offset, self.why) < 0:
            return -1
        if self._grow_copies(n[0] + count * (2 if probe else 1)) < 0:
            return -1
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
                                 uint32_t *n) noexcept nogil:
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

    cdef int _grow_copies(self, uint64_t need) noexcept nogil:
        """Room for `need` queued copies; -1 (and why) if there cannot be: the requests
        they were for are refused, none is lost."""
        cdef uint64_t cap = self.copies_cap
        if need <= cap:
            return 0
        while cap < need:
            cap *= 2
        if cap > <uint64_t>0xffffffff:
            snprintf(self.why, WHY_LEN, "%llu grant copies in one call",
                     <unsigned long long>need)
            return -1
        if (not regrow(<void **>&self.copies, cap * sizeof(xvf_gntdev_grant_copy_segment_t))
                or not regrow(<void **>&self.copy_owner, cap * sizeof(uint32_t))):
            snprintf(self.why, WHY_LEN, "out of memory for %llu grant copies",
                     <unsigned long long>need)
            return -1
        self.copies_cap = <uint32_t>cap
        return 0

    cdef int _run_copies(self, uint32_t n) noexcept nogil:
        """The queued copies, in one call; -1 (why, _last_errno) if the call failed as
        a whole (each copy's own status says whether it was done)."""
        cdef int rc
        if n == 0:
            return 0
        rc = self.copier.run(self.copies, n)
        if rc < 0:
            self._last_errno = -rc
            snprintf(self.why, WHY_LEN, "grant copy of %u segments refused: %s", n,
                     strerror(-rc))
            return -1
        return 0

    cdef void _mark_failures(self, uint32_t n) noexcept nogil:
        """fails[owner] for the owners of the copies Xen refused (the first per owner)."""
        cdef uint32_t k
        for k in range(n):
            if self.copies[k].status != XVF_GNTST_okay:
                self._set_failure(k, self.copy_owner[k])

    cdef void _set_failure(self, uint32_t k, uint32_t owner) noexcept nogil:
        cdef xvf_gntdev_grant_copy_segment_t *c = &self.copies[k]
        cdef failure *f = &self.fails[owner]
        if f.kind != FAIL_NONE:
            return
        f.kind = FAIL_STATUS
        f.value = c.status
        f.to_guest = (c.flags & XVF_GNTCOPY_dest_gref) != 0
        f.ref = c.dest.foreign.ref if f.to_guest else c.source.foreign.ref

    cdef int _first_failure(self, uint32_t n, const char *what) noexcept nogil:
        """-1 (and why) if Xen refused one of the n copies just run."""
        cdef uint32_t k
        for k in range(n):
            if self.copies[k].status != XVF_GNTST_okay:
                memset(&self.fails[0], 0, sizeof(failure))
                self._set_failure(k, 0)
                self._describe_failure(0, what)
                return -1
        return 0

    cdef void _describe_failure(self, uint32_t i, const char *what) noexcept nogil:
        """why, for request i of the last copy call."""
        cdef failure *f = &self.fails[i]
        if f.kind == FAIL_STATUS:
            snprintf(self.why, WHY_LEN, "%s: copy %s grant ref %u refused (GNTST %d: %s)",
                     what, "to" if f.to_guest else "from", f.ref, f.value,
                     _gntst_name(f.value))
        elif f.kind == FAIL_CALL:
            snprintf(self.why, WHY_LEN, "grant copy of %u segments refused: %s", f.ref,
                     strerror(f.value))
        elif f.kind == FAIL_MEMORY:
            snprintf(self.why, WHY_LEN, "%s: no memory to queue its grant copies", what)

    cdef void _publish(self, uint16_t head) noexcept nogil:
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

    cdef void _release_request(self, uint16_t head) noexcept nogil:
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

    # -- backend -> guest ----------------------------------------------------------
    cdef void _on_call(self) noexcept nogil:
        cdef uint64_t count
        cdef bint freed
        if self.backend_call_fd >= 0:
            read(self.backend_call_fd, &count, 8)  # nonblocking: nothing pending is fine
        pthread_mutex_lock(&self.work_lock)
        freed = self._take_completions()
        pthread_mutex_unlock(&self.work_lock)
        if freed:  # not under our lock: this queue may be one of those waiting
            _retry_waiters(self.shadow, True)

    cdef bint _take_completions(self) noexcept nogil:
        """Complete on the guest's ring what the backend completed; True if any."""
        cdef uint16_t used_idx
        cdef uint32_t slot, shead, written, ndone = 0
        # As _process_avail's: a backend that keeps publishing must not keep us here.
        cdef uint32_t budget = self.num
        cdef uint64_t one = 1
        if self.stopped or self._backend_lied:
            return False
        used_idx = xvf_load_u16(&self.sused.idx)
        while self._shadow_last_used != used_idx:
            if budget == 0:
                if self.backend_call_fd >= 0:
                    write(self.backend_call_fd, &one, 8)  # the rest next pass
                break
            budget -= 1
            if <uint16_t>(used_idx - self._shadow_last_used) > self.inflight:
                # More completions than requests it holds: the entries past them are
                # stale, and taking one would complete a request the backend still has.
                snprintf(self.why, WHY_LEN,
                         "used index %u is %u ahead of %u, with %u requests in flight",
                         used_idx, <uint16_t>(used_idx - self._shadow_last_used),
                         self._shadow_last_used, self.inflight)
                self._break(True)
                break
            xvf_acquire()  # entries after the index that covers them
            slot = self._shadow_last_used % self.num
            shead = self.sused.ring[slot].id
            written = self.sused.ring[slot].len
            self._shadow_last_used += 1
            if shead >= self.num or not self.req_live[shead]:
                self.why[0] = 0
                self._note(NOTE_LIE, shead)
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
            self.state.c_raise(1)
        return ndone > 0

    cdef void _complete_batch(self, uint32_t ndone) noexcept nogil:
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
        self._copy_requests(self.done_head, ndone, True)
        for k in range(ndone):
            head = self.done_head[k]
            if self.fails[k].kind != FAIL_NONE:
                self._describe_failure(k, "completion")
                self._note(NOTE_LOST, self.req_guest[head])
                self.bad_requests += 1
                self._complete_guest(self.req_guest[head], 0)
            else:
                total = self._request_bytes(head, True)
                self.copied_bytes += total
                self._complete_guest(self.req_guest[head],
                                     <uint32_t>min(<uint64_t>self.done_len[k], total))
            self._release_request(head)

    cdef void _complete_guest(self, uint16_t head, uint32_t length) noexcept nogil:
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
        with nogil:
            pthread_mutex_lock(&self.work_lock)
            self.quiesced = True
            pthread_mutex_unlock(&self.work_lock)
        self._unwait()

    cdef void _unwait(self) noexcept:
        self.shadow.c_unwait(<PyObject *>self)

    def backend_used_idx(self) -> int:
        """The used index the backend has published on the shadow ring (any thread)."""
        return xvf_load_u16(&self.sused.idx)

    def shadow_avail_idx(self) -> int:
        """The avail index xvf has published to the backend on the shadow ring."""
        return xvf_load_u16(&self.savail.idx)

    def stop(self) -> int:
        """Drop every request in flight and all grant mappings; returns the guest's
        last avail index consumed. Stop the backend's ring first (GET_VRING_BASE)."""
        if self.stopped:
            return self.last_avail
        with nogil:  # a kick or call under way on the guest's thread finishes first
            pthread_mutex_lock(&self.work_lock)
        try:
            self._stop()
        finally:
            pthread_mutex_unlock(&self.work_lock)
        return self.last_avail

    cdef int _stop(self) except -1:
        cdef uint32_t head
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
        _retry_waiters(self.shadow, False)  # what it held is free now
        return 0

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


cdef void _retry_waiters(ShadowMemory shadow, bint here) noexcept nogil:
    """Space was freed: retry each queue stalled for it, once (one that stalls again
    waits for the next). `here`: on this, their guest's thread, at once; otherwise (a
    queue stopped on the daemon's thread) by a kick, which their own thread handles."""
    cdef uint32_t n = shadow.c_waiting()
    cdef uint64_t one = 1
    cdef PyObject *q
    while n:
        q = shadow.c_next_waiter()
        if q == NULL:
            break
        if here:
            (<GrantRelayQueue>q)._resume()
        else:
            write((<GrantRelayQueue>q).guest_kick_fd, &one, 8)
        n -= 1
