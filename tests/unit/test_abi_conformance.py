"""include/xvf/*.h against the real ABI: Debian's libxen-dev and linux-libc-dev headers.

Each header group is one C program that includes both the system's declarations
and ours and states, with _Static_assert, that every size, offset, constant and
ioctl number agrees; the native build also runs, for checks only the running
compiler can make (the ioreq bit-field byte). When the aarch64 cross compiler is
installed the same programs are compiled for aarch64 as well, the Dom0
architecture xvf targets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INCLUDE = REPO / "include"
SYS = Path("/usr/include")

# Where the ioctls Debian 12's linux-libc-dev (6.1) lacks were checked by hand.
IRQFD_SOURCE = (
    "Linux include/uapi/xen/privcmd.h at torvalds/linux 98b4eabe4175 (IOCTL_PRIVCMD_IRQFD "
    "= _IOW('P', 8, struct privcmd_irqfd), IOCTL_PRIVCMD_IOEVENTFD = _IOW('P', 9, ...)) and "
    "the 6.6-stable patch 'xen: irqfd: Use _IOW instead of the internal _IOC() macro'"
)

PRELUDE = r"""
#define __XEN_TOOLS__ 1
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#define SAME_VAL(a, b) _Static_assert((unsigned long long)(a) == (unsigned long long)(b), \
    "value: " #a " != " #b)
#define SAME_SIZE(a, b) _Static_assert(sizeof(a) == sizeof(b), "size: " #a " != " #b)
#define SAME_FIELD(ta, fa, tb, fb) \
    _Static_assert(offsetof(ta, fa) == offsetof(tb, fb), \
        "offset: " #ta "." #fa " != " #tb "." #fb); \
    _Static_assert(sizeof(((ta *)0)->fa) == sizeof(((tb *)0)->fb), \
        "field size: " #ta "." #fa " != " #tb "." #fb)
"""

IOREQ = r"""
#include <xen/xen.h>
#include <xen/hvm/ioreq.h>
#include <xen/memory.h>
#include "xvf/xen_ioreq.h"

SAME_SIZE(ioreq_t, xvf_ioreq_t);
SAME_VAL(sizeof(ioreq_t), XVF_IOREQ_SIZE);
SAME_FIELD(ioreq_t, addr, xvf_ioreq_t, addr);
SAME_FIELD(ioreq_t, data, xvf_ioreq_t, data);
SAME_FIELD(ioreq_t, count, xvf_ioreq_t, count);
SAME_FIELD(ioreq_t, size, xvf_ioreq_t, size);
SAME_FIELD(ioreq_t, vp_eport, xvf_ioreq_t, vp_eport);
SAME_FIELD(ioreq_t, _pad0, xvf_ioreq_t, pad0);
SAME_FIELD(ioreq_t, type, xvf_ioreq_t, type);
/* the bit-field byte sits between _pad0 and type */
_Static_assert(offsetof(xvf_ioreq_t, flags) == offsetof(ioreq_t, _pad0) + 2, "flags byte");
_Static_assert(offsetof(ioreq_t, type) == offsetof(ioreq_t, _pad0) + 3, "one bit-field byte");
SAME_VAL(sizeof(shared_iopage_t), XVF_IOREQ_SIZE);  /* one slot per vCPU, no header */

SAME_VAL(IOREQ_READ, XVF_IOREQ_READ);
SAME_VAL(IOREQ_WRITE, XVF_IOREQ_WRITE);
SAME_VAL(STATE_IOREQ_NONE, XVF_STATE_IOREQ_NONE);
SAME_VAL(STATE_IOREQ_READY, XVF_STATE_IOREQ_READY);
SAME_VAL(STATE_IOREQ_INPROCESS, XVF_STATE_IOREQ_INPROCESS);
SAME_VAL(STATE_IORESP_READY, XVF_STATE_IORESP_READY);
SAME_VAL(IOREQ_TYPE_PIO, XVF_IOREQ_TYPE_PIO);
SAME_VAL(IOREQ_TYPE_COPY, XVF_IOREQ_TYPE_COPY);
SAME_VAL(IOREQ_TYPE_PCI_CONFIG, XVF_IOREQ_TYPE_PCI_CONFIG);
SAME_VAL(IOREQ_TYPE_TIMEOFFSET, XVF_IOREQ_TYPE_TIMEOFFSET);
SAME_VAL(IOREQ_TYPE_INVALIDATE, XVF_IOREQ_TYPE_INVALIDATE);

SAME_VAL(XENMEM_resource_ioreq_server, XVF_XENMEM_RESOURCE_IOREQ_SERVER);
SAME_VAL(XENMEM_resource_ioreq_server_frame_bufioreq, XVF_IOREQ_SERVER_FRAME_BUFIOREQ);
SAME_VAL(XENMEM_resource_ioreq_server_frame_ioreq(0), XVF_IOREQ_SERVER_FRAME_IOREQ(0));
SAME_VAL(XENMEM_resource_ioreq_server_frame_ioreq(7), XVF_IOREQ_SERVER_FRAME_IOREQ(7));

int main(void) {
    /* Bit-field order is the compiler's: set each field through Xen's
     * declaration and read the byte through our masks. */
    int bad = 0;
    for (unsigned st = 0; st < 16; st++)
    for (unsigned dip = 0; dip < 2; dip++)
    for (unsigned dir = 0; dir < 2; dir++)
    for (unsigned df = 0; df < 2; df++) {
        ioreq_t x; xvf_ioreq_t o;
        memset(&x, 0, sizeof(x));
        x.state = st; x.data_is_ptr = dip; x.dir = dir; x.df = df; x.type = 0xa5;
        memcpy(&o, &x, sizeof(o));
        unsigned want = st | (dip ? XVF_IOREQ_DATA_IS_PTR_BIT : 0)
            | (dir ? XVF_IOREQ_DIR_BIT : 0) | (df ? XVF_IOREQ_DF_BIT : 0);
        if (o.flags != want || o.type != 0xa5 || (o.flags & XVF_IOREQ_STATE_MASK) != st) {
            printf("MISMATCH state=%u dip=%u dir=%u df=%u: byte %#x, masks give %#x\n",
                   st, dip, dir, df, o.flags, want);
            bad = 1;
        }
    }
    /* And the other way: our byte read through Xen's bit fields. */
    xvf_ioreq_t o; ioreq_t x;
    memset(&o, 0, sizeof(o));
    o.flags = XVF_STATE_IORESP_READY | XVF_IOREQ_DIR_BIT;
    memcpy(&x, &o, sizeof(x));
    if (x.state != STATE_IORESP_READY || x.dir != IOREQ_READ || x.data_is_ptr || x.df) {
        printf("MISMATCH reading our byte through Xen's fields\n");
        bad = 1;
    }
    if (!bad) printf("ok\n");
    return bad;
}
"""

DMOP = r"""
#include <xen/xen.h>
#include <xen/hvm/dm_op.h>
#include <xen/hvm/hvm_op.h>
#include "xvf/xen_dmop.h"

typedef struct xen_dm_op X;
SAME_SIZE(X, xvf_dm_op_t);
SAME_FIELD(X, op, xvf_dm_op_t, op);
SAME_FIELD(X, pad, xvf_dm_op_t, pad);
SAME_FIELD(X, u, xvf_dm_op_t, u);
SAME_VAL(sizeof(((X *)0)->u), XVF_DM_OP_UNION_SIZE);

SAME_VAL(XEN_DMOP_create_ioreq_server, XVF_DMOP_create_ioreq_server);
SAME_VAL(XEN_DMOP_get_ioreq_server_info, XVF_DMOP_get_ioreq_server_info);
SAME_VAL(XEN_DMOP_map_io_range_to_ioreq_server, XVF_DMOP_map_io_range_to_ioreq_server);
SAME_VAL(XEN_DMOP_unmap_io_range_from_ioreq_server, XVF_DMOP_unmap_io_range_from_ioreq_server);
SAME_VAL(XEN_DMOP_set_ioreq_server_state, XVF_DMOP_set_ioreq_server_state);
SAME_VAL(XEN_DMOP_destroy_ioreq_server, XVF_DMOP_destroy_ioreq_server);
SAME_VAL(XEN_DMOP_set_irq_level, XVF_DMOP_set_irq_level);
SAME_VAL(XEN_DMOP_nr_vcpus, XVF_DMOP_nr_vcpus);
SAME_VAL(XEN_DMOP_IO_RANGE_PORT, XVF_DMOP_IO_RANGE_PORT);
SAME_VAL(XEN_DMOP_IO_RANGE_MEMORY, XVF_DMOP_IO_RANGE_MEMORY);
SAME_VAL(XEN_DMOP_no_gfns, XVF_DMOP_no_gfns);
SAME_VAL(HVM_IOREQSRV_BUFIOREQ_OFF, XVF_HVM_IOREQSRV_BUFIOREQ_OFF);
SAME_VAL(DOMID_INVALID, XVF_DOMID_INVALID);
SAME_SIZE(ioservid_t, xvf_ioservid_t);

/* the same union member, by name, in both */
#define DM(m) SAME_FIELD(X, u.m, xvf_dm_op_t, u.m)
SAME_SIZE(xen_dm_op_create_ioreq_server_t, xvf_dm_op_create_ioreq_server_t);
DM(create_ioreq_server.handle_bufioreq);
DM(create_ioreq_server.pad);
DM(create_ioreq_server.id);

SAME_SIZE(xen_dm_op_get_ioreq_server_info_t, xvf_dm_op_get_ioreq_server_info_t);
DM(get_ioreq_server_info.id);
DM(get_ioreq_server_info.flags);
DM(get_ioreq_server_info.bufioreq_port);
DM(get_ioreq_server_info.ioreq_gfn);
DM(get_ioreq_server_info.bufioreq_gfn);

SAME_SIZE(xen_dm_op_ioreq_server_range_t, xvf_dm_op_ioreq_server_range_t);
DM(map_io_range_to_ioreq_server.id);
DM(map_io_range_to_ioreq_server.pad);
DM(map_io_range_to_ioreq_server.type);
DM(map_io_range_to_ioreq_server.start);
DM(map_io_range_to_ioreq_server.end);
DM(unmap_io_range_from_ioreq_server.end);

SAME_SIZE(xen_dm_op_set_ioreq_server_state_t, xvf_dm_op_set_ioreq_server_state_t);
DM(set_ioreq_server_state.id);
DM(set_ioreq_server_state.enabled);
DM(set_ioreq_server_state.pad);

SAME_SIZE(xen_dm_op_destroy_ioreq_server_t, xvf_dm_op_destroy_ioreq_server_t);
DM(destroy_ioreq_server.id);
DM(destroy_ioreq_server.pad);

SAME_SIZE(xen_dm_op_set_irq_level_t, xvf_dm_op_set_irq_level_t);
DM(set_irq_level.irq);
DM(set_irq_level.level);
DM(set_irq_level.pad);

SAME_SIZE(xen_dm_op_nr_vcpus_t, xvf_dm_op_nr_vcpus_t);
DM(nr_vcpus.vcpus);

int main(void) { printf("ok\n"); return 0; }
"""

GRANT = r"""
#include <xen/xen.h>
#include <xen/grant_table.h>
#include "xvf/xen_grant.h"

SAME_SIZE(grant_ref_t, xvf_grant_ref_t);
SAME_SIZE(grant_entry_v1_t, xvf_grant_entry_v1_t);
SAME_FIELD(grant_entry_v1_t, flags, xvf_grant_entry_v1_t, flags);
SAME_FIELD(grant_entry_v1_t, domid, xvf_grant_entry_v1_t, domid);
SAME_FIELD(grant_entry_v1_t, frame, xvf_grant_entry_v1_t, frame);
SAME_VAL(GTF_invalid, XVF_GTF_invalid);
SAME_VAL(GTF_permit_access, XVF_GTF_permit_access);
SAME_VAL(GTF_type_mask, XVF_GTF_type_mask);
SAME_VAL(GTF_readonly, XVF_GTF_readonly);
SAME_VAL(GTF_reading, XVF_GTF_reading);
SAME_VAL(GTF_writing, XVF_GTF_writing);
SAME_VAL(GNTCOPY_source_gref, XVF_GNTCOPY_source_gref);
SAME_VAL(GNTCOPY_dest_gref, XVF_GNTCOPY_dest_gref);
SAME_VAL(GNTST_okay, XVF_GNTST_okay);
SAME_VAL(GNTST_general_error, XVF_GNTST_general_error);
SAME_VAL(GNTST_bad_domain, XVF_GNTST_bad_domain);
SAME_VAL(GNTST_bad_gntref, XVF_GNTST_bad_gntref);
SAME_VAL(GNTST_permission_denied, XVF_GNTST_permission_denied);
SAME_VAL(GNTST_bad_copy_arg, XVF_GNTST_bad_copy_arg);
/* XVF_GRANT_DMA_ADDR_OFF is kernel-internal (drivers/xen/grant-dma-ops.c,
 * XEN_GRANT_DMA_ADDR_OFF = 1ULL << 63), not in any installed header. */
SAME_VAL(XVF_GRANT_DMA_ADDR_OFF, 1ULL << 63);

int main(void) { printf("ok\n"); return 0; }
"""

ARM = r"""
#include <xen/xen.h>
#include "xvf/xen_arm.h"
/* arch-arm.h comes in through xen.h on aarch64; these are its memory map. */
SAME_VAL(GUEST_RAM_BANKS, XVF_GUEST_RAM_BANKS);
SAME_VAL(GUEST_RAM0_BASE, XVF_GUEST_RAM0_BASE);
SAME_VAL(GUEST_RAM0_SIZE, XVF_GUEST_RAM0_SIZE);
SAME_VAL(GUEST_RAM1_BASE, XVF_GUEST_RAM1_BASE);
SAME_VAL(GUEST_RAM1_SIZE, XVF_GUEST_RAM1_SIZE);
SAME_VAL(GUEST_VIRTIO_MMIO_BASE, XVF_GUEST_VIRTIO_MMIO_BASE);
SAME_VAL(GUEST_VIRTIO_MMIO_SIZE, XVF_GUEST_VIRTIO_MMIO_SIZE);
SAME_VAL(GUEST_VIRTIO_MMIO_SPI_FIRST, XVF_GUEST_VIRTIO_MMIO_SPI_FIRST);
SAME_VAL(GUEST_VIRTIO_MMIO_SPI_LAST, XVF_GUEST_VIRTIO_MMIO_SPI_LAST);
SAME_VAL(sizeof(xen_pfn_t), 8);
int main(void) { printf("ok\n"); return 0; }
"""

PRIVCMD = r"""
#include <linux/types.h>
#include <linux/ioctl.h>
#include <xen/xen.h>
#include <xen/privcmd.h>   /* Linux uapi; its <xen/interface/xen.h> is our shim */
#include "xvf/linux_xen.h"

SAME_SIZE(domid_t, xvf_domid_t);
SAME_VAL(sizeof(xen_pfn_t), 8);   /* linux_xen.h assumes 64-bit frame numbers */

SAME_SIZE(struct privcmd_dm_op_buf, xvf_privcmd_dm_op_buf_t);
SAME_FIELD(struct privcmd_dm_op_buf, uptr, xvf_privcmd_dm_op_buf_t, uptr);
SAME_FIELD(struct privcmd_dm_op_buf, size, xvf_privcmd_dm_op_buf_t, size);

SAME_SIZE(struct privcmd_dm_op, xvf_privcmd_dm_op_t);
SAME_FIELD(struct privcmd_dm_op, dom, xvf_privcmd_dm_op_t, dom);
SAME_FIELD(struct privcmd_dm_op, num, xvf_privcmd_dm_op_t, num);
SAME_FIELD(struct privcmd_dm_op, ubufs, xvf_privcmd_dm_op_t, ubufs);

SAME_SIZE(struct privcmd_mmap_resource, xvf_privcmd_mmap_resource_t);
SAME_FIELD(struct privcmd_mmap_resource, dom, xvf_privcmd_mmap_resource_t, dom);
SAME_FIELD(struct privcmd_mmap_resource, type, xvf_privcmd_mmap_resource_t, type);
SAME_FIELD(struct privcmd_mmap_resource, id, xvf_privcmd_mmap_resource_t, id);
SAME_FIELD(struct privcmd_mmap_resource, idx, xvf_privcmd_mmap_resource_t, idx);
SAME_FIELD(struct privcmd_mmap_resource, num, xvf_privcmd_mmap_resource_t, num);
SAME_FIELD(struct privcmd_mmap_resource, addr, xvf_privcmd_mmap_resource_t, addr);

SAME_SIZE(struct privcmd_mmapbatch_v2, xvf_privcmd_mmapbatch_v2_t);
SAME_FIELD(struct privcmd_mmapbatch_v2, num, xvf_privcmd_mmapbatch_v2_t, num);
SAME_FIELD(struct privcmd_mmapbatch_v2, dom, xvf_privcmd_mmapbatch_v2_t, dom);
SAME_FIELD(struct privcmd_mmapbatch_v2, addr, xvf_privcmd_mmapbatch_v2_t, addr);
SAME_FIELD(struct privcmd_mmapbatch_v2, arr, xvf_privcmd_mmapbatch_v2_t, arr);
SAME_FIELD(struct privcmd_mmapbatch_v2, err, xvf_privcmd_mmapbatch_v2_t, err);

SAME_VAL(IOCTL_PRIVCMD_MMAPBATCH_V2, XVF_IOCTL_PRIVCMD_MMAPBATCH_V2);
SAME_VAL(IOCTL_PRIVCMD_DM_OP, XVF_IOCTL_PRIVCMD_DM_OP);
SAME_VAL(IOCTL_PRIVCMD_RESTRICT, XVF_IOCTL_PRIVCMD_RESTRICT);
SAME_VAL(IOCTL_PRIVCMD_MMAP_RESOURCE, XVF_IOCTL_PRIVCMD_MMAP_RESOURCE);
/* our encoder against the kernel's own _IOC for every direction */
SAME_VAL(_IOC(_IOC_NONE, 'P', 4, 32), XVF_IOC(XVF_IOC_NONE, 'P', 4, 32));
SAME_VAL(_IOC(_IOC_WRITE, 'P', 8, 24), XVF_IOC(XVF_IOC_WRITE, 'P', 8, 24));
SAME_VAL(_IOC(_IOC_READ, 'P', 9, 48), XVF_IOC(XVF_IOC_READ, 'P', 9, 48));

#ifdef IOCTL_PRIVCMD_IRQFD
#define HAVE_IRQFD 1
SAME_SIZE(struct privcmd_irqfd, xvf_privcmd_irqfd_t);
SAME_FIELD(struct privcmd_irqfd, dm_op, xvf_privcmd_irqfd_t, dm_op);
SAME_FIELD(struct privcmd_irqfd, size, xvf_privcmd_irqfd_t, size);
SAME_FIELD(struct privcmd_irqfd, fd, xvf_privcmd_irqfd_t, fd);
SAME_FIELD(struct privcmd_irqfd, flags, xvf_privcmd_irqfd_t, flags);
SAME_FIELD(struct privcmd_irqfd, dom, xvf_privcmd_irqfd_t, dom);
SAME_VAL(PRIVCMD_IRQFD_FLAG_DEASSIGN, XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN);
SAME_VAL(IOCTL_PRIVCMD_IRQFD, XVF_IOCTL_PRIVCMD_IRQFD);
#else
#define HAVE_IRQFD 0
#endif
#ifdef IOCTL_PRIVCMD_IOEVENTFD
#define HAVE_IOEVENTFD 1
SAME_SIZE(struct privcmd_ioeventfd, xvf_privcmd_ioeventfd_t);
SAME_FIELD(struct privcmd_ioeventfd, ioreq, xvf_privcmd_ioeventfd_t, ioreq);
SAME_FIELD(struct privcmd_ioeventfd, ports, xvf_privcmd_ioeventfd_t, ports);
SAME_FIELD(struct privcmd_ioeventfd, addr, xvf_privcmd_ioeventfd_t, addr);
SAME_FIELD(struct privcmd_ioeventfd, addr_len, xvf_privcmd_ioeventfd_t, addr_len);
SAME_FIELD(struct privcmd_ioeventfd, event_fd, xvf_privcmd_ioeventfd_t, event_fd);
SAME_FIELD(struct privcmd_ioeventfd, vcpus, xvf_privcmd_ioeventfd_t, vcpus);
SAME_FIELD(struct privcmd_ioeventfd, vq, xvf_privcmd_ioeventfd_t, vq);
SAME_FIELD(struct privcmd_ioeventfd, flags, xvf_privcmd_ioeventfd_t, flags);
SAME_FIELD(struct privcmd_ioeventfd, dom, xvf_privcmd_ioeventfd_t, dom);
SAME_VAL(PRIVCMD_IOEVENTFD_FLAG_DEASSIGN, XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN);
SAME_VAL(IOCTL_PRIVCMD_IOEVENTFD, XVF_IOCTL_PRIVCMD_IOEVENTFD);
#else
#define HAVE_IOEVENTFD 0
#endif

int main(void) { printf("ok irqfd=%d ioeventfd=%d\n", HAVE_IRQFD, HAVE_IOEVENTFD); return 0; }
"""

# The layout of the two newer ioctls as transcribed from the uapi source
# (IRQFD_SOURCE), checked with the kernel's own _IOW against our declarations.
PRIVCMD_EVENTFD = r"""
#include <linux/types.h>
#include <linux/ioctl.h>
#include "xvf/linux_xen.h"
typedef xvf_privcmd_irqfd_t I;
typedef xvf_privcmd_ioeventfd_t E;
_Static_assert(sizeof(I) == 24, "privcmd_irqfd is 24 bytes");
_Static_assert(offsetof(I, dm_op) == 0 && offsetof(I, size) == 8 && offsetof(I, fd) == 12
    && offsetof(I, flags) == 16 && offsetof(I, dom) == 20 && offsetof(I, pad) == 22, "irqfd");
_Static_assert(sizeof(E) == 48, "privcmd_ioeventfd is 48 bytes");
_Static_assert(offsetof(E, ioreq) == 0 && offsetof(E, ports) == 8 && offsetof(E, addr) == 16
    && offsetof(E, addr_len) == 24 && offsetof(E, event_fd) == 28 && offsetof(E, vcpus) == 32
    && offsetof(E, vq) == 36 && offsetof(E, flags) == 40 && offsetof(E, dom) == 44
    && offsetof(E, pad) == 46, "ioeventfd");
SAME_VAL(XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN, 1u << 0);
SAME_VAL(XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN, 1u << 0);
SAME_VAL(XVF_IOCTL_PRIVCMD_IRQFD, _IOW('P', 8, I));
SAME_VAL(XVF_IOCTL_PRIVCMD_IOEVENTFD, _IOW('P', 9, E));
SAME_VAL(XVF_IOCTL_PRIVCMD_IRQFD_6_6_0, _IOC(_IOC_NONE, 'P', 8, sizeof(I)));
int main(void) { printf("ok\n"); return 0; }
"""

EVTCHN = r"""
#include <linux/ioctl.h>
#include <xen/xen.h>
#include <xen/evtchn.h>
#include "xvf/linux_xen.h"

SAME_SIZE(struct ioctl_evtchn_bind_interdomain, xvf_evtchn_bind_interdomain_t);
SAME_FIELD(struct ioctl_evtchn_bind_interdomain, remote_domain,
           xvf_evtchn_bind_interdomain_t, remote_domain);
SAME_FIELD(struct ioctl_evtchn_bind_interdomain, remote_port,
           xvf_evtchn_bind_interdomain_t, remote_port);
SAME_SIZE(struct ioctl_evtchn_bind_unbound_port, xvf_evtchn_bind_unbound_port_t);
SAME_FIELD(struct ioctl_evtchn_bind_unbound_port, remote_domain,
           xvf_evtchn_bind_unbound_port_t, remote_domain);
SAME_SIZE(struct ioctl_evtchn_unbind, xvf_evtchn_port_arg_t);
SAME_FIELD(struct ioctl_evtchn_unbind, port, xvf_evtchn_port_arg_t, port);
SAME_SIZE(struct ioctl_evtchn_notify, xvf_evtchn_port_arg_t);
SAME_FIELD(struct ioctl_evtchn_notify, port, xvf_evtchn_port_arg_t, port);

SAME_VAL(IOCTL_EVTCHN_BIND_INTERDOMAIN, XVF_IOCTL_EVTCHN_BIND_INTERDOMAIN);
SAME_VAL(IOCTL_EVTCHN_BIND_UNBOUND_PORT, XVF_IOCTL_EVTCHN_BIND_UNBOUND_PORT);
SAME_VAL(DOMID_SELF, XVF_DOMID_SELF);
SAME_VAL(IOCTL_EVTCHN_UNBIND, XVF_IOCTL_EVTCHN_UNBIND);
SAME_VAL(IOCTL_EVTCHN_NOTIFY, XVF_IOCTL_EVTCHN_NOTIFY);
SAME_VAL(IOCTL_EVTCHN_RESET, XVF_IOCTL_EVTCHN_RESET);
int main(void) { printf("ok\n"); return 0; }
"""

GNTDEV = r"""
#include <linux/types.h>
#include <linux/ioctl.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/gntdev.h>
#include "xvf/linux_xen.h"

SAME_SIZE(struct ioctl_gntdev_grant_ref, xvf_gntdev_grant_ref_t);
SAME_FIELD(struct ioctl_gntdev_grant_ref, domid, xvf_gntdev_grant_ref_t, domid);
SAME_FIELD(struct ioctl_gntdev_grant_ref, ref, xvf_gntdev_grant_ref_t, ref);
SAME_SIZE(struct ioctl_gntdev_map_grant_ref, xvf_gntdev_map_grant_ref_t);
SAME_FIELD(struct ioctl_gntdev_map_grant_ref, count, xvf_gntdev_map_grant_ref_t, count);
SAME_FIELD(struct ioctl_gntdev_map_grant_ref, pad, xvf_gntdev_map_grant_ref_t, pad);
SAME_FIELD(struct ioctl_gntdev_map_grant_ref, index, xvf_gntdev_map_grant_ref_t, index);
SAME_FIELD(struct ioctl_gntdev_map_grant_ref, refs, xvf_gntdev_map_grant_ref_t, refs);
SAME_SIZE(struct ioctl_gntdev_unmap_grant_ref, xvf_gntdev_unmap_grant_ref_t);
SAME_FIELD(struct ioctl_gntdev_unmap_grant_ref, index, xvf_gntdev_unmap_grant_ref_t, index);
SAME_FIELD(struct ioctl_gntdev_unmap_grant_ref, count, xvf_gntdev_unmap_grant_ref_t, count);
SAME_FIELD(struct ioctl_gntdev_unmap_grant_ref, pad, xvf_gntdev_unmap_grant_ref_t, pad);
SAME_SIZE(struct ioctl_gntdev_set_max_grants, xvf_gntdev_set_max_grants_t);
SAME_FIELD(struct ioctl_gntdev_set_max_grants, count, xvf_gntdev_set_max_grants_t, count);

SAME_VAL(IOCTL_GNTDEV_MAP_GRANT_REF, XVF_IOCTL_GNTDEV_MAP_GRANT_REF);
SAME_VAL(IOCTL_GNTDEV_UNMAP_GRANT_REF, XVF_IOCTL_GNTDEV_UNMAP_GRANT_REF);
SAME_VAL(IOCTL_GNTDEV_SET_MAX_GRANTS, XVF_IOCTL_GNTDEV_SET_MAX_GRANTS);
SAME_SIZE(struct gntdev_grant_copy_segment, xvf_gntdev_grant_copy_segment_t);
SAME_FIELD(struct gntdev_grant_copy_segment,
           source.virt,
           xvf_gntdev_grant_copy_segment_t, source.virt);
SAME_FIELD(struct gntdev_grant_copy_segment,
           source.foreign.ref,
           xvf_gntdev_grant_copy_segment_t, source.foreign.ref);
SAME_FIELD(struct gntdev_grant_copy_segment,
           source.foreign.offset,
           xvf_gntdev_grant_copy_segment_t, source.foreign.offset);
SAME_FIELD(struct gntdev_grant_copy_segment,
           source.foreign.domid,
           xvf_gntdev_grant_copy_segment_t, source.foreign.domid);
SAME_FIELD(struct gntdev_grant_copy_segment,
           dest.virt,
           xvf_gntdev_grant_copy_segment_t, dest.virt);
SAME_FIELD(struct gntdev_grant_copy_segment,
           dest.foreign.ref,
           xvf_gntdev_grant_copy_segment_t, dest.foreign.ref);
SAME_FIELD(struct gntdev_grant_copy_segment,
           len,
           xvf_gntdev_grant_copy_segment_t, len);
SAME_FIELD(struct gntdev_grant_copy_segment,
           flags,
           xvf_gntdev_grant_copy_segment_t, flags);
SAME_FIELD(struct gntdev_grant_copy_segment,
           status,
           xvf_gntdev_grant_copy_segment_t, status);
SAME_SIZE(struct ioctl_gntdev_grant_copy, xvf_gntdev_grant_copy_t);
SAME_FIELD(struct ioctl_gntdev_grant_copy, count, xvf_gntdev_grant_copy_t, count);
SAME_FIELD(struct ioctl_gntdev_grant_copy, segments, xvf_gntdev_grant_copy_t, segments);
SAME_VAL(IOCTL_GNTDEV_GRANT_COPY, XVF_IOCTL_GNTDEV_GRANT_COPY);
int main(void) { printf("ok\n"); return 0; }
"""

VIRTIO_MMIO = r"""
#include <linux/virtio_mmio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>
#include "xvf/virtio_mmio.h"

SAME_VAL(VIRTIO_MMIO_MAGIC_VALUE, XVF_VIRTIO_MMIO_MAGIC_VALUE);
SAME_VAL(VIRTIO_MMIO_VERSION, XVF_VIRTIO_MMIO_VERSION);
SAME_VAL(VIRTIO_MMIO_DEVICE_ID, XVF_VIRTIO_MMIO_DEVICE_ID);
SAME_VAL(VIRTIO_MMIO_VENDOR_ID, XVF_VIRTIO_MMIO_VENDOR_ID);
SAME_VAL(VIRTIO_MMIO_DEVICE_FEATURES, XVF_VIRTIO_MMIO_DEVICE_FEATURES);
SAME_VAL(VIRTIO_MMIO_DEVICE_FEATURES_SEL, XVF_VIRTIO_MMIO_DEVICE_FEATURES_SEL);
SAME_VAL(VIRTIO_MMIO_DRIVER_FEATURES, XVF_VIRTIO_MMIO_DRIVER_FEATURES);
SAME_VAL(VIRTIO_MMIO_DRIVER_FEATURES_SEL, XVF_VIRTIO_MMIO_DRIVER_FEATURES_SEL);
SAME_VAL(VIRTIO_MMIO_QUEUE_SEL, XVF_VIRTIO_MMIO_QUEUE_SEL);
SAME_VAL(VIRTIO_MMIO_QUEUE_NUM_MAX, XVF_VIRTIO_MMIO_QUEUE_NUM_MAX);
SAME_VAL(VIRTIO_MMIO_QUEUE_NUM, XVF_VIRTIO_MMIO_QUEUE_NUM);
SAME_VAL(VIRTIO_MMIO_QUEUE_READY, XVF_VIRTIO_MMIO_QUEUE_READY);
SAME_VAL(VIRTIO_MMIO_QUEUE_NOTIFY, XVF_VIRTIO_MMIO_QUEUE_NOTIFY);
SAME_VAL(VIRTIO_MMIO_INTERRUPT_STATUS, XVF_VIRTIO_MMIO_INTERRUPT_STATUS);
SAME_VAL(VIRTIO_MMIO_INTERRUPT_ACK, XVF_VIRTIO_MMIO_INTERRUPT_ACK);
SAME_VAL(VIRTIO_MMIO_STATUS, XVF_VIRTIO_MMIO_STATUS);
SAME_VAL(VIRTIO_MMIO_QUEUE_DESC_LOW, XVF_VIRTIO_MMIO_QUEUE_DESC_LOW);
SAME_VAL(VIRTIO_MMIO_QUEUE_DESC_HIGH, XVF_VIRTIO_MMIO_QUEUE_DESC_HIGH);
SAME_VAL(VIRTIO_MMIO_QUEUE_AVAIL_LOW, XVF_VIRTIO_MMIO_QUEUE_DRIVER_LOW);
SAME_VAL(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, XVF_VIRTIO_MMIO_QUEUE_DRIVER_HIGH);
SAME_VAL(VIRTIO_MMIO_QUEUE_USED_LOW, XVF_VIRTIO_MMIO_QUEUE_DEVICE_LOW);
SAME_VAL(VIRTIO_MMIO_QUEUE_USED_HIGH, XVF_VIRTIO_MMIO_QUEUE_DEVICE_HIGH);
SAME_VAL(VIRTIO_MMIO_SHM_SEL, XVF_VIRTIO_MMIO_SHM_SEL);
SAME_VAL(VIRTIO_MMIO_SHM_LEN_LOW, XVF_VIRTIO_MMIO_SHM_LEN_LOW);
SAME_VAL(VIRTIO_MMIO_SHM_LEN_HIGH, XVF_VIRTIO_MMIO_SHM_LEN_HIGH);
SAME_VAL(VIRTIO_MMIO_SHM_BASE_LOW, XVF_VIRTIO_MMIO_SHM_BASE_LOW);
SAME_VAL(VIRTIO_MMIO_SHM_BASE_HIGH, XVF_VIRTIO_MMIO_SHM_BASE_HIGH);
SAME_VAL(VIRTIO_MMIO_CONFIG_GENERATION, XVF_VIRTIO_MMIO_CONFIG_GENERATION);
SAME_VAL(VIRTIO_MMIO_CONFIG, XVF_VIRTIO_MMIO_CONFIG);
#ifdef VIRTIO_MMIO_QUEUE_RESET   /* virtio 1.2 section 4.2.2; not in Linux 6.1 uapi */
SAME_VAL(VIRTIO_MMIO_QUEUE_RESET, XVF_VIRTIO_MMIO_QUEUE_RESET);
#endif
SAME_VAL(VIRTIO_MMIO_INT_VRING, XVF_VIRTIO_MMIO_INT_VRING);
SAME_VAL(VIRTIO_MMIO_INT_CONFIG, XVF_VIRTIO_MMIO_INT_CONFIG);

SAME_VAL(VIRTIO_CONFIG_S_ACKNOWLEDGE, XVF_VIRTIO_STATUS_ACKNOWLEDGE);
SAME_VAL(VIRTIO_CONFIG_S_DRIVER, XVF_VIRTIO_STATUS_DRIVER);
SAME_VAL(VIRTIO_CONFIG_S_DRIVER_OK, XVF_VIRTIO_STATUS_DRIVER_OK);
SAME_VAL(VIRTIO_CONFIG_S_FEATURES_OK, XVF_VIRTIO_STATUS_FEATURES_OK);
SAME_VAL(VIRTIO_CONFIG_S_NEEDS_RESET, XVF_VIRTIO_STATUS_DEVICE_NEEDS_RESET);
SAME_VAL(VIRTIO_CONFIG_S_FAILED, XVF_VIRTIO_STATUS_FAILED);
SAME_VAL(VIRTIO_RING_F_INDIRECT_DESC, XVF_VIRTIO_F_INDIRECT_DESC);
SAME_VAL(VIRTIO_RING_F_EVENT_IDX, XVF_VIRTIO_F_EVENT_IDX);
SAME_VAL(VIRTIO_F_VERSION_1, XVF_VIRTIO_F_VERSION_1);
SAME_VAL(VIRTIO_F_ACCESS_PLATFORM, XVF_VIRTIO_F_ACCESS_PLATFORM);
SAME_VAL(VIRTIO_F_RING_PACKED, XVF_VIRTIO_F_RING_PACKED);
SAME_VAL(VIRTIO_F_IN_ORDER, XVF_VIRTIO_F_IN_ORDER);
SAME_VAL(VIRTIO_F_ORDER_PLATFORM, XVF_VIRTIO_F_ORDER_PLATFORM);
SAME_VAL(VIRTIO_F_SR_IOV, XVF_VIRTIO_F_SR_IOV);
SAME_VAL(VIRTIO_F_RING_RESET, XVF_VIRTIO_F_RING_RESET);
#ifdef VIRTIO_F_NOTIFICATION_DATA   /* not in Linux 6.1 uapi */
SAME_VAL(VIRTIO_F_NOTIFICATION_DATA, XVF_VIRTIO_F_NOTIFICATION_DATA);
#endif
#ifdef VIRTIO_F_NOTIF_CONFIG_DATA
SAME_VAL(VIRTIO_F_NOTIF_CONFIG_DATA, XVF_VIRTIO_F_NOTIF_CONFIG_DATA);
#endif
/* "virt" read as a little-endian word, the spec's MagicValue */
SAME_VAL(XVF_VIRTIO_MMIO_MAGIC, ('v' | 'i' << 8 | 'r' << 16 | (unsigned)'t' << 24));
int main(void) { printf("ok\n"); return 0; }
"""


VIRTIO_RING = r"""
#include <stdlib.h>
#include <linux/virtio_ring.h>
#include "xvf/virtio_ring.h"

SAME_SIZE(struct vring_desc, xvf_vring_desc_t);
SAME_FIELD(struct vring_desc, addr, xvf_vring_desc_t, addr);
SAME_FIELD(struct vring_desc, len, xvf_vring_desc_t, len);
SAME_FIELD(struct vring_desc, flags, xvf_vring_desc_t, flags);
SAME_FIELD(struct vring_desc, next, xvf_vring_desc_t, next);

SAME_SIZE(struct vring_used_elem, xvf_vring_used_elem_t);
SAME_FIELD(struct vring_used_elem, id, xvf_vring_used_elem_t, id);
SAME_FIELD(struct vring_used_elem, len, xvf_vring_used_elem_t, len);

/* the rings are flexible arrays: their offset and element size, not their size */
#define SAME_RING(ta, tb) \
    _Static_assert(offsetof(ta, ring) == offsetof(tb, ring), "offset: " #ta ".ring"); \
    _Static_assert(sizeof(((ta *)0)->ring[0]) == sizeof(((tb *)0)->ring[0]), \
        "element size: " #ta ".ring")
SAME_SIZE(struct vring_avail, xvf_vring_avail_t);
SAME_FIELD(struct vring_avail, flags, xvf_vring_avail_t, flags);
SAME_FIELD(struct vring_avail, idx, xvf_vring_avail_t, idx);
SAME_RING(struct vring_avail, xvf_vring_avail_t);
SAME_SIZE(struct vring_used, xvf_vring_used_t);
SAME_FIELD(struct vring_used, flags, xvf_vring_used_t, flags);
SAME_FIELD(struct vring_used, idx, xvf_vring_used_t, idx);
SAME_RING(struct vring_used, xvf_vring_used_t);

SAME_VAL(VRING_DESC_F_NEXT, XVF_VRING_DESC_F_NEXT);
SAME_VAL(VRING_DESC_F_WRITE, XVF_VRING_DESC_F_WRITE);
SAME_VAL(VRING_DESC_F_INDIRECT, XVF_VRING_DESC_F_INDIRECT);
SAME_VAL(VRING_AVAIL_F_NO_INTERRUPT, XVF_VRING_AVAIL_F_NO_INTERRUPT);
SAME_VAL(VRING_USED_F_NO_NOTIFY, XVF_VRING_USED_F_NO_NOTIFY);
SAME_VAL(VRING_DESC_ALIGN_SIZE, XVF_VRING_DESC_ALIGN);
SAME_VAL(VRING_AVAIL_ALIGN_SIZE, XVF_VRING_AVAIL_ALIGN);
SAME_VAL(VRING_USED_ALIGN_SIZE, XVF_VRING_USED_ALIGN);

int main(void) {
    /* Our part sizes against Linux's vring_init/vring_size for every queue size:
     * the parts in one block, the device area at its alignment, the event words
     * in the last two bytes of each area. */
    int bad = 0;
    for (unsigned num = 1; num <= XVF_VRING_MAX_SIZE; num <<= 1) {
        unsigned align = XVF_VRING_USED_ALIGN;
        char *p = calloc(1, vring_size(num, align));
        struct vring vr;
        vring_init(&vr, num, p, align);
        size_t avail = (char *)vr.avail - p, used = (char *)vr.used - p;
        size_t used_at = (XVF_VRING_DESC_BYTES(num) + XVF_VRING_AVAIL_BYTES(num) + align - 1)
            / align * align;
        if (avail != XVF_VRING_DESC_BYTES(num) || used != used_at
            || used + XVF_VRING_USED_BYTES(num) != vring_size(num, align)
            || (char *)&vring_used_event(&vr) - p != avail + XVF_VRING_AVAIL_BYTES(num) - 2
            || (char *)&vring_avail_event(&vr) - p != used + XVF_VRING_USED_BYTES(num) - 2) {
            printf("MISMATCH num=%u: avail %zu used %zu size %u\n", num, avail, used,
                   vring_size(num, align));
            bad = 1;
        }
        free(p);
    }
    if (!bad) printf("ok\n");
    return bad;
}
"""

# Xen's page as xenctrl.h states it, against the two headers that use it.
XEN_PAGE = r"""
#include <xenctrl.h>
#include "xvf/xen_grant.h"
#include "xvf/xen_ioreq.h"
SAME_VAL(XC_PAGE_SHIFT, XVF_XEN_PAGE_SHIFT);
SAME_VAL(XC_PAGE_SIZE, XVF_PAGE_SIZE);
int main(void) { printf("ok\n"); return 0; }
"""


# ---------------------------------------------------------------- harness


class Target:
    """A compiler that builds the probes; `runs` when its output runs here."""

    def __init__(self, name: str, cc: str | None, runs: bool, sysroot_xen: bool) -> None:
        self.name = name
        self.cc = cc
        self.runs = runs
        self.sysroot_xen = sysroot_xen  # cross: Xen's public headers live outside its sysroot


TARGETS = [
    Target("native", shutil.which("gcc"), runs=True, sysroot_xen=False),
    Target("aarch64", shutil.which("aarch64-linux-gnu-gcc"), runs=False, sysroot_xen=True),
]


def _require(target: Target, *headers: str) -> None:
    if target.cc is None:
        if target.name == "native":
            pytest.skip("no gcc on PATH: apt-get install gcc")
        pytest.skip(
            "no aarch64 cross compiler: apt-get install gcc-aarch64-linux-gnu "
            "(the native run still checks every layout)"
        )
    for h in headers:
        if not (SYS / h).exists():
            pkg = "libxen-dev" if h.startswith("xen") and h not in _LINUX_XEN else "linux-libc-dev"
            pytest.skip(f"system header {SYS / h} is absent: apt-get install {pkg}")


_LINUX_XEN = {"xen/privcmd.h", "xen/evtchn.h", "xen/gntdev.h"}


def _include_flags(target: Target, tmp: Path) -> list[str]:
    # Linux's uapi privcmd.h includes <xen/interface/xen.h>, a kernel-internal
    # path; point it at Xen's own public xen.h.
    shim = tmp / "shim" / "xen" / "interface"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "xen.h").write_text("#include <xen/xen.h>\n")
    flags = ["-I", str(INCLUDE), "-I", str(tmp / "shim")]
    if target.sysroot_xen:
        # The cross sysroot has Linux's xen/*.h but not Xen's public headers,
        # which are the same text for every architecture.
        link = tmp / "xenpub"
        link.mkdir(exist_ok=True)
        if not (link / "xen").exists():
            os.symlink(SYS / "xen", link / "xen")
        flags += ["-idirafter", str(link)]
    return flags


def compile_and_run(target: Target, source: str, tmp: Path) -> str:
    """Build PRELUDE + source; run it when the target runs here. Returns stdout."""
    src = tmp / "probe.c"
    src.write_text(PRELUDE + source)
    out = tmp / "probe"
    cmd = [target.cc, "-std=gnu11", "-Wall", "-Werror", *_include_flags(target, tmp)]
    cmd += [str(src), "-o", str(out)] if target.runs else ["-c", str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{target.name} build failed:\n{res.stderr}"
    if not target.runs:
        return "ok"
    run = subprocess.run([str(out)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


params = pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])


@params
def test_ioreq_layout_and_bitfield_byte(target: Target, tmp_path: Path) -> None:
    _require(target, "xen/hvm/ioreq.h", "xen/memory.h")
    assert compile_and_run(target, IOREQ, tmp_path).startswith("ok")


@params
def test_dm_op_layout(target: Target, tmp_path: Path) -> None:
    _require(target, "xen/hvm/dm_op.h")
    assert compile_and_run(target, DMOP, tmp_path).startswith("ok")


@params
def test_grant_entry_and_flags(target: Target, tmp_path: Path) -> None:
    _require(target, "xen/grant_table.h")
    assert compile_and_run(target, GRANT, tmp_path).startswith("ok")


def test_arm_guest_memory_map(tmp_path: Path) -> None:
    # <xen/xen.h> selects arch-arm.h only when compiling for Arm.
    target = TARGETS[1]
    _require(target, "xen/arch-arm.h")
    assert compile_and_run(target, ARM, tmp_path) == "ok"


@params
def test_privcmd_ioctls(target: Target, tmp_path: Path) -> None:
    _require(target, "xen/privcmd.h", "xen/xen.h", "linux/ioctl.h")
    assert compile_and_run(target, PRIVCMD, tmp_path).startswith("ok")


@params
def test_privcmd_irqfd_ioeventfd_against_uapi_source(target: Target, tmp_path: Path) -> None:
    """Our transcription of the 6.6+/6.7+ ioctls, encoded with the kernel's own _IOW."""
    _require(target, "linux/ioctl.h")
    assert compile_and_run(target, PRIVCMD_EVENTFD, tmp_path).startswith("ok")


@params
def test_privcmd_irqfd_ioeventfd_against_installed_header(target: Target, tmp_path: Path) -> None:
    _require(target, "xen/privcmd.h", "xen/xen.h")
    header = SYS / "xen/privcmd.h"
    if target.sysroot_xen:
        header = Path("/usr/aarch64-linux-gnu/include/xen/privcmd.h")
    text = header.read_text() if header.exists() else ""
    if "IOCTL_PRIVCMD_IRQFD" not in text or "IOCTL_PRIVCMD_IOEVENTFD" not in text:
        pytest.skip(
            f"{header} predates IOCTL_PRIVCMD_IRQFD/IOEVENTFD (Debian 12's linux-libc-dev is "
            f"6.1); checked instead against {IRQFD_SOURCE}"
        )
    out = compile_and_run(target, PRIVCMD, tmp_path)
    assert out == "ok" or "irqfd=1 ioeventfd=1" in out


@params
def test_evtchn_ioctls(target: Target, tmp_path: Path) -> None:
    _require(target, "xen/evtchn.h", "xen/xen.h")
    assert compile_and_run(target, EVTCHN, tmp_path).startswith("ok")


@params
def test_gntdev_ioctls(target: Target, tmp_path: Path) -> None:
    _require(target, "xen/gntdev.h", "xen/grant_table.h")
    assert compile_and_run(target, GNTDEV, tmp_path).startswith("ok")


@params
def test_virtio_mmio_registers_and_status(target: Target, tmp_path: Path) -> None:
    _require(target, "linux/virtio_mmio.h", "linux/virtio_config.h")
    assert compile_and_run(target, VIRTIO_MMIO, tmp_path).startswith("ok")


@params
def test_virtio_ring_layout_and_flags(target: Target, tmp_path: Path) -> None:
    _require(target, "linux/virtio_ring.h")
    assert compile_and_run(target, VIRTIO_RING, tmp_path).startswith("ok")


def test_xen_page_size(tmp_path: Path) -> None:
    # xenctrl.h is libxen-dev's, outside the cross sysroot: checked natively.
    target = TARGETS[0]
    _require(target, "xenctrl.h")
    assert compile_and_run(target, XEN_PAGE, tmp_path).startswith("ok")


def test_harness_reports_a_mismatch(tmp_path: Path) -> None:
    """A wrong constant must fail the build and name itself in the compiler output."""
    target = TARGETS[0]
    _require(target, "xen/hvm/ioreq.h")
    src = tmp_path / "probe.c"
    src.write_text(
        PRELUDE + '#include <xen/xen.h>\n#include <xen/hvm/ioreq.h>\n#include "xvf/xen_ioreq.h"\n'
        "SAME_VAL(IOREQ_READ, XVF_IOREQ_WRITE);\nint main(void){return 0;}\n"
    )
    res = subprocess.run(
        [target.cc, "-c", *_include_flags(target, tmp_path), str(src), "-o", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert "IOREQ_READ != XVF_IOREQ_WRITE" in res.stderr
