# cython: language_level=3
"""The software Xen's GNTTABOP_copy, in C: the loop over a gntdev GRANT_COPY call's
segments (include/xvf/linux_xen.h), each checked against the guest's grant table and
copied between its RAM and the caller's shared memory with memcpy.

xvf.platform.sim.hypervisor parses the message and finds the memory; this module
runs the segments, as Xen's gnttab_copy does, in order. A segment refused by its
grant gets Xen's status (GNTST_bad_gntref for a ref outside the table,
GNTST_general_error for a grant that is not to the caller or is read-only as a
destination, GNTST_bad_domain); a malformed one fails the whole call (EINVAL, as
gntdev refuses it), as a local address outside the shared memory does (EFAULT).
The guest's grant-table lock is held across the call: its grant and end-access
operations cannot interleave with a copy, which is what Xen's transient pins of a
copied grant guarantee.
"""

from libc.errno cimport EFAULT, EINVAL
from libc.stdint cimport int16_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy

from xvf.hotpath.includes.linux_xen cimport xvf_gntdev_grant_copy_segment_t
from xvf.hotpath.includes.xen_grant cimport (
    XVF_GNTCOPY_dest_gref, XVF_GNTCOPY_source_gref, XVF_GNTST_bad_domain,
    XVF_GNTST_bad_gntref, XVF_GNTST_general_error, XVF_GNTST_okay, XVF_GTF_permit_access,
    XVF_GTF_readonly, XVF_GTF_type_mask, XVF_XEN_PAGE_SHIFT, xvf_grant_entry_v1_t,
)

cdef enum:
    MAX_REGIONS = 8  # guest RAM banks, caller memories

cdef uint64_t PAGE = (<uint64_t>1) << XVF_XEN_PAGE_SHIFT


cdef struct area:
    uint64_t start   # a gpa (guest RAM) or an address in the caller
    uint64_t size
    char *base       # where it lies in this process


cdef struct guest:
    int domid        # -1: none resolved yet
    bint known
    xvf_grant_entry_v1_t *entries
    uint32_t nr_entries
    area ram[MAX_REGIONS]
    int nram


cdef char *_find(const area *areas, int n, uint64_t start, uint64_t length) noexcept:
    cdef int i
    cdef uint64_t into
    for i in range(n):
        if start < areas[i].start:
            continue
        into = start - areas[i].start
        if into <= areas[i].size and length <= areas[i].size - into:
            return areas[i].base + into
    return NULL


cdef int _areas(list pairs, area *out, list keep) except -1:
    """(start, buffer) pairs as areas, at most MAX_REGIONS; their views go to `keep`,
    which must outlive every use of the addresses."""
    cdef const unsigned char[::1] view
    cdef int n = 0
    for start, buf in pairs[:MAX_REGIONS]:
        view = buf
        keep.append(view)
        out[n].start = start
        out[n].size = view.shape[0]
        out[n].base = <char *>&view[0]
        n += 1
    return n


cdef int16_t _grant_side(const guest *g, uint16_t dm_domid, uint32_t ref, uint16_t offset,
                         uint16_t length, bint writable, char **out) noexcept:
    cdef xvf_grant_entry_v1_t *e
    cdef uint64_t gpa
    if not g.known:
        return XVF_GNTST_bad_domain
    if ref >= g.nr_entries:
        return XVF_GNTST_bad_gntref
    e = &g.entries[ref]
    if (e.flags & XVF_GTF_type_mask) != XVF_GTF_permit_access or e.domid != dm_domid:
        return XVF_GNTST_general_error
    if writable and e.flags & XVF_GTF_readonly:
        return XVF_GNTST_general_error
    gpa = (<uint64_t>e.frame << XVF_XEN_PAGE_SHIFT) + offset
    out[0] = _find(g.ram, g.nram, gpa, length)
    if out[0] == NULL:
        return XVF_GNTST_general_error  # a grant of a frame that is not RAM
    return XVF_GNTST_okay


def grant_copy(unsigned char[::1] segments, unsigned int count, resolve, list local,
               unsigned int dm_domid) -> None:
    """Run `count` segments held in `segments` (their statuses are written there).

    `resolve(domid)`: None, or (grant entries, RAM) of that guest, where entries is a
    writable buffer of its grant table, RAM a list of (gpa, buffer) banks, and the
    guest's grant-table lock is taken by `resolve` and handed back as a third item to
    release. `local`: the caller's shared memory, (address in the caller, buffer)."""
    cdef xvf_gntdev_grant_copy_segment_t *segs
    cdef xvf_gntdev_grant_copy_segment_t *s
    cdef guest g
    cdef area mine[MAX_REGIONS]
    cdef int nmine, i
    cdef unsigned int k
    cdef int16_t status
    cdef char *src
    cdef char *dst
    cdef uint16_t domid
    cdef const unsigned char[::1] view
    if <size_t>segments.shape[0] < count * sizeof(xvf_gntdev_grant_copy_segment_t):
        raise OSError(EINVAL, "grant copy: short segment array")
    if count == 0:
        return
    keep = []  # the buffers whose addresses are used below, alive until the end
    nmine = _areas(local, mine, keep)
    segs = <xvf_gntdev_grant_copy_segment_t *>&segments[0]
    g.domid = -1
    g.known = False
    lock = None
    try:
        for k in range(count):
            s = &segs[k]
            if not s.flags & (XVF_GNTCOPY_source_gref | XVF_GNTCOPY_dest_gref):
                raise OSError(EINVAL, "a grant copy with no grant side")
            if ((s.flags & XVF_GNTCOPY_source_gref and s.source.foreign.offset + s.len > PAGE)
                    or (s.flags & XVF_GNTCOPY_dest_gref
                        and s.dest.foreign.offset + s.len > PAGE)):
                raise OSError(EINVAL, "a grant copy across a page of the grant")
            domid = (s.source.foreign.domid if s.flags & XVF_GNTCOPY_source_gref
                     else s.dest.foreign.domid)
            if domid != g.domid:
                if lock is not None:
                    lock.release()
                    lock = None
                g.domid = domid
                g.known = False
                found = resolve(domid)
                if found is not None:
                    entries, ram, lock = found
                    view = entries
                    keep.append(view)
                    g.entries = <xvf_grant_entry_v1_t *>&view[0]
                    g.nr_entries = <uint32_t>(view.shape[0] // sizeof(xvf_grant_entry_v1_t))
                    g.nram = _areas(ram, g.ram, keep)
                    g.known = True
            src = dst = NULL
            if s.flags & XVF_GNTCOPY_source_gref:
                status = _grant_side(&g, <uint16_t>dm_domid, s.source.foreign.ref,
                                     s.source.foreign.offset, s.len, False, &src)
            else:
                src = _find(mine, nmine, <uintptr_t>s.source.virt, s.len)
                status = XVF_GNTST_okay
            if status == XVF_GNTST_okay:
                if s.flags & XVF_GNTCOPY_dest_gref:
                    status = _grant_side(&g, <uint16_t>dm_domid, s.dest.foreign.ref,
                                         s.dest.foreign.offset, s.len, True, &dst)
                else:
                    dst = _find(mine, nmine, <uintptr_t>s.dest.virt, s.len)
            if status == XVF_GNTST_okay and (src == NULL or dst == NULL):
                raise OSError(EFAULT, "grant copy to or from memory that was not shared")
            if status == XVF_GNTST_okay:
                memcpy(dst, src, s.len)
            s.status = status
    finally:
        if lock is not None:
            lock.release()
        for i in range(len(keep)):
            keep[i] = None
