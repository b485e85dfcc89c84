/* The split virtqueue in guest memory (virtio 1.2, section 2.7): a descriptor
 * table, the driver area ("avail") and the device area ("used"). Every field
 * is little-endian (virtio 1.x devices only). The event-index words (section
 * 2.7.7/2.7.10) sit right after each ring: used_event after avail->ring[num],
 * avail_event after used->ring[num]. */
#ifndef XVF_VIRTIO_RING_H
#define XVF_VIRTIO_RING_H

#include <stdint.h>

/* descriptor flags (2.7.5) */
#define XVF_VRING_DESC_F_NEXT          1u  /* `next` continues the chain */
#define XVF_VRING_DESC_F_WRITE         2u  /* the device writes this buffer */
#define XVF_VRING_DESC_F_INDIRECT      4u  /* the buffer is a table of descriptors */
/* driver area flags (2.7.6) and device area flags (2.7.8) */
#define XVF_VRING_AVAIL_F_NO_INTERRUPT 1u
#define XVF_VRING_USED_F_NO_NOTIFY     1u

/* alignment each part needs (2.7, table "Virtqueue Part Alignment") */
#define XVF_VRING_DESC_ALIGN           16u
#define XVF_VRING_AVAIL_ALIGN          2u
#define XVF_VRING_USED_ALIGN           4u
/* the largest queue a split ring allows (2.7: Queue Size up to 32768) */
#define XVF_VRING_MAX_SIZE             32768u

typedef struct xvf_vring_desc {
    uint64_t addr;      /* guest (or grant DMA) address of the buffer */
    uint32_t len;       /* its length in bytes */
    uint16_t flags;     /* XVF_VRING_DESC_F_* */
    uint16_t next;      /* the chain's next index, with DESC_F_NEXT */
} xvf_vring_desc_t;

typedef struct xvf_vring_avail {
    uint16_t flags;     /* XVF_VRING_AVAIL_F_* */
    uint16_t idx;       /* where the driver puts the next entry (free running) */
    uint16_t ring[];    /* num heads, then used_event */
} xvf_vring_avail_t;

typedef struct xvf_vring_used_elem {
    uint32_t id;        /* head of the finished chain */
    uint32_t len;       /* bytes the device wrote */
} xvf_vring_used_elem_t;

typedef struct xvf_vring_used {
    uint16_t flags;     /* XVF_VRING_USED_F_* */
    uint16_t idx;       /* where the device puts the next entry (free running) */
    xvf_vring_used_elem_t ring[];  /* num elements, then avail_event */
} xvf_vring_used_t;

/* Bytes of each part for a queue of `num` entries, event-index word included. */
#define XVF_VRING_DESC_BYTES(num)  (sizeof(xvf_vring_desc_t) * (num))
#define XVF_VRING_AVAIL_BYTES(num) \
    (sizeof(xvf_vring_avail_t) + sizeof(uint16_t) * ((num) + 1))
#define XVF_VRING_USED_BYTES(num) \
    (sizeof(xvf_vring_used_t) + sizeof(xvf_vring_used_elem_t) * (num) + sizeof(uint16_t))

#endif
