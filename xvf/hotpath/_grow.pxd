# One way to grow a C table in place, for the hot path's modules (cimport regrow).
from libc.stdlib cimport realloc


cdef inline bint regrow(void **table, size_t size) noexcept nogil:
    """Grow *table to `size` bytes; False, with *table untouched, if out of memory."""
    cdef void *grown = realloc(table[0], size)
    if grown == NULL:
        return False
    table[0] = grown
    return True
