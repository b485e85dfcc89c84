# include/xvf/xen_dmop.h: the struct xen_dm_op members xvf issues.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "xvf/xen_dmop.h" nogil:
    unsigned int XVF_DMOP_create_ioreq_server, XVF_DMOP_get_ioreq_server_info
    unsigned int XVF_DMOP_map_io_range_to_ioreq_server
    unsigned int XVF_DMOP_unmap_io_range_from_ioreq_server
    unsigned int XVF_DMOP_set_ioreq_server_state, XVF_DMOP_destroy_ioreq_server
    unsigned int XVF_DMOP_set_irq_level, XVF_DMOP_nr_vcpus
    unsigned int XVF_DMOP_IO_RANGE_PORT, XVF_DMOP_IO_RANGE_MEMORY, XVF_DMOP_no_gfns
    unsigned int XVF_HVM_IOREQSRV_BUFIOREQ_OFF, XVF_DOMID_INVALID
    unsigned int XVF_DM_OP_UNION_SIZE

    ctypedef uint16_t xvf_ioservid_t

    ctypedef struct xvf_dm_op_create_ioreq_server_t:
        uint8_t handle_bufioreq
        xvf_ioservid_t id
    ctypedef struct xvf_dm_op_get_ioreq_server_info_t:
        xvf_ioservid_t id
        uint16_t flags
        uint32_t bufioreq_port
        uint64_t ioreq_gfn
        uint64_t bufioreq_gfn
    ctypedef struct xvf_dm_op_ioreq_server_range_t:
        xvf_ioservid_t id
        uint32_t type
        uint64_t start
        uint64_t end
    ctypedef struct xvf_dm_op_set_ioreq_server_state_t:
        xvf_ioservid_t id
        uint8_t enabled
    ctypedef struct xvf_dm_op_destroy_ioreq_server_t:
        xvf_ioservid_t id
    ctypedef struct xvf_dm_op_set_irq_level_t:
        uint32_t irq
        uint8_t level
    ctypedef struct xvf_dm_op_nr_vcpus_t:
        uint32_t vcpus

    # The header's anonymous union, as Cython needs a name for it; the C
    # compiler only ever sees the member accesses.
    ctypedef union xvf_dm_op_union:
        xvf_dm_op_create_ioreq_server_t create_ioreq_server
        xvf_dm_op_get_ioreq_server_info_t get_ioreq_server_info
        xvf_dm_op_ioreq_server_range_t map_io_range_to_ioreq_server
        xvf_dm_op_ioreq_server_range_t unmap_io_range_from_ioreq_server
        xvf_dm_op_set_ioreq_server_state_t set_ioreq_server_state
        xvf_dm_op_destroy_ioreq_server_t destroy_ioreq_server
        xvf_dm_op_set_irq_level_t set_irq_level
        xvf_dm_op_nr_vcpus_t nr_vcpus
    ctypedef struct xvf_dm_op_t:
        uint32_t op
        uint32_t pad
        xvf_dm_op_union u
