# Cython declaration of include/xvf/barrier.h (fences and index loads/stores).
from libc.stdint cimport uint16_t

cdef extern from "xvf/barrier.h" nogil:
    void xvf_acquire()
    void xvf_release()
    void xvf_full()
    uint16_t xvf_load_u16(const uint16_t *p)
    void xvf_store_u16(uint16_t *p, uint16_t v)
