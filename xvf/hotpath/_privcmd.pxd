from libc.stdint cimport uintptr_t


cdef class Mapping:
    cdef object _mm
    cdef public object view      # memoryview of the whole mapping
    cdef readonly uintptr_t address  # 0 once unmapped
    cdef readonly size_t length


cdef class Privcmd:
    cdef public int fd

    cdef int _probe_request(self, unsigned long request, void *arg) noexcept
