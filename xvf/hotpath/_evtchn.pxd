from libc.stdint cimport uint32_t


cdef class EventChannel:
    cdef public int fd
    # The nogil hot-path calls; a subclass (the simulator's) may override them.
    cdef int c_notify(self, uint32_t port) noexcept nogil
    cdef int c_unmask(self, uint32_t port) noexcept nogil
    cdef int c_unmask_many(self, uint32_t *ports, int n) noexcept nogil
    cdef int c_read_pending(self, uint32_t *ports, int max_ports) noexcept nogil
    cdef int c_set_blocking(self, bint blocking) noexcept nogil
