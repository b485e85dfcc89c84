"""The split virtqueue's layout (virtio 1.2 section 2.7): one module for every part of
xvf that reads or writes a ring (grant relay, grant layout, device, simulated driver).

Every fact comes from the C headers (include/xvf/virtio_ring.h, and xen_grant.h /
xen_ioreq.h for the Xen page and the grant address bit) through the compiled
xvf.hotpath._layout; this module only turns them into struct formats, ring sizes
and the indices of the words in the ring views, so no number here is typed twice.

Ring indices that another party reads concurrently are accessed through
`memoryview.cast("H")` (driver area, event words) and `cast("I")` (used
elements), one aligned store each, never with struct.pack_into (real-backends.md
pitfall 1). The `*_H` names below index such a u16 view, the `*_I` names a u32
view of the same part.
"""

from __future__ import annotations

import struct

from xvf.hotpath import _layout as _L
from xvf.hotpath._ioreq import fence_acquire, fence_full, fence_release

__all__ = [
    "AVAIL_ALIGN",
    "AVAIL_FLAGS_H",
    "AVAIL_IDX_H",
    "AVAIL_RING_H",
    "DESC",
    "DESC_ALIGN",
    "DESC_SIZE",
    "GRANT_DMA_ADDR_OFF",
    "MAX_QUEUE_SIZE",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "USED_ALIGN",
    "USED_ELEM",
    "USED_ELEM_I",
    "USED_ELEM_SIZE",
    "USED_FLAGS_H",
    "USED_IDX_H",
    "USED_ID_I",
    "USED_LEN_I",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_USED_F_NO_NOTIFY",
    "align_up",
    "avail_bytes",
    "avail_event_h",
    "desc_bytes",
    "fence_acquire",
    "fence_full",
    "fence_release",
    "need_event",
    "ring_layout",
    "used_bytes",
    "used_elems_bytes",
    "used_event_h",
]

# -- Xen facts the rings depend on ---------------------------------------------------
PAGE_SHIFT: int = _L.PAGE_SHIFT  # Xen's page, whatever page size the Dom0 kernel uses
PAGE_SIZE: int = _L.PAGE_SIZE
GRANT_DMA_ADDR_OFF: int = _L.GRANT_DMA_ADDR_OFF  # (ref << PAGE_SHIFT) + offset, this bit set

# -- flags, alignment, size limit -----------------------------------------------------
VRING_DESC_F_NEXT: int = _L.DESC_F_NEXT
VRING_DESC_F_WRITE: int = _L.DESC_F_WRITE
VRING_DESC_F_INDIRECT: int = _L.DESC_F_INDIRECT
VRING_AVAIL_F_NO_INTERRUPT: int = _L.AVAIL_F_NO_INTERRUPT
VRING_USED_F_NO_NOTIFY: int = _L.USED_F_NO_NOTIFY
DESC_ALIGN: int = _L.DESC_ALIGN
AVAIL_ALIGN: int = _L.AVAIL_ALIGN
USED_ALIGN: int = _L.USED_ALIGN
MAX_QUEUE_SIZE: int = _L.MAX_SIZE

_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _little_endian_struct(fields: tuple[tuple[int, int], ...], size: int) -> struct.Struct:
    """struct.Struct of a C struct given as (offset, size) of its unsigned fields."""
    fmt, at = "<", 0
    for offset, width in fields:
        if offset < at:
            raise ImportError(f"overlapping fields in {fields}")
        if offset > at:
            fmt += f"{offset - at}x"  # padding the compiler put there
        fmt += _CODES[width]
        at = offset + width
    if size > at:
        fmt += f"{size - at}x"
    layout = struct.Struct(fmt)
    if layout.size != size:
        raise ImportError(f"{fmt!r} is {layout.size} bytes, the C struct {size}")
    return layout


# A descriptor: addr, len, flags, next.
DESC = _little_endian_struct(_L.DESC_FIELDS, _L.DESC_SIZE)
DESC_SIZE: int = DESC.size
# A used element: id, len.
USED_ELEM = _little_endian_struct(_L.USED_ELEM_FIELDS, _L.USED_ELEM_SIZE)
USED_ELEM_SIZE: int = USED_ELEM.size

# -- sizes ------------------------------------------------------------------------
desc_bytes = _L.desc_bytes  # descriptor table of `num` entries
avail_bytes = _L.avail_bytes  # driver area, used_event included
used_bytes = _L.used_bytes  # device area, avail_event included


def used_elems_bytes(num: int) -> int:
    """The device area up to the end of its elements (what a u32 view may cover)."""
    return _L.USED_RING + USED_ELEM_SIZE * num


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def ring_layout(num: int) -> tuple[int, int, int]:
    """(avail offset, used offset, total bytes) of a queue's three parts in one block,
    as Linux's vring_create_virtqueue_split lays them out: table at 0, driver area
    right after it, device area at the next boundary it needs."""
    avail = align_up(desc_bytes(num), AVAIL_ALIGN)
    used = align_up(avail + avail_bytes(num), USED_ALIGN)
    return avail, used, used + used_bytes(num)


# -- word indices in the ring views ------------------------------------------------------
AVAIL_FLAGS_H: int = _L.AVAIL_FLAGS // _L.EVENT_SIZE
AVAIL_IDX_H: int = _L.AVAIL_IDX // _L.EVENT_SIZE
AVAIL_RING_H: int = _L.AVAIL_RING // _L.AVAIL_ENTRY_SIZE  # + slot
USED_FLAGS_H: int = _L.USED_FLAGS // _L.EVENT_SIZE
USED_IDX_H: int = _L.USED_IDX // _L.EVENT_SIZE
USED_ELEM_I: int = USED_ELEM_SIZE // 4  # words per used element
USED_ID_I: int = (_L.USED_RING + _L.USED_ELEM_FIELDS[0][0]) // 4  # + USED_ELEM_I * slot
USED_LEN_I: int = (_L.USED_RING + _L.USED_ELEM_FIELDS[1][0]) // 4  # + USED_ELEM_I * slot


def used_event_h(num: int) -> int:
    """Index of used_event in the driver area's u16 view (after ring[num])."""
    return AVAIL_RING_H + num


def avail_event_h(num: int) -> int:
    """Index of avail_event in the device area's u16 view (after ring[num])."""
    return used_elems_bytes(num) // _L.EVENT_SIZE


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event (2.7.10): did the index pass `event_idx` going from old to new?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
