# include/xvf/xen_grant.h: grant table v1 entries and the grant DMA address encoding.
from libc.stdint cimport uint16_t, uint32_t

cdef extern from "xvf/xen_grant.h" nogil:
    ctypedef uint32_t xvf_grant_ref_t
    ctypedef struct xvf_grant_entry_v1_t:
        uint16_t flags
        uint16_t domid
        uint32_t frame
    unsigned int XVF_GTF_invalid, XVF_GTF_permit_access, XVF_GTF_type_mask
    unsigned int XVF_GTF_readonly, XVF_GTF_reading, XVF_GTF_writing
    unsigned int XVF_XEN_PAGE_SHIFT
    unsigned int XVF_GNTCOPY_source_gref, XVF_GNTCOPY_dest_gref
    int XVF_GNTST_okay, XVF_GNTST_general_error, XVF_GNTST_bad_domain, XVF_GNTST_bad_gntref
    int XVF_GNTST_permission_denied, XVF_GNTST_bad_copy_arg
    unsigned long long XVF_GRANT_DMA_ADDR_OFF
