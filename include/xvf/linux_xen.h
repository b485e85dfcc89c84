/* Linux Xen driver ABI (uapi xen/privcmd.h, xen/evtchn.h, xen/gntdev.h) used by
 * xvf's real platform. Our own declarations, checked against linux-libc-dev by
 * tests/unit/test_abi_conformance.py. Only 64-bit Dom0s are supported. */
#ifndef XVF_LINUX_XEN_H
#define XVF_LINUX_XEN_H

#include <stdint.h>
#include <stddef.h>

/* asm-generic ioctl encoding (x86 and arm64): dir:2 | size:14 | type:8 | nr:8 */
#define XVF_IOC_NONE 0u
#define XVF_IOC_WRITE 1u
#define XVF_IOC_READ 2u
#define XVF_IOC(dir, type, nr, size) \
    (((unsigned long)(dir) << 30) | ((unsigned long)(size) << 16) | \
     ((unsigned long)(type) << 8) | (unsigned long)(nr))

typedef uint16_t xvf_domid_t;

/* ---- /dev/xen/privcmd ---- */
typedef struct xvf_privcmd_dm_op_buf {
    void *uptr;
    size_t size;
} xvf_privcmd_dm_op_buf_t;

typedef struct xvf_privcmd_dm_op {
    xvf_domid_t dom;
    uint16_t num;
    const xvf_privcmd_dm_op_buf_t *ubufs;
} xvf_privcmd_dm_op_t;

typedef struct xvf_privcmd_mmap_resource {
    xvf_domid_t dom;
    uint32_t type;
    uint32_t id;
    uint32_t idx;
    uint64_t num;
    uint64_t addr;
} xvf_privcmd_mmap_resource_t;

typedef struct xvf_privcmd_mmapbatch_v2 {
    unsigned int num;
    xvf_domid_t dom;
    uint64_t addr;
    const uint64_t *arr;     /* xen_pfn_t is 64-bit on arm64 and x86_64 */
    int *err;
} xvf_privcmd_mmapbatch_v2_t;

/* irqfd (Linux 6.6) and ioeventfd (6.7), built with CONFIG_XEN_PRIVCMD_EVENTFD;
 * probed at run time. Not in Debian 12's linux-libc-dev (6.1): checked against
 * Linux include/uapi/xen/privcmd.h (torvalds/linux 98b4eabe4175). */
#define XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN     1u
typedef struct xvf_privcmd_irqfd {
    uint64_t dm_op;          /* user pointer to a struct xen_dm_op */
    uint32_t size;
    uint32_t fd;
    uint32_t flags;
    xvf_domid_t dom;
    uint8_t pad[2];
} xvf_privcmd_irqfd_t;

#define XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN 1u
typedef struct xvf_privcmd_ioeventfd {
    uint64_t ioreq;          /* user pointer to the mapped ioreq page */
    uint64_t ports;          /* user pointer to uint32 ports, one per vCPU */
    uint64_t addr;
    uint32_t addr_len;
    uint32_t event_fd;
    uint32_t vcpus;
    uint32_t vq;
    uint32_t flags;
    xvf_domid_t dom;
    uint8_t pad[2];
} xvf_privcmd_ioeventfd_t;

#define XVF_IOCTL_PRIVCMD_MMAPBATCH_V2 XVF_IOC(XVF_IOC_NONE, 'P', 4, sizeof(xvf_privcmd_mmapbatch_v2_t))
#define XVF_IOCTL_PRIVCMD_DM_OP        XVF_IOC(XVF_IOC_NONE, 'P', 5, sizeof(xvf_privcmd_dm_op_t))
/* Limits an fd to one domain for good: what backends are handed to map a guest. */
#define XVF_IOCTL_PRIVCMD_RESTRICT     XVF_IOC(XVF_IOC_NONE, 'P', 6, sizeof(xvf_domid_t))
#define XVF_IOCTL_PRIVCMD_MMAP_RESOURCE XVF_IOC(XVF_IOC_NONE, 'P', 7, sizeof(xvf_privcmd_mmap_resource_t))
/* These two are _IOW (direction write), unlike the older privcmd ioctls. Linux
 * 6.6.0 shipped IRQFD as _IOC_NONE; 6.6 stable and 6.7 changed it to _IOW. */
#define XVF_IOCTL_PRIVCMD_IRQFD        XVF_IOC(XVF_IOC_WRITE, 'P', 8, sizeof(xvf_privcmd_irqfd_t))
#define XVF_IOCTL_PRIVCMD_IOEVENTFD    XVF_IOC(XVF_IOC_WRITE, 'P', 9, sizeof(xvf_privcmd_ioeventfd_t))
#define XVF_IOCTL_PRIVCMD_IRQFD_6_6_0  XVF_IOC(XVF_IOC_NONE, 'P', 8, sizeof(xvf_privcmd_irqfd_t))

/* ---- /dev/xen/evtchn ---- */
typedef struct xvf_evtchn_bind_interdomain {
    unsigned int remote_domain;
    unsigned int remote_port;
} xvf_evtchn_bind_interdomain_t;
typedef struct xvf_evtchn_bind_unbound_port {
    unsigned int remote_domain;
} xvf_evtchn_bind_unbound_port_t;
typedef struct xvf_evtchn_port_arg {   /* unbind and notify take one port */
    unsigned int port;
} xvf_evtchn_port_arg_t;

/* "This domain" (public/xen.h): a port allocated for, and bound from, DOMID_SELF is a
 * loopback channel, both ends on one handle (Xen's evtchn_bind_interdomain allows
 * the remote domain to be the caller). */
#define XVF_DOMID_SELF 0x7ff0u

#define XVF_IOCTL_EVTCHN_BIND_INTERDOMAIN XVF_IOC(XVF_IOC_NONE, 'E', 1, sizeof(xvf_evtchn_bind_interdomain_t))
#define XVF_IOCTL_EVTCHN_BIND_UNBOUND_PORT XVF_IOC(XVF_IOC_NONE, 'E', 2, sizeof(xvf_evtchn_bind_unbound_port_t))
#define XVF_IOCTL_EVTCHN_UNBIND          XVF_IOC(XVF_IOC_NONE, 'E', 3, sizeof(xvf_evtchn_port_arg_t))
#define XVF_IOCTL_EVTCHN_NOTIFY          XVF_IOC(XVF_IOC_NONE, 'E', 4, sizeof(xvf_evtchn_port_arg_t))
#define XVF_IOCTL_EVTCHN_RESET           XVF_IOC(XVF_IOC_NONE, 'E', 5, 0)

/* ---- /dev/xen/gntdev ---- */
typedef struct xvf_gntdev_grant_ref {
    uint32_t domid;
    uint32_t ref;
} xvf_gntdev_grant_ref_t;

typedef struct xvf_gntdev_map_grant_ref {
    uint32_t count;
    uint32_t pad;
    uint64_t index;                    /* OUT: mmap offset of the mapping */
    xvf_gntdev_grant_ref_t refs[1];    /* count entries */
} xvf_gntdev_map_grant_ref_t;

typedef struct xvf_gntdev_unmap_grant_ref {
    uint64_t index;
    uint32_t count;
    uint32_t pad;
} xvf_gntdev_unmap_grant_ref_t;

typedef struct xvf_gntdev_set_max_grants {
    uint32_t count;
} xvf_gntdev_set_max_grants_t;

/* One copy between a grant and this process's memory (GNTTABOP_copy through gntdev).
 * The grant side may not cross its page; the local side may. status: GNTST_*. */
typedef union xvf_gntdev_copy_side {
    void *virt;                         /* this process's memory */
    struct xvf_gntdev_copy_foreign {
        uint32_t ref;
        uint16_t offset;                /* in the granted page */
        xvf_domid_t domid;
    } foreign;
} xvf_gntdev_copy_side_t;

typedef struct xvf_gntdev_grant_copy_segment {
    xvf_gntdev_copy_side_t source, dest;
    uint16_t len;
    uint16_t flags;                     /* XVF_GNTCOPY_source_gref | XVF_GNTCOPY_dest_gref */
    int16_t status;                     /* OUT */
} xvf_gntdev_grant_copy_segment_t;

typedef struct xvf_gntdev_grant_copy {
    unsigned int count;
    xvf_gntdev_grant_copy_segment_t *segments;
} xvf_gntdev_grant_copy_t;

#define XVF_IOCTL_GNTDEV_MAP_GRANT_REF   XVF_IOC(XVF_IOC_NONE, 'G', 0, sizeof(xvf_gntdev_map_grant_ref_t))
#define XVF_IOCTL_GNTDEV_UNMAP_GRANT_REF XVF_IOC(XVF_IOC_NONE, 'G', 1, sizeof(xvf_gntdev_unmap_grant_ref_t))
#define XVF_IOCTL_GNTDEV_SET_MAX_GRANTS  XVF_IOC(XVF_IOC_NONE, 'G', 3, sizeof(xvf_gntdev_set_max_grants_t))
#define XVF_IOCTL_GNTDEV_GRANT_COPY      XVF_IOC(XVF_IOC_NONE, 'G', 8, sizeof(xvf_gntdev_grant_copy_t))

#endif
