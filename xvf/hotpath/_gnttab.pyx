# cython: language_level=3
"""Mapping of pages a guest granted: Linux gntdev, and the simulator's equivalent.

Both give a contiguous, page-aligned mapping of a list of granted pages in this
process, returned as a `GrantMapping` exposing the buffer protocol.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.errno cimport ENOSYS, errno
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

from xvf.hotpath.includes.linux_xen cimport (
    XVF_IOCTL_GNTDEV_GRANT_COPY, XVF_IOCTL_GNTDEV_MAP_GRANT_REF,
    XVF_IOCTL_GNTDEV_SET_MAX_GRANTS, XVF_IOCTL_GNTDEV_UNMAP_GRANT_REF,
    xvf_gntdev_grant_copy_segment_t, xvf_gntdev_grant_copy_t, xvf_gntdev_grant_ref_t,
    xvf_gntdev_map_grant_ref_t, xvf_gntdev_set_max_grants_t, xvf_gntdev_unmap_grant_ref_t,
)
from xvf.hotpath.includes.system cimport (
    MAP_ANONYMOUS, MAP_FAILED, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, PROT_NONE, PROT_READ,
    PROT_WRITE, ioctl, mmap, munmap,
)
from xvf.hotpath.includes.xen_ioreq cimport XVF_PAGE_SIZE

from xvf.errors import GrantError


cdef class GrantMapping:
    """A contiguous mapping of granted pages; unmapped by `close()`."""

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.length)

    @property
    def address(self) -> int:
        return <uintptr_t>self.addr

    def __len__(self):
        return self.length

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.addr == NULL:
            raise GrantError("grant mapping is closed")
        if (flags & PyBUF_WRITABLE) and not self.writable:
            raise BufferError("grant mapping is read-only")
        PyBuffer_FillInfo(buf, self, self.addr, self.length, not self.writable, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self._exports -= 1

    def close(self) -> None:
        if self.addr == NULL:
            return
        if self._exports:
            raise GrantError("grant mapping still has views; release them first")
        unmap = self._unmap
        munmap(self.addr, self.length)
        self.addr = NULL
        if unmap is not None:
            unmap()


cdef GrantMapping _wrap(void *addr, size_t length, bint writable, object unmap):
    cdef GrantMapping m = GrantMapping.__new__(GrantMapping)
    m.addr = addr
    m.length = length
    m.writable = writable
    m._unmap = unmap
    return m


cdef class GrantCopier:
    """Grant copies (Xen's GNTTABOP_copy as gntdev's GRANT_COPY runs it), callable
    from C without the GIL: /dev/xen/gntdev (GntDev) or the software Xen's stand-in."""

    cdef int run(self, xvf_gntdev_grant_copy_segment_t *segs, unsigned int count) noexcept nogil:
        """`count` segments in one call, each given its GNTST_* status; 0, or -errno if
        the call failed as a whole."""
        self.calls += 1
        self.segments += count
        return self.c_copy(segs, count)

    cdef int c_copy(self, xvf_gntdev_grant_copy_segment_t *segs,
                    unsigned int count) noexcept nogil:
        return -ENOSYS

    def copy(self, uintptr_t segments, unsigned int count) -> None:
        """`run` from Python: the segments at address `segments`; GrantError if the
        call failed as a whole."""
        cdef int rc
        with nogil:
            rc = self.run(<xvf_gntdev_grant_copy_segment_t *>segments, count)
        if rc < 0:
            raise GrantError(f"grant copy of {count} segments failed", -rc)

    def close(self) -> None:
        """Nothing of its own to close here (gntdev's fd is its mapper's)."""


cdef class GntDev(GrantCopier):
    """An open /dev/xen/gntdev."""

    def __cinit__(self, int fd):
        self.fd = fd

    def set_max_grants(self, uint32_t count) -> None:
        cdef xvf_gntdev_set_max_grants_t arg
        arg.count = count
        if ioctl(self.fd, XVF_IOCTL_GNTDEV_SET_MAX_GRANTS, &arg) < 0:
            raise GrantError(f"gntdev: setting max grants to {count} failed", errno)

    def map(self, uint32_t domid, refs, bint writable=True) -> GrantMapping:
        cdef uint32_t count = len(refs)
        if count == 0:
            raise GrantError("no grant references to map")
        cdef size_t size = (sizeof(xvf_gntdev_map_grant_ref_t)
                            + (count - 1) * sizeof(xvf_gntdev_grant_ref_t))
        cdef xvf_gntdev_map_grant_ref_t *arg = <xvf_gntdev_map_grant_ref_t *>calloc(1, size)
        if arg == NULL:
            raise MemoryError()
        cdef uint32_t i
        try:
            arg.count = count
            for i in range(count):
                arg.refs[i].domid = domid
                arg.refs[i].ref = refs[i]
            if ioctl(self.fd, XVF_IOCTL_GNTDEV_MAP_GRANT_REF, arg) < 0:
                raise GrantError(f"gntdev: mapping {count} grants of domain {domid} failed", errno)
            index = arg.index
        finally:
            free(arg)
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        cdef size_t length = count * XVF_PAGE_SIZE
        cdef void *addr = mmap(NULL, length, prot, MAP_SHARED, self.fd, index)
        if addr == MAP_FAILED:
            err = errno
            self._unmap_index(index, count)
            raise GrantError(f"gntdev: mmap of {count} grants failed", err)
        return _wrap(addr, length, writable, lambda: self._unmap_index(index, count))

    cdef int c_copy(self, xvf_gntdev_grant_copy_segment_t *segs,
                    unsigned int count) noexcept nogil:
        cdef xvf_gntdev_grant_copy_t arg
        arg.count = count
        arg.segments = segs
        if ioctl(self.fd, XVF_IOCTL_GNTDEV_GRANT_COPY, &arg) < 0:
            return -errno
        return 0

    def _unmap_index(self, uint64_t index, uint32_t count) -> None:
        cdef xvf_gntdev_unmap_grant_ref_t arg
        arg.index = index
        arg.count = count
        arg.pad = 0
        if ioctl(self.fd, XVF_IOCTL_GNTDEV_UNMAP_GRANT_REF, &arg) < 0:
            raise GrantError("gntdev: unmapping grants failed", errno)


def map_file_pages(int fd, offsets, bint writable=True) -> GrantMapping:
    """Map the pages of `fd` at the given page-aligned offsets contiguously.

    The simulator's gntdev: Xen maps each granted frame into the device model's
    address space; here the frames are pages of the guest-RAM memfd.
    """
    cdef size_t count = len(offsets)
    if count == 0:
        raise GrantError("no pages to map")
    cdef size_t length = count * XVF_PAGE_SIZE
    cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
    cdef size_t i, run
    cdef uint64_t off, first
    cdef void *base
    for i in range(count):
        if offsets[i] % XVF_PAGE_SIZE:
            raise GrantError(f"page offset {offsets[i]:#x} is not page aligned")
    # One mmap per run of consecutive pages, as gntdev maps a whole grant map in one
    # go; pages that follow each other in the file need no reservation at all.
    first = offsets[0]
    for i in range(1, count):
        if offsets[i] != first + i * XVF_PAGE_SIZE:
            break
    else:
        base = mmap(NULL, length, prot, MAP_SHARED, fd, first)
        if base == MAP_FAILED:
            raise GrantError(f"mapping {count} pages at offset {first:#x} failed", errno)
        return _wrap(base, length, writable, None)
    base = mmap(NULL, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if base == MAP_FAILED:
        raise GrantError("reserving address space failed", errno)
    i = 0
    while i < count:
        off = offsets[i]
        run = 1
        while i + run < count and offsets[i + run] == off + run * XVF_PAGE_SIZE:
            run += 1
        if mmap(<char *>base + i * XVF_PAGE_SIZE, run * XVF_PAGE_SIZE, prot,
                MAP_SHARED | MAP_FIXED, fd, off) == MAP_FAILED:
            err = errno
            munmap(base, length)
            raise GrantError(f"mapping page at offset {off:#x} failed", err)
        i += run
    return _wrap(base, length, writable, None)
