# include/xvf/xen_ioreq.h: Xen's IOREQ slot and its constants.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "xvf/xen_ioreq.h" nogil:
    unsigned int XVF_IOREQ_READ, XVF_IOREQ_WRITE
    unsigned int XVF_STATE_IOREQ_NONE, XVF_STATE_IOREQ_READY
    unsigned int XVF_STATE_IOREQ_INPROCESS, XVF_STATE_IORESP_READY
    unsigned int XVF_IOREQ_TYPE_PIO, XVF_IOREQ_TYPE_COPY, XVF_IOREQ_TYPE_PCI_CONFIG
    unsigned int XVF_IOREQ_TYPE_TIMEOFFSET, XVF_IOREQ_TYPE_INVALIDATE
    unsigned int XVF_IOREQ_STATE_MASK, XVF_IOREQ_DATA_IS_PTR_BIT, XVF_IOREQ_DIR_BIT
    unsigned int XVF_IOREQ_DF_BIT
    unsigned int XVF_IOREQ_SIZE, XVF_PAGE_SIZE, XVF_IOREQ_SLOTS_PER_PAGE
    unsigned int XVF_XENMEM_RESOURCE_IOREQ_SERVER, XVF_IOREQ_SERVER_FRAME_BUFIOREQ
    unsigned int XVF_IOREQ_SERVER_FRAME_IOREQ(unsigned int n)

    ctypedef struct xvf_ioreq_t:
        uint64_t addr
        uint64_t data
        uint32_t count
        uint32_t size
        uint32_t vp_eport
        uint16_t pad0
        uint8_t flags
        uint8_t type
