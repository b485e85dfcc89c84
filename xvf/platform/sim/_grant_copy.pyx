# cython: language_level=3
"""The software Xen's GNTTABOP_copy, run in the calling process.

On Xen a grant copy is a hypercall: it runs on the caller's CPU, with no other
process woken, and its time is the caller's. SimGrantCopier does the same here:
the segments of a gntdev GRANT_COPY call (include/xvf/linux_xen.h) are checked
against the guest's grant table and copied with memcpy in the caller, between the
guest's RAM and the caller's memory. To do Xen's part, the copier maps what Xen
sees of a guest (its RAM, its grant table, its GrantLock page); the software Xen
hands these over once per guest (control.OP_GNT_COPY_DOMAIN). The relay above it
sees none of this: it sees a GrantCopier, as on Xen. The checks and the copy of a
segment are C (include/xvf/sim_grant_copy.h), shared with the benchmarks' C device
model, so that both run the same hypercall.

A refused segment gets Xen's status, a malformed call gntdev's errno (the header
lists them); segments run in order, as Xen's gnttab_copy runs them.

GrantLock is the one lock over a guest's grant table, shared by the software Xen's
process (the guest's grant and end-access operations, gntdev maps) and every
copier: a process-shared robust mutex in a page of its own. A copy holds it
throughout, which is what Xen's transient pins of a copied grant guarantee: the
guest cannot end access to a grant while it is being copied. A copier killed
while it holds the lock leaves it to the next holder (EOWNERDEAD), as its copy
then no longer matters.
"""

from libc.errno cimport EBADF, EINVAL, ENOMEM, ESRCH
from libc.stdint cimport uint16_t, uint64_t, uintptr_t
from libc.string cimport memset

from xvf.hotpath._gnttab cimport GrantCopier
from xvf.hotpath.includes.linux_xen cimport xvf_gntdev_grant_copy_segment_t
from xvf.hotpath.includes.sim_grant_copy cimport (
    xvf_sim_area_t, xvf_sim_copy_segment, xvf_sim_grant_lock, xvf_sim_grant_lock_t,
    xvf_sim_grant_unlock, xvf_sim_guest_view_t, xvf_sim_segment_domid,
)
from xvf.hotpath.includes.system cimport (
    MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, PTHREAD_MUTEX_ROBUST,
    PTHREAD_PROCESS_SHARED, mmap, munmap, pthread_mutex_init,
    pthread_mutexattr_destroy, pthread_mutexattr_init, pthread_mutexattr_setpshared,
    pthread_mutexattr_setrobust, pthread_mutexattr_t,
)
from xvf.hotpath.includes.xen_grant cimport XVF_XEN_PAGE_SHIFT, xvf_grant_entry_v1_t

import errno as _errno
import os

from xvf.platform.sim import control as C

cdef enum:
    MAX_AREAS = 8    # guest RAM banks; memories a caller shares
    MAX_GUESTS = 4   # guests a copier keeps mapped (a relay copies for one)

cdef uint64_t PAGE = (<uint64_t>1) << XVF_XEN_PAGE_SHIFT


# -- the grant-table lock ------------------------------------------------------------
cdef xvf_sim_grant_lock_t *_map_lock(int fd) noexcept nogil:
    cdef void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    return NULL if p == MAP_FAILED else <xvf_sim_grant_lock_t *>p


cdef class GrantLock:
    """The lock over one guest's grant table, in a page that other processes map
    (`fd`): a new one, or (`fd` given) the one another process created."""

    cdef xvf_sim_grant_lock_t *page
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
        memset(self.page, 0, sizeof(xvf_sim_grant_lock_t))
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
            rc = xvf_sim_grant_lock(self.page)
        if rc:
            raise OSError(rc, "taking a grant lock")

    def release(self) -> None:
        xvf_sim_grant_unlock(self.page)

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
cdef struct guest:
    int domid        # -1: a free slot
    xvf_sim_guest_view_t view  # its lock, grant table and RAM, as the copy sees them
    xvf_sim_area_t ram[MAX_AREAS]
    char *ram_map    # the mappings, to unmap
    size_t ram_size
    size_t entries_size


cdef void _unmap_guest(guest *g) noexcept nogil:
    if g.ram_map != NULL:
        munmap(g.ram_map, g.ram_size)
    if g.view.entries != NULL:
        munmap(<void *>g.view.entries, g.entries_size)
    if g.view.lock != NULL:
        munmap(g.view.lock, PAGE)
    memset(g, 0, sizeof(guest))
    g.domid = -1


cdef class SimGrantCopier(GrantCopier):
    """gntdev's GRANT_COPY for the software Xen, run in this process (see the module).
    `client`: a control connection of the copier's own, on which it asks for a
    guest's memory the first time a segment names that guest."""

    cdef object _client
    cdef guest guests[MAX_GUESTS]
    cdef int next_slot          # the slot a new guest takes when all are in use
    cdef xvf_sim_area_t local[MAX_AREAS]  # the caller's memory copies may go to and from
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
            g.view.entries = NULL if p == MAP_FAILED else <xvf_grant_entry_v1_t *>p
            g.view.lock = _map_lock(fds[2])
            if g.ram_map == NULL or g.view.entries == NULL or g.view.lock == NULL:
                err = _errno.errno
                _unmap_guest(g)
                raise OSError(err, f"mapping guest {domid} for grant copies")
            for gpa, size, offset in banks:
                g.ram[g.view.nram].start = gpa
                g.ram[g.view.nram].size = size
                g.ram[g.view.nram].base = g.ram_map + <size_t>offset
                g.view.nram += 1
            g.view.ram = g.ram
            g.view.nr_entries = nr_entries
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

    cdef xvf_sim_guest_view_t *_locked(self, int domid, int *rc) noexcept nogil:
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
        rc[0] = -xvf_sim_grant_lock(g.view.lock)
        if rc[0]:
            return NULL
        if g.view.lock.alive:
            return &g.view
        xvf_sim_grant_unlock(g.view.lock)
        _unmap_guest(g)  # that guest is gone
        self.gone = domid
        return NULL

    cdef int c_copy(self, xvf_gntdev_grant_copy_segment_t *segs,
                    unsigned int count) noexcept nogil:
        cdef xvf_sim_guest_view_t *g = NULL  # the guest of the segments now, locked
        cdef int domid = -1    # whose they are
        cdef int seg_domid
        cdef unsigned int k
        cdef int rc = 0
        if self.closed:
            return -EBADF
        for k in range(count):
            seg_domid = xvf_sim_segment_domid(&segs[k])
            if seg_domid < 0:
                rc = seg_domid
                break
            if seg_domid != domid:
                if g != NULL:
                    xvf_sim_grant_unlock(g.lock)
                domid = seg_domid
                g = self._locked(domid, &rc)  # NULL: gone, its segments GNTST_bad_domain
                if rc:
                    break
            rc = xvf_sim_copy_segment(g, self.caller, self.local, self.nlocal, &segs[k])
            if rc:
                break
        if g != NULL:
            xvf_sim_grant_unlock(g.lock)
        return rc

    def close(self) -> None:
        self.closed = True
        self._unmap_all()
        self._client.close()
