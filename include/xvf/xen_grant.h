/* Xen grant table v1 entries and flags (Xen public/grant_table.h) and the
 * address encoding of Linux's Xen grant DMA ops (drivers/xen/grant-dma-ops.c). */
#ifndef XVF_XEN_GRANT_H
#define XVF_XEN_GRANT_H

#include <stdint.h>

typedef uint32_t xvf_grant_ref_t;

typedef struct xvf_grant_entry_v1 {
    uint16_t flags;     /* GTF_* */
    uint16_t domid;     /* domain allowed to map the frame */
    uint32_t frame;     /* guest frame number being granted */
} xvf_grant_entry_v1_t;

#define XVF_GTF_invalid         0u
#define XVF_GTF_permit_access   1u
#define XVF_GTF_type_mask       3u
#define XVF_GTF_readonly        (1u << 2)
#define XVF_GTF_reading         (1u << 3)
#define XVF_GTF_writing         (1u << 4)

/* GNTTABOP_copy: which sides of a copy are grant refs, and its per-op status. */
#define XVF_GNTCOPY_source_gref (1u << 0)
#define XVF_GNTCOPY_dest_gref   (1u << 1)
#define XVF_GNTST_okay              0
#define XVF_GNTST_general_error     (-1)
#define XVF_GNTST_bad_domain        (-2)
#define XVF_GNTST_bad_gntref        (-3)
#define XVF_GNTST_permission_denied (-8)
#define XVF_GNTST_bad_copy_arg      (-10)

/* A grant DMA address is (ref << PAGE_SHIFT) + offset with bit 63 set. */
#define XVF_GRANT_DMA_ADDR_OFF  (1ull << 63)
#define XVF_XEN_PAGE_SHIFT      12u

#endif
