from libc.stdint cimport uint64_t, uint32_t


cdef class GrantMapping:
    cdef void *addr
    cdef size_t length
    cdef readonly bint writable
    cdef object _unmap   # callable() run at close, or None
    cdef int _exports


cdef class GntDev:
    cdef readonly int fd


cdef GrantMapping _wrap(void *addr, size_t length, bint writable, object unmap)
