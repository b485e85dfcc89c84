/* Xen IOREQ ABI as xvf uses it (Xen public/hvm/ioreq.h, public/memory.h).
 * Our own declarations; tests/unit/test_abi_conformance.py checks every size,
 * offset and constant here against Debian's libxen-dev headers. */
#ifndef XVF_XEN_IOREQ_H
#define XVF_XEN_IOREQ_H

#include <stdint.h>

#define XVF_IOREQ_READ   1u
#define XVF_IOREQ_WRITE  0u

#define XVF_STATE_IOREQ_NONE       0u
#define XVF_STATE_IOREQ_READY      1u
#define XVF_STATE_IOREQ_INPROCESS  2u
#define XVF_STATE_IORESP_READY     3u

#define XVF_IOREQ_TYPE_PIO         0u
#define XVF_IOREQ_TYPE_COPY        1u   /* MMIO */
#define XVF_IOREQ_TYPE_PCI_CONFIG  2u
#define XVF_IOREQ_TYPE_TIMEOFFSET  7u
#define XVF_IOREQ_TYPE_INVALIDATE  8u

/* Xen declares byte 30 as bit fields {state:4, data_is_ptr:1, dir:1, df:1, pad:1}.
 * Bit-field order is compiler-defined, so we name the byte and its bits
 * (GCC/Clang little-endian order, the only one Xen supports on Arm and x86). */
#define XVF_IOREQ_STATE_MASK        0x0fu
#define XVF_IOREQ_DATA_IS_PTR_BIT   0x10u
#define XVF_IOREQ_DIR_BIT           0x20u
#define XVF_IOREQ_DF_BIT            0x40u

typedef struct xvf_ioreq {
    uint64_t addr;      /* guest physical address of the access */
    uint64_t data;      /* value written, or result of a read */
    uint32_t count;     /* rep count, 1 for MMIO on Arm */
    uint32_t size;      /* access width in bytes */
    uint32_t vp_eport;  /* event channel (in the guest's domain) of this vCPU */
    uint16_t pad0;
    uint8_t  flags;     /* state | data_is_ptr | dir | df, see masks above */
    uint8_t  type;      /* XVF_IOREQ_TYPE_* */
} xvf_ioreq_t;

#define XVF_IOREQ_SIZE 32u
#define XVF_PAGE_SIZE  4096u
/* The synchronous ioreq page is an array of slots indexed by vCPU id. */
#define XVF_IOREQ_SLOTS_PER_PAGE (XVF_PAGE_SIZE / XVF_IOREQ_SIZE)

/* XENMEM_acquire_resource type and frame indexes of an IOREQ server. */
#define XVF_XENMEM_RESOURCE_IOREQ_SERVER 0u
#define XVF_IOREQ_SERVER_FRAME_BUFIOREQ  0u
#define XVF_IOREQ_SERVER_FRAME_IOREQ(n)  (1u + (n))

#endif
