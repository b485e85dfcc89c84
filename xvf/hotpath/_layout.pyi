# Stub of the compiled xvf.hotpath._layout (values from include/xvf/*.h).
GUEST_RAM0_BASE: int
GUEST_RAM0_SIZE: int
GUEST_RAM1_BASE: int
GUEST_RAM1_SIZE: int
GUEST_VIRTIO_MMIO_BASE: int
GUEST_VIRTIO_MMIO_SIZE: int
GUEST_VIRTIO_MMIO_SPI_FIRST: int
GUEST_VIRTIO_MMIO_SPI_LAST: int
VIRTIO_MMIO_DEV_SIZE: int
IOREQ_SIZE: int
IOREQ_VP_EPORT: int
IOREQ_FLAGS: int
IOREQ_STATE_MASK: int
IOREQ_DIR_READ_BIT: int
STATE_IOREQ_NONE: int
STATE_IOREQ_READY: int
STATE_IOREQ_INPROCESS: int
STATE_IORESP_READY: int
IOREQ_TYPE_COPY: int
IOREQ_TYPE_INVALIDATE: int
IOREQ_SERVER_FRAME_BUFIOREQ: int
IOREQ_SERVER_FRAME_IOREQ: int

PAGE_SHIFT: int
PAGE_SIZE: int
GRANT_DMA_ADDR_OFF: int

DESC_F_NEXT: int
DESC_F_WRITE: int
DESC_F_INDIRECT: int
AVAIL_F_NO_INTERRUPT: int
USED_F_NO_NOTIFY: int

DESC_ALIGN: int
AVAIL_ALIGN: int
USED_ALIGN: int
MAX_SIZE: int

DESC_SIZE: int
DESC_FIELDS: tuple[tuple[int, int], ...]
USED_ELEM_SIZE: int
USED_ELEM_FIELDS: tuple[tuple[int, int], ...]
AVAIL_FLAGS: int
AVAIL_IDX: int
AVAIL_RING: int
AVAIL_ENTRY_SIZE: int
USED_FLAGS: int
USED_IDX: int
USED_RING: int
EVENT_SIZE: int

def desc_bytes(num: int) -> int: ...
def avail_bytes(num: int) -> int: ...
def used_bytes(num: int) -> int: ...
