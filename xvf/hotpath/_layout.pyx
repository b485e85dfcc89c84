"""The virtqueue layout, Xen page and grant address bit as include/xvf declares them.

Python learns these ABI facts here and nowhere else: the values are read by the
C compiler from the headers (sizeof, field offsets, #defines), then handed to
xvf.protocols.virtqueue as plain ints.
"""

from libc.stdint cimport uint16_t

from xvf.hotpath.includes.xen_grant cimport XVF_GRANT_DMA_ADDR_OFF, XVF_XEN_PAGE_SHIFT
from xvf.hotpath.includes.xen_arm cimport (
    XVF_GUEST_RAM0_BASE,
    XVF_GUEST_RAM0_SIZE,
    XVF_GUEST_RAM1_BASE,
    XVF_GUEST_RAM1_SIZE,
    XVF_GUEST_VIRTIO_MMIO_BASE,
    XVF_GUEST_VIRTIO_MMIO_SIZE,
    XVF_GUEST_VIRTIO_MMIO_SPI_FIRST,
    XVF_GUEST_VIRTIO_MMIO_SPI_LAST,
    XVF_VIRTIO_MMIO_DEV_SIZE,
)
from xvf.hotpath.includes.xen_ioreq cimport (
    XVF_IOREQ_DIR_BIT,
    XVF_IOREQ_SERVER_FRAME_BUFIOREQ,
    XVF_IOREQ_SERVER_FRAME_IOREQ,
    XVF_IOREQ_SIZE,
    XVF_IOREQ_STATE_MASK,
    XVF_IOREQ_TYPE_COPY,
    XVF_IOREQ_TYPE_INVALIDATE,
    XVF_PAGE_SIZE,
    XVF_STATE_IOREQ_INPROCESS,
    XVF_STATE_IOREQ_NONE,
    XVF_STATE_IOREQ_READY,
    XVF_STATE_IORESP_READY,
    xvf_ioreq_t,
)
from xvf.hotpath.includes.virtio_ring cimport (
    XVF_VRING_AVAIL_ALIGN,
    XVF_VRING_AVAIL_BYTES,
    XVF_VRING_AVAIL_F_NO_INTERRUPT,
    XVF_VRING_DESC_ALIGN,
    XVF_VRING_DESC_BYTES,
    XVF_VRING_DESC_F_INDIRECT,
    XVF_VRING_DESC_F_NEXT,
    XVF_VRING_DESC_F_WRITE,
    XVF_VRING_MAX_SIZE,
    XVF_VRING_USED_ALIGN,
    XVF_VRING_USED_BYTES,
    XVF_VRING_USED_F_NO_NOTIFY,
    xvf_vring_avail_t,
    xvf_vring_desc_t,
    xvf_vring_used_elem_t,
    xvf_vring_used_t,
)

# Instances to measure offsets against (no null-pointer arithmetic).
cdef xvf_vring_desc_t _desc
cdef xvf_vring_avail_t _avail
cdef xvf_vring_used_elem_t _elem
cdef xvf_vring_used_t _used
cdef xvf_ioreq_t _ioreq


cdef inline size_t _off(const void *field, const void *base):
    return <size_t>(<const char *>field - <const char *>base)


# The Arm guest memory map (public/arch-arm.h) and libxl's virtio-mmio windows.
GUEST_RAM0_BASE = XVF_GUEST_RAM0_BASE
GUEST_RAM0_SIZE = XVF_GUEST_RAM0_SIZE
GUEST_RAM1_BASE = XVF_GUEST_RAM1_BASE
GUEST_RAM1_SIZE = XVF_GUEST_RAM1_SIZE
GUEST_VIRTIO_MMIO_BASE = XVF_GUEST_VIRTIO_MMIO_BASE
GUEST_VIRTIO_MMIO_SIZE = XVF_GUEST_VIRTIO_MMIO_SIZE
GUEST_VIRTIO_MMIO_SPI_FIRST = XVF_GUEST_VIRTIO_MMIO_SPI_FIRST
GUEST_VIRTIO_MMIO_SPI_LAST = XVF_GUEST_VIRTIO_MMIO_SPI_LAST
VIRTIO_MMIO_DEV_SIZE = XVF_VIRTIO_MMIO_DEV_SIZE

# An ioreq slot (public/hvm/ioreq.h), for the software Xen's side of the page.
IOREQ_SIZE = XVF_IOREQ_SIZE
IOREQ_VP_EPORT = _off(&_ioreq.vp_eport, &_ioreq)
IOREQ_FLAGS = _off(&_ioreq.flags, &_ioreq)  # state (low nibble) and direction bits
IOREQ_STATE_MASK = XVF_IOREQ_STATE_MASK
IOREQ_DIR_READ_BIT = XVF_IOREQ_DIR_BIT  # dir = 1: IOREQ_READ
STATE_IOREQ_NONE = XVF_STATE_IOREQ_NONE
STATE_IOREQ_READY = XVF_STATE_IOREQ_READY
STATE_IOREQ_INPROCESS = XVF_STATE_IOREQ_INPROCESS
STATE_IORESP_READY = XVF_STATE_IORESP_READY
IOREQ_TYPE_COPY = XVF_IOREQ_TYPE_COPY
IOREQ_TYPE_INVALIDATE = XVF_IOREQ_TYPE_INVALIDATE
IOREQ_SERVER_FRAME_BUFIOREQ = XVF_IOREQ_SERVER_FRAME_BUFIOREQ
IOREQ_SERVER_FRAME_IOREQ = XVF_IOREQ_SERVER_FRAME_IOREQ(0)

PAGE_SHIFT = XVF_XEN_PAGE_SHIFT
PAGE_SIZE = XVF_PAGE_SIZE
GRANT_DMA_ADDR_OFF = XVF_GRANT_DMA_ADDR_OFF

DESC_F_NEXT = XVF_VRING_DESC_F_NEXT
DESC_F_WRITE = XVF_VRING_DESC_F_WRITE
DESC_F_INDIRECT = XVF_VRING_DESC_F_INDIRECT
AVAIL_F_NO_INTERRUPT = XVF_VRING_AVAIL_F_NO_INTERRUPT
USED_F_NO_NOTIFY = XVF_VRING_USED_F_NO_NOTIFY

DESC_ALIGN = XVF_VRING_DESC_ALIGN
AVAIL_ALIGN = XVF_VRING_AVAIL_ALIGN
USED_ALIGN = XVF_VRING_USED_ALIGN
MAX_SIZE = XVF_VRING_MAX_SIZE

# (offset, size) of each field, in declaration order.
DESC_SIZE = sizeof(xvf_vring_desc_t)
DESC_FIELDS = (
    (_off(&_desc.addr, &_desc), sizeof(_desc.addr)),
    (_off(&_desc.len, &_desc), sizeof(_desc.len)),
    (_off(&_desc.flags, &_desc), sizeof(_desc.flags)),
    (_off(&_desc.next, &_desc), sizeof(_desc.next)),
)
USED_ELEM_SIZE = sizeof(xvf_vring_used_elem_t)
USED_ELEM_FIELDS = (
    (_off(&_elem.id, &_elem), sizeof(_elem.id)),
    (_off(&_elem.len, &_elem), sizeof(_elem.len)),
)

AVAIL_FLAGS = _off(&_avail.flags, &_avail)
AVAIL_IDX = _off(&_avail.idx, &_avail)
AVAIL_RING = _off(&_avail.ring, &_avail)
AVAIL_ENTRY_SIZE = sizeof(_avail.ring[0])
USED_FLAGS = _off(&_used.flags, &_used)
USED_IDX = _off(&_used.idx, &_used)
USED_RING = _off(&_used.ring, &_used)
EVENT_SIZE = sizeof(uint16_t)  # used_event and avail_event


def desc_bytes(unsigned int num) -> int:
    """Bytes of the descriptor table of a queue of `num` entries."""
    return XVF_VRING_DESC_BYTES(num)


def avail_bytes(unsigned int num) -> int:
    """Bytes of the driver area, used_event included."""
    return XVF_VRING_AVAIL_BYTES(num)


def used_bytes(unsigned int num) -> int:
    """Bytes of the device area, avail_event included."""
    return XVF_VRING_USED_BYTES(num)
