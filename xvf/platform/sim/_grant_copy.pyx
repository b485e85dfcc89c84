# cython: language_level=3
"""The software Xen's GNTTABOP_copy, run in the calling process.

On Xen a grant copy is a hypercall: it runs on the caller's CPU, with no other
process woken, and its time is the caller's. SimGrantCopier does the same here:
the segments of a gntdev GRANT_COPY call (include/xvf/linux_xen.h) are checked
against the guest's grant table and copied with memcpy in the caller, between the
guest's RAM and the caller's memory. To do Xen's part, the copier maps what Xen
sees of a guest (its RAM, its grant table, its GrantLock page); the software Xen
hands these over once per guest (control.OP_GNT_COPY_DOMAIN). The relay above it
sees none of this: it sees a GrantCopier, as on Xen.

A segment refused by its grant gets Xen's status: GNTST_bad_gntref for a ref
outside the table, GNTST_general_error for a grant that is not to the caller or is
read-only as a destination, GNTST_bad_domain for a domain that does not exist. A
malformed segment fails the whole call with EINVAL (gntdev refuses it), and an
address outside the memory the caller shared with the copier fails it with EFAULT
(gntdev's get_user_pages). Segments run in order, as Xen's gnttab_copy runs them.

GrantLock is the one lock over a guest's grant table, shared by the software Xen's
process (the guest's grant and end-access operations, gntdev maps) and every
copier: a process-shared robust mutex in a page of its own. A copy holds it
throughout, which is what Xen's transient pins of a copied grant guarantee: the
guest cannot end access to a grant while it is being copied. A copier killed
while it holds the lock leaves it to the next holder (EOWNERDEAD), as its copy
then no longer matters.
"""

from libc.errno cimport EBADF, EFAULT, EINVAL, ENOMEM, ESRCH
from libc.stdint cimport int16_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

from xvf.hotpath._gnttab cimport GrantCopier
from xvf.hotpath.includes.linux_xen cimport xvf_gntdev_grant_copy_segment_t
from xvf.hotpath.includes.system cimport (
    EOWNERDEAD, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, PTHREAD_MUTEX_ROBUST,
    PTHREAD_PROCESS_SHARED, mmap, munmap, pthread_mutex_consistent, pthread_mutex_init,
    pthread_mutex_lock, pthread_mutex_t, pthread_mutex_unlock, pthread_mutexattr_destroy,
    pthread_mutexattr_init, pthread_mutexattr_setpshared, pthread_mutexattr_setrobust,
    pthread_mutexattr_t,
)
from xvf.hotpath.includes.xen_grant cimport (
    XVF_GNTCOPY_dest_gref, XVF_GNTCOPY_source_gref, XVF_GNTST_bad_domain,
    XVF_GNTST_bad_gntref, XVF_GNTST_general_error, XVF_GNTST_okay, XVF_GTF_permit_access,
    XVF_GTF_readonly, XVF_GTF_type_mask, XVF_XEN_PAGE_SHIFT, xvf_grant_entry_v1_t,
)

import errno as _errno
import os

from xvf.platform.sim import control as C

cdef enum:
    MAX_AREAS = 8    # guest RAM banks; memories a caller shares
    MAX_GUESTS = 4   # guests a copier keeps mapped (a relay copies for one)

cdef uint64_t PAGE = (<uint64_t>1) << XVF_XEN_PAGE_SHIFT


# -- the grant-table lock ------------------------------------------------------------
cdef struct lock_page:
    pthread_mutex_t mutex
    uint32_t alive  # 0 once the domain is gone: its grants then answer GNTST_bad_domain


cdef int _lock(lock_page *page) noexcept nogil:
    cdef int rc = pthread_mutex_lock(&page.mutex)
    if rc == EOWNERDEAD:  # a copier died holding it; what it was copying is moot
        rc = pthread_mutex_consistent(&page.mutex)
    return rc


cdef lock_page *_map_lock(int fd) noexcept nogil:
    cdef void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    return NULL if p == MAP_FAILED else <lock_page *>p


cdef class GrantLock:
    """The lock over one guest's grant table, in a page that other processes map
    (`fd`): a new one, or (`fd` given) the one another process created."""

    cdef lock_page *page
    cdef readonly int fd

    def __cinit__(self, int fd=-1):
        cdef pthread_mutexattr_t attr
        self.fd = -1
        if fd >= 0:
            self.page = _map_lock(fd)
            if self.page == NULL:
                raise OSError(_errno.errno, "mapping a grant lock page")
            self.fd = fd
            return
        self.fd = os.memfd_create("xvf-grant-lock", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, PAGE)
        self.page = _map_lock(self.fd)
        if self.page == NULL:
            raise OSError(_errno.errno, "mapping a grant lock page")
        memset(self.page, 0, sizeof(lock_page))
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)
        pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)
        rc = pthread_mutex_init(&self.page.mutex, &attr)
        pthread_mutexattr_destroy(&attr)
        if rc:
            raise OSError(rc, "initialising a grant lock")
        self.page.alive = 1

    def __dealloc__(self):
        if self.page != NULL:
            munmap(self.page, PAGE)
        if self.fd >= 0:
            os.close(self.fd)

    def acquire(self) -> None:
        cdef int rc
        with nogil:
            rc = _lock(self.page)
        if rc:
            raise OSError(rc, "taking a grant lock")

    def release(self) -> None:
        pthread_mutex_unlock(&self.page.mutex)

    def __enter__(self) -> GrantLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def alive(self) -> bool:
        return self.page.alive != 0

    def retire(self) -> None:
        """The domain is gone: copies now answer GNTST_bad_domain."""
        with self:
            self.page.alive = 0


# -- the copier ----------------------------------------------------------------------
cdef struct area:
    uint64_t start   # a gpa (guest RAM) or an address in the caller
    uint64_t size
    char *base       # where it lies in this process


cdef struct guest:
    int domid        # -1: a free slot
    lock_page *lock
    xvf_grant_entry_v1_t *entries
    uint32_t nr_entries
    area ram[MAX_AREAS]
    int nram
    char *ram_map    # the mappings, to unmap
    size_t ram_size
    size_t entries_size


cdef char *_find(const area *areas, int n, uint64_t start, uint64_t length) noexcept nogil:
    cdef int i
    cdef uint64_t into
    for i in range(n):
        if start < areas[i].start:
            continue
        into = start - areas[i].start
        if into <= areas[i].size and length <= areas[i].size - into:
            return areas[i].base + into
    return NULL


cdef int16_t _grant_side(const guest *g, uint16_t caller, uint32_t ref, uint16_t offset,
                         uint16_t length, bint writable, char **out) noexcept nogil:
    cdef const xvf_grant_entry_v1_t *e
    cdef uint64_t gpa
    if g == NULL:
        return XVF_GNTST_bad_domain
    if ref >= g.nr_entries:
        return XVF_GNTST_bad_gntref
    e = &g.entries[ref]
    if (e.flags & XVF_GTF_type_mask) != XVF_GTF_permit_access or e.domid != caller:
        return XVF_GNTST_general_error
    if writable and e.flags & XVF_GTF_readonly:
        return XVF_GNTST_general_error
    gpa = (<uint64_t>e.frame << XVF_XEN_PAGE_SHIFT) + offset
    out[0] = _find(g.ram, g.nram, gpa, length)
    if out[0] == NULL:
        return XVF_GNTST_general_error  # a grant of a frame that is not RAM
    return XVF_GNTST_okay


cdef void _unmap_guest(guest *g) noexcept nogil:
    if g.ram_map != NULL:
        munmap(g.ram_map, g.ram_size)
    if g.entries != NULL:
        munmap(g.entries, g.entries_size)
    if g.lock != NULL:
        munmap(g.lock, PAGE)
    memset(g, 0, sizeof(guest))
    g.domid = -1


cdef class SimGrantCopier(GrantCopier):
    """gntdev's GRANT_COPY for the software Xen, run in this process (see the module).
    `client`: a control connection of the copier's own, on which it asks for a
    guest's memory the first time a segment names that guest."""

    cdef object _client
    cdef guest guests[MAX_GUESTS]
    cdef int next_slot          # the slot a new guest takes when all are in use
    cdef area local[MAX_AREAS]  # the caller's memory copies may go to and from
    cdef int nlocal
    cdef uint16_t caller        # the caller's domid, as the software Xen told it
    cdef bint closed
    # The last domid found gone: not asked for again (the software Xen never reuses
    # one), so copies naming it cost no GIL and no round trip.
    cdef int gone

    def __cinit__(self, client):
        cdef int i
        self._client = client
        self.gone = -1
        for i in range(MAX_GUESTS):
            memset(&self.guests[i], 0, sizeof(guest))
            self.guests[i].domid = -1

    def __dealloc__(self):
        self._unmap_all()

    cdef void _unmap_all(self) noexcept:
        cdef int i
        for i in range(MAX_GUESTS):
            _unmap_guest(&self.guests[i])

    def share(self, uintptr_t address, uint64_t size) -> None:
        """Let copies go to and from [address, address + size) of this process."""
        if self.nlocal == MAX_AREAS:
            raise OSError(ENOMEM, f"a copier shares at most {MAX_AREAS} memories")
        self.local[self.nlocal].start = address
        self.local[self.nlocal].size = size
        self.local[self.nlocal].base = <char *>address
        self.nlocal += 1

    def attach(self, int domid) -> None:
        """Map guest `domid` now, on this thread, rather than at its first copy (which
        then needs no GIL and no round trip, wherever it runs)."""
        if self._slot(domid) < 0 and self._attach(domid) < 0:
            self.gone = domid

    cdef int _slot(self, int domid) noexcept nogil:
        """The slot guest `domid` is mapped in, or -1."""
        cdef int i
        for i in range(MAX_GUESTS):
            if self.guests[i].domid == domid:
                return i
        return -1

    def _attach(self, int domid) -> int:
        """Map what Xen sees of guest `domid`; its slot, or -1 if there is no such guest."""
        cdef guest *g
        cdef void *p
        cdef int slot
        try:
            reply, fds = self._client.call(C.OP_GNT_COPY_DOMAIN, C.COPY_DOMAIN.pack(domid))
        except OSError as exc:
            if exc.errno == ESRCH:
                return -1
            raise
        try:
            caller, nr_entries, count = C.COPY_DOMAIN_REPLY.unpack_from(reply)
            banks = [C.RAM_REGION.unpack_from(reply, C.COPY_DOMAIN_REPLY.size
                                              + k * C.RAM_REGION.size) for k in range(count)]
            if len(fds) != 3 or not 0 < count <= MAX_AREAS:
                raise OSError(EINVAL, "OP_GNT_COPY_DOMAIN: a malformed reply")
            slot = self._free_slot()
            g = &self.guests[slot]
            g.ram_size = max(offset + size for _, size, offset in banks)
            g.entries_size = (nr_entries * sizeof(xvf_grant_entry_v1_t) + PAGE - 1) // PAGE * PAGE
            p = mmap(NULL, g.ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0)
            g.ram_map = NULL if p == MAP_FAILED else <char *>p
            p = mmap(NULL, g.entries_size, PROT_READ, MAP_SHARED, fds[1], 0)
            g.entries = NULL if p == MAP_FAILED else <xvf_grant_entry_v1_t *>p
            g.lock = _map_lock(fds[2])
            if g.ram_map == NULL or g.entries == NULL or g.lock == NULL:
                err = _errno.errno
                _unmap_guest(g)
                raise OSError(err, f"mapping guest {domid} for grant copies")
            for gpa, size, offset in banks:
                g.ram[g.nram].start = gpa
                g.ram[g.nram].size = size
                g.ram[g.nram].base = g.ram_map + <size_t>offset
                g.nram += 1
            g.nr_entries = nr_entries
            g.domid = domid
            self.caller = caller
            return slot
        finally:
            for fd in fds:
                os.close(fd)

    cdef int _free_slot(self) noexcept:
        cdef int i
        for i in range(MAX_GUESTS):
            if self.guests[i].domid < 0:
                return i
        i = self.next_slot
        self.next_slot = (i + 1) % MAX_GUESTS
        _unmap_guest(&self.guests[i])
        return i

    cdef guest *_locked(self, int domid, int *rc) noexcept nogil:
        """Guest `domid`, its grant lock held; NULL if it does not exist (or on an
        error, in *rc)."""
        cdef int slot
        cdef guest *g
        if domid == self.gone:
            return NULL
        slot = self._slot(domid)
        if slot < 0:
            with gil:
                try:
                    slot = self._attach(domid)
                except OSError as exc:
                    rc[0] = -(exc.errno or EINVAL)
                    return NULL
                except BaseException:
                    rc[0] = -EINVAL
                    return NULL
            if slot < 0:
                self.gone = domid
                return NULL
        g = &self.guests[slot]
        rc[0] = -_lock(g.lock)
        if rc[0]:
            return NULL
        if g.lock.alive:
            return g
        pthread_mutex_unlock(&g.lock.mutex)
        _unmap_guest(g)  # that guest is gone
        self.gone = domid
        return NULL

    cdef int c_copy(self, xvf_gntdev_grant_copy_segment_t *segs,
                    unsigned int count) noexcept nogil:
        cdef xvf_gntdev_grant_copy_segment_t *s
        cdef guest *g = NULL   # the guest of the segments now, locked; NULL: none
        cdef int domid = -1    # whose they are
        cdef unsigned int k
        cdef int rc = 0
        cdef int16_t status
        cdef char *src
        cdef char *dst
        cdef uint16_t seg_domid
        if self.closed:
            return -EBADF
        for k in range(count):
            s = &segs[k]
            if not s.flags & (XVF_GNTCOPY_source_gref | XVF_GNTCOPY_dest_gref):
                rc = -EINVAL  # a grant copy with no grant side
                break
            if ((s.flags & XVF_GNTCOPY_source_gref and s.source.foreign.offset + s.len > PAGE)
                    or (s.flags & XVF_GNTCOPY_dest_gref
                        and s.dest.foreign.offset + s.len > PAGE)):
                rc = -EINVAL  # a copy across a page of the grant
                break
            seg_domid = (s.source.foreign.domid if s.flags & XVF_GNTCOPY_source_gref
                         else s.dest.foreign.domid)
            if seg_domid != domid:
                if g != NULL:
                    pthread_mutex_unlock(&g.lock.mutex)
                domid = seg_domid
                g = self._locked(domid, &rc)
                if rc:
                    break
            src = dst = NULL
            if s.flags & XVF_GNTCOPY_source_gref:
                status = _grant_side(g, self.caller, s.source.foreign.ref,
                                     s.source.foreign.offset, s.len, False, &src)
            else:
                src = _find(self.local, self.nlocal, <uintptr_t>s.source.virt, s.len)
                status = XVF_GNTST_okay
            if status == XVF_GNTST_okay:
                if s.flags & XVF_GNTCOPY_dest_gref:
                    status = _grant_side(g, self.caller, s.dest.foreign.ref,
                                         s.dest.foreign.offset, s.len, True, &dst)
                else:
                    dst = _find(self.local, self.nlocal, <uintptr_t>s.dest.virt, s.len)
            if status == XVF_GNTST_okay and (src == NULL or dst == NULL):
                rc = -EFAULT  # to or from memory that was not shared
                break
            if status == XVF_GNTST_okay:
                memcpy(dst, src, s.len)
            s.status = status
        if g != NULL:
            pthread_mutex_unlock(&g.lock.mutex)
        return rc

    def close(self) -> None:
        self.closed = True
        self._unmap_all()
        self._client.close()
