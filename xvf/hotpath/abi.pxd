# Cython mirror of include/xvf/*.h: the only place Cython sees C declarations.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "xvf/xen_ioreq.h":
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

cdef extern from "xvf/xen_dmop.h":
    unsigned int XVF_DMOP_create_ioreq_server, XVF_DMOP_get_ioreq_server_info
    unsigned int XVF_DMOP_map_io_range_to_ioreq_server
    unsigned int XVF_DMOP_unmap_io_range_from_ioreq_server
    unsigned int XVF_DMOP_set_ioreq_server_state, XVF_DMOP_destroy_ioreq_server
    unsigned int XVF_DMOP_set_irq_level, XVF_DMOP_nr_vcpus
    unsigned int XVF_DMOP_IO_RANGE_PORT, XVF_DMOP_IO_RANGE_MEMORY, XVF_DMOP_no_gfns
    unsigned int XVF_DM_OP_UNION_SIZE

    ctypedef uint16_t xvf_ioservid_t
    ctypedef struct xvf_dm_op_set_irq_level_t:
        uint32_t irq
        uint8_t level
    ctypedef union xvf_dm_op_union:
        xvf_dm_op_set_irq_level_t set_irq_level
        uint8_t raw[24]
    ctypedef struct xvf_dm_op_t:
        uint32_t op
        uint32_t pad
        xvf_dm_op_union u

cdef extern from "xvf/xen_grant.h":
    ctypedef struct xvf_grant_entry_v1_t:
        uint16_t flags
        uint16_t domid
        uint32_t frame
    unsigned int XVF_GTF_permit_access, XVF_GTF_type_mask, XVF_GTF_readonly
    unsigned int XVF_GTF_reading, XVF_GTF_writing, XVF_XEN_PAGE_SHIFT
    unsigned long long XVF_GRANT_DMA_ADDR_OFF

cdef extern from "xvf/virtio_mmio.h":
    unsigned int XVF_VIRTIO_MMIO_QUEUE_NOTIFY, XVF_VIRTIO_MMIO_INTERRUPT_STATUS
    unsigned int XVF_VIRTIO_MMIO_INTERRUPT_ACK, XVF_VIRTIO_MMIO_STATUS
    unsigned int XVF_VIRTIO_MMIO_INT_VRING, XVF_VIRTIO_MMIO_INT_CONFIG
    unsigned int XVF_VIRTIO_STATUS_DRIVER_OK, XVF_VIRTIO_STATUS_DEVICE_NEEDS_RESET

cdef extern from "xvf/linux_xen.h":
    ctypedef uint16_t xvf_domid_t
    ctypedef struct xvf_privcmd_dm_op_buf_t:
        void *uptr
        size_t size
    ctypedef struct xvf_privcmd_dm_op_t:
        xvf_domid_t dom
        uint16_t num
        const xvf_privcmd_dm_op_buf_t *ubufs
    ctypedef struct xvf_privcmd_mmap_resource_t:
        xvf_domid_t dom
        uint32_t type
        uint32_t id
        uint32_t idx
        uint64_t num
        uint64_t addr
    ctypedef struct xvf_privcmd_mmapbatch_v2_t:
        unsigned int num
        xvf_domid_t dom
        uint64_t addr
        const uint64_t *arr
        int *err
    ctypedef struct xvf_privcmd_irqfd_t:
        uint64_t dm_op
        uint32_t size
        uint32_t fd
        uint32_t flags
        xvf_domid_t dom
    ctypedef struct xvf_privcmd_ioeventfd_t:
        uint64_t ioreq
        uint64_t ports
        uint64_t addr
        uint32_t addr_len
        uint32_t event_fd
        uint32_t vcpus
        uint32_t vq
        uint32_t flags
        xvf_domid_t dom
    unsigned long XVF_IOCTL_PRIVCMD_MMAPBATCH_V2, XVF_IOCTL_PRIVCMD_DM_OP
    unsigned long XVF_IOCTL_PRIVCMD_RESTRICT, XVF_IOCTL_PRIVCMD_MMAP_RESOURCE
    unsigned long XVF_IOCTL_PRIVCMD_IRQFD, XVF_IOCTL_PRIVCMD_IOEVENTFD
    unsigned int XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN, XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN

    ctypedef struct xvf_evtchn_bind_interdomain_t:
        unsigned int remote_domain
        unsigned int remote_port
    ctypedef struct xvf_evtchn_port_arg_t:
        unsigned int port
    ctypedef struct xvf_evtchn_restrict_domid_t:
        xvf_domid_t domid
    unsigned long XVF_IOCTL_EVTCHN_BIND_INTERDOMAIN, XVF_IOCTL_EVTCHN_UNBIND
    unsigned long XVF_IOCTL_EVTCHN_NOTIFY, XVF_IOCTL_EVTCHN_RESET
    unsigned long XVF_IOCTL_EVTCHN_RESTRICT_DOMID

    ctypedef struct xvf_gntdev_grant_ref_t:
        uint32_t domid
        uint32_t ref
    ctypedef struct xvf_gntdev_map_grant_ref_t:
        uint32_t count
        uint32_t pad
        uint64_t index
        xvf_gntdev_grant_ref_t refs[1]
    ctypedef struct xvf_gntdev_unmap_grant_ref_t:
        uint64_t index
        uint32_t count
        uint32_t pad
    ctypedef struct xvf_gntdev_set_max_grants_t:
        uint32_t count
    unsigned long XVF_IOCTL_GNTDEV_MAP_GRANT_REF, XVF_IOCTL_GNTDEV_UNMAP_GRANT_REF
    unsigned long XVF_IOCTL_GNTDEV_SET_MAX_GRANTS

cdef extern from "xvf/sim_abi.h":
    unsigned int XVF_SIM_EVTCHN_NOTIFY, XVF_SIM_OP_DM_OP

cdef extern from "xvf/linux_xen.h":
    unsigned int XVF_IOC_NONE, XVF_IOC_WRITE, XVF_IOC_READ
    unsigned long XVF_IOCTL_PRIVCMD_IRQFD_6_6_0

cdef extern from "xvf/xen_arm.h":
    unsigned int XVF_GUEST_RAM_BANKS
    unsigned long long XVF_GUEST_RAM0_BASE, XVF_GUEST_RAM0_SIZE
    unsigned long long XVF_GUEST_RAM1_BASE, XVF_GUEST_RAM1_SIZE
    unsigned long long XVF_GUEST_VIRTIO_MMIO_BASE, XVF_GUEST_VIRTIO_MMIO_SIZE
    unsigned int XVF_GUEST_VIRTIO_MMIO_SPI_FIRST, XVF_GUEST_VIRTIO_MMIO_SPI_LAST
