from libc.stdint cimport uint64_t, uint32_t

from xvf.hotpath.includes.linux_xen cimport xvf_gntdev_grant_copy_segment_t


cdef class GrantMapping:
    cdef void *addr
    cdef size_t length
    cdef readonly bint writable
    cdef object _unmap   # callable() run at close, or None
    cdef int _exports


cdef class GrantCopier:
    cdef readonly uint64_t calls      # copy calls made
    cdef readonly uint64_t segments   # segments they carried
    cdef int run(self, xvf_gntdev_grant_copy_segment_t *segs, unsigned int count) noexcept nogil
    cdef int c_copy(self, xvf_gntdev_grant_copy_segment_t *segs,
                    unsigned int count) noexcept nogil


cdef class GntDev(GrantCopier):
    cdef readonly int fd


cdef GrantMapping _wrap(void *addr, size_t length, bint writable, object unmap)
