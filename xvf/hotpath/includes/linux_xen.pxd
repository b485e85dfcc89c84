# include/xvf/linux_xen.h: Linux's privcmd, evtchn and gntdev ioctls.
from libc.stdint cimport int16_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "xvf/linux_xen.h" nogil:
    unsigned int XVF_IOC_NONE, XVF_IOC_WRITE, XVF_IOC_READ
    ctypedef uint16_t xvf_domid_t

    # /dev/xen/privcmd
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
        uint8_t pad[2]
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
        uint8_t pad[2]
    unsigned long XVF_IOCTL_PRIVCMD_MMAPBATCH_V2, XVF_IOCTL_PRIVCMD_DM_OP
    unsigned long XVF_IOCTL_PRIVCMD_MMAP_RESOURCE, XVF_IOCTL_PRIVCMD_RESTRICT
    unsigned long XVF_IOCTL_PRIVCMD_IRQFD, XVF_IOCTL_PRIVCMD_IOEVENTFD
    unsigned long XVF_IOCTL_PRIVCMD_IRQFD_6_6_0
    unsigned int XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN, XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN

    # /dev/xen/evtchn
    ctypedef struct xvf_evtchn_bind_interdomain_t:
        unsigned int remote_domain
        unsigned int remote_port
    ctypedef struct xvf_evtchn_bind_unbound_port_t:
        unsigned int remote_domain
    ctypedef struct xvf_evtchn_port_arg_t:
        unsigned int port
    unsigned int XVF_DOMID_SELF
    unsigned long XVF_IOCTL_EVTCHN_BIND_INTERDOMAIN, XVF_IOCTL_EVTCHN_BIND_UNBOUND_PORT
    unsigned long XVF_IOCTL_EVTCHN_UNBIND
    unsigned long XVF_IOCTL_EVTCHN_NOTIFY, XVF_IOCTL_EVTCHN_RESET

    # /dev/xen/gntdev
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
    cdef struct xvf_gntdev_copy_foreign:
        uint32_t ref
        uint16_t offset
        uint16_t domid
    ctypedef union xvf_gntdev_copy_side_t:
        void *virt
        xvf_gntdev_copy_foreign foreign
    ctypedef struct xvf_gntdev_grant_copy_segment_t:
        xvf_gntdev_copy_side_t source
        xvf_gntdev_copy_side_t dest
        uint16_t len
        uint16_t flags
        int16_t status
    ctypedef struct xvf_gntdev_grant_copy_t:
        unsigned int count
        xvf_gntdev_grant_copy_segment_t *segments
    unsigned long XVF_IOCTL_GNTDEV_MAP_GRANT_REF, XVF_IOCTL_GNTDEV_UNMAP_GRANT_REF
    unsigned long XVF_IOCTL_GNTDEV_SET_MAX_GRANTS, XVF_IOCTL_GNTDEV_GRANT_COPY
