# Stub of the compiled xvf.hotpath._layout (values from include/xvf/*.h).
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
