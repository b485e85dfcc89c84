# include/xvf/sim_grant_copy.h: the software Xen's GNTTABOP_copy, segment by segment.
from libc.stdint cimport int16_t, uint16_t, uint32_t, uint64_t

from xvf.hotpath.includes.linux_xen cimport xvf_gntdev_grant_copy_segment_t
from xvf.hotpath.includes.system cimport pthread_mutex_t
from xvf.hotpath.includes.xen_grant cimport xvf_grant_entry_v1_t

cdef extern from "xvf/sim_grant_copy.h" nogil:
    ctypedef struct xvf_sim_grant_lock_t:
        pthread_mutex_t mutex
        uint32_t alive
    ctypedef struct xvf_sim_area_t:
        uint64_t start
        uint64_t size
        char *base
    ctypedef struct xvf_sim_guest_view_t:
        xvf_sim_grant_lock_t *lock
        const xvf_grant_entry_v1_t *entries
        uint32_t nr_entries
        const xvf_sim_area_t *ram
        int nram
    int xvf_sim_grant_lock(xvf_sim_grant_lock_t *lock)
    void xvf_sim_grant_unlock(xvf_sim_grant_lock_t *lock)
    char *xvf_sim_find(const xvf_sim_area_t *areas, int n, uint64_t start, uint64_t length)
    int16_t xvf_sim_grant_side(const xvf_sim_guest_view_t *g, uint16_t caller, uint32_t ref,
                               uint16_t offset, uint16_t length, int writable, char **out)
    int xvf_sim_segment_domid(const xvf_gntdev_grant_copy_segment_t *s)
    int xvf_sim_copy_segment(const xvf_sim_guest_view_t *g, uint16_t caller,
                             const xvf_sim_area_t *local, int nlocal,
                             xvf_gntdev_grant_copy_segment_t *s)
