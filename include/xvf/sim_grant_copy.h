/* The software Xen's GNTTABOP_copy, one segment at a time, for a caller that maps what
 * Xen sees of a guest: its RAM, its grant table and its grant-table lock page (the
 * software Xen hands these over: xvf/platform/sim/control.py, OP_GNT_COPY_DOMAIN).
 * Not Xen's ABI: the simulator's own, shared by xvf/platform/sim/_grant_copy.pyx (the
 * copier xvf's relay calls) and the C device model of the benchmarks
 * (benchmarks/c/blk_dm.c), so that both run the same hypercall.
 *
 * The statuses are Xen's (public/grant_table.h): GNTST_bad_gntref for a ref outside
 * the table, GNTST_general_error for a grant that is not to the caller, read-only as a
 * destination, or of a frame that is not RAM. A malformed segment is EINVAL for the
 * whole call (gntdev refuses it), memory the caller did not share EFAULT (gntdev's
 * get_user_pages). The caller holds the guest's lock over the segments it copies. */
#ifndef XVF_SIM_GRANT_COPY_H
#define XVF_SIM_GRANT_COPY_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "xvf/linux_xen.h"
#include "xvf/xen_grant.h"

/* The lock page: one robust process-shared mutex over a guest's grant table, taken by
 * the software Xen for the guest's grant operations and by every copier for a copy. */
typedef struct xvf_sim_grant_lock {
    pthread_mutex_t mutex;
    uint32_t alive;  /* 0 once the domain is gone: its grants answer GNTST_bad_domain */
} xvf_sim_grant_lock_t;

/* A range of memory a copy may use: a guest RAM bank (start is a gpa) or a range of
 * the caller's own memory (start is its address). base: where it lies in the caller. */
typedef struct xvf_sim_area {
    uint64_t start;
    uint64_t size;
    char *base;
} xvf_sim_area_t;

/* A guest as a copier sees it. */
typedef struct xvf_sim_guest_view {
    xvf_sim_grant_lock_t *lock;
    const xvf_grant_entry_v1_t *entries;
    uint32_t nr_entries;
    const xvf_sim_area_t *ram;
    int nram;
} xvf_sim_guest_view_t;

/* Take the lock; a holder that died leaves it consistent (its copy no longer matters). */
static inline int xvf_sim_grant_lock(xvf_sim_grant_lock_t *lock) {
    int rc = pthread_mutex_lock(&lock->mutex);
    if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(&lock->mutex);
    return rc;
}

static inline void xvf_sim_grant_unlock(xvf_sim_grant_lock_t *lock) {
    pthread_mutex_unlock(&lock->mutex);
}

/* Where [start, start + length) lies in the caller, or NULL if no area holds it all. */
static inline char *xvf_sim_find(const xvf_sim_area_t *areas, int n, uint64_t start,
                                 uint64_t length) {
    for (int i = 0; i < n; i++) {
        if (start < areas[i].start) continue;
        uint64_t into = start - areas[i].start;
        if (into <= areas[i].size && length <= areas[i].size - into) return areas[i].base + into;
    }
    return NULL;
}

/* One grant side of a copy: the guest's bytes in the caller (*out), or a GNTST_*. */
static inline int16_t xvf_sim_grant_side(const xvf_sim_guest_view_t *g, uint16_t caller,
                                         uint32_t ref, uint16_t offset, uint16_t length,
                                         int writable, char **out) {
    if (g == NULL) return XVF_GNTST_bad_domain;
    if (ref >= g->nr_entries) return XVF_GNTST_bad_gntref;
    const xvf_grant_entry_v1_t *e = &g->entries[ref];
    if ((e->flags & XVF_GTF_type_mask) != XVF_GTF_permit_access || e->domid != caller)
        return XVF_GNTST_general_error;
    if (writable && (e->flags & XVF_GTF_readonly)) return XVF_GNTST_general_error;
    uint64_t gpa = ((uint64_t)e->frame << XVF_XEN_PAGE_SHIFT) + offset;
    *out = xvf_sim_find(g->ram, g->nram, gpa, length);
    return *out ? XVF_GNTST_okay : XVF_GNTST_general_error;
}

/* The domain a segment's grant side names; -EINVAL for a segment gntdev refuses. */
static inline int xvf_sim_segment_domid(const xvf_gntdev_grant_copy_segment_t *s) {
    const uint64_t page = 1ull << XVF_XEN_PAGE_SHIFT;
    if (!(s->flags & (XVF_GNTCOPY_source_gref | XVF_GNTCOPY_dest_gref))) return -EINVAL;
    if ((s->flags & XVF_GNTCOPY_source_gref) && s->source.foreign.offset + s->len > page)
        return -EINVAL;  /* a copy across a page of the grant */
    if ((s->flags & XVF_GNTCOPY_dest_gref) && s->dest.foreign.offset + s->len > page)
        return -EINVAL;
    return (s->flags & XVF_GNTCOPY_source_gref) ? s->source.foreign.domid : s->dest.foreign.domid;
}

/* One side of a copy: a grant of guest g, or the caller's memory. A status, and
 * *out where its bytes lie (NULL: memory the caller did not share). */
static inline int16_t xvf_sim_copy_side(const xvf_sim_guest_view_t *g, uint16_t caller,
                                        const xvf_sim_area_t *local, int nlocal,
                                        const xvf_gntdev_copy_side_t *side, int is_gref,
                                        uint16_t length, int writable, char **out) {
    if (is_gref)
        return xvf_sim_grant_side(g, caller, side->foreign.ref, side->foreign.offset, length,
                                  writable, out);
    *out = xvf_sim_find(local, nlocal, (uint64_t)(uintptr_t)side->virt, length);
    return XVF_GNTST_okay;
}

/* Copy one segment of guest g (locked by the caller; NULL: the domain is gone),
 * setting its status; -EFAULT if it names memory the caller did not share. */
static inline int xvf_sim_copy_segment(const xvf_sim_guest_view_t *g, uint16_t caller,
                                       const xvf_sim_area_t *local, int nlocal,
                                       xvf_gntdev_grant_copy_segment_t *s) {
    char *src = NULL, *dst = NULL;
    int16_t status = xvf_sim_copy_side(g, caller, local, nlocal, &s->source,
                                       s->flags & XVF_GNTCOPY_source_gref, s->len, 0, &src);
    if (status == XVF_GNTST_okay)
        status = xvf_sim_copy_side(g, caller, local, nlocal, &s->dest,
                                   s->flags & XVF_GNTCOPY_dest_gref, s->len, 1, &dst);
    if (status == XVF_GNTST_okay) {
        if (src == NULL || dst == NULL) return -EFAULT;
        memcpy(dst, src, s->len);
    }
    s->status = status;
    return 0;
}

#endif
