# Cython declaration of include/xvf/virtio_ring.h (the split virtqueue layout).
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "xvf/virtio_ring.h":
    unsigned int XVF_VRING_DESC_F_NEXT, XVF_VRING_DESC_F_WRITE, XVF_VRING_DESC_F_INDIRECT
    unsigned int XVF_VRING_AVAIL_F_NO_INTERRUPT, XVF_VRING_USED_F_NO_NOTIFY
    unsigned int XVF_VRING_DESC_ALIGN, XVF_VRING_AVAIL_ALIGN, XVF_VRING_USED_ALIGN
    unsigned int XVF_VRING_MAX_SIZE

    ctypedef struct xvf_vring_desc_t:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next

    # `ring` is a C flexible array member; Cython only takes its address.
    ctypedef struct xvf_vring_avail_t:
        uint16_t flags
        uint16_t idx
        uint16_t ring[1]

    ctypedef struct xvf_vring_used_elem_t:
        uint32_t id
        uint32_t len

    ctypedef struct xvf_vring_used_t:
        uint16_t flags
        uint16_t idx
        xvf_vring_used_elem_t ring[1]

    size_t XVF_VRING_DESC_BYTES(unsigned int num)
    size_t XVF_VRING_AVAIL_BYTES(unsigned int num)
    size_t XVF_VRING_USED_BYTES(unsigned int num)
