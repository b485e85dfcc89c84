/* Xen device-model operations (Xen public/hvm/dm_op.h) that xvf issues. */
#ifndef XVF_XEN_DMOP_H
#define XVF_XEN_DMOP_H

#include <stdint.h>

#define XVF_DMOP_create_ioreq_server              1u
#define XVF_DMOP_get_ioreq_server_info            2u
#define XVF_DMOP_map_io_range_to_ioreq_server     3u
#define XVF_DMOP_unmap_io_range_from_ioreq_server 4u
#define XVF_DMOP_set_ioreq_server_state           5u
#define XVF_DMOP_destroy_ioreq_server             6u
#define XVF_DMOP_set_irq_level                    19u
#define XVF_DMOP_nr_vcpus                         20u

#define XVF_DMOP_IO_RANGE_PORT   0u
#define XVF_DMOP_IO_RANGE_MEMORY 1u
#define XVF_DMOP_no_gfns         1u

/* No domain (public/xen.h): a dm_op against it is privcmd's harmless probe. */
#define XVF_DOMID_INVALID 0x7ff4u

/* Buffered-ioreq handling requested at creation. */
#define XVF_HVM_IOREQSRV_BUFIOREQ_OFF    0u

typedef uint16_t xvf_ioservid_t;

typedef struct xvf_dm_op_create_ioreq_server {
    uint8_t handle_bufioreq;
    uint8_t pad[3];
    xvf_ioservid_t id;                  /* OUT */
} xvf_dm_op_create_ioreq_server_t;

typedef struct xvf_dm_op_get_ioreq_server_info {
    xvf_ioservid_t id;
    uint16_t flags;
    uint32_t bufioreq_port;             /* OUT */
    uint64_t ioreq_gfn __attribute__((aligned(8)));     /* OUT */
    uint64_t bufioreq_gfn __attribute__((aligned(8)));  /* OUT */
} xvf_dm_op_get_ioreq_server_info_t;

typedef struct xvf_dm_op_ioreq_server_range {
    xvf_ioservid_t id;
    uint16_t pad;
    uint32_t type;
    uint64_t start __attribute__((aligned(8)));   /* inclusive */
    uint64_t end __attribute__((aligned(8)));     /* inclusive */
} xvf_dm_op_ioreq_server_range_t;

typedef struct xvf_dm_op_set_ioreq_server_state {
    xvf_ioservid_t id;
    uint8_t enabled;
    uint8_t pad;
} xvf_dm_op_set_ioreq_server_state_t;

typedef struct xvf_dm_op_destroy_ioreq_server {
    xvf_ioservid_t id;
    uint16_t pad;
} xvf_dm_op_destroy_ioreq_server_t;

typedef struct xvf_dm_op_set_irq_level {
    uint32_t irq;
    uint8_t level;
    uint8_t pad[3];
} xvf_dm_op_set_irq_level_t;

typedef struct xvf_dm_op_nr_vcpus {
    uint32_t vcpus;                     /* OUT */
} xvf_dm_op_nr_vcpus_t;

/* The union in Xen is sized by its largest member (relocate_memory/inject_msi,
 * 24 bytes); the fixed total keeps our buffers the size Xen copies. */
#define XVF_DM_OP_UNION_SIZE 24u
typedef struct xvf_dm_op {
    uint32_t op;
    uint32_t pad;
    union {
        xvf_dm_op_create_ioreq_server_t create_ioreq_server;
        xvf_dm_op_get_ioreq_server_info_t get_ioreq_server_info;
        xvf_dm_op_ioreq_server_range_t map_io_range_to_ioreq_server;
        xvf_dm_op_ioreq_server_range_t unmap_io_range_from_ioreq_server;
        xvf_dm_op_set_ioreq_server_state_t set_ioreq_server_state;
        xvf_dm_op_destroy_ioreq_server_t destroy_ioreq_server;
        xvf_dm_op_set_irq_level_t set_irq_level;
        xvf_dm_op_nr_vcpus_t nr_vcpus;
        uint8_t raw[XVF_DM_OP_UNION_SIZE];
    } u __attribute__((aligned(8)));
} xvf_dm_op_t;

_Static_assert(sizeof(xvf_dm_op_t) == 32, "xen_dm_op is 32 bytes");

#endif
