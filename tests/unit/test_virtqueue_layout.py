"""xvf.protocols.virtqueue: the split ring as virtio 1.2 section 2.7 lays it out.

The expected numbers here are the spec's, written out by hand; the module gets
its own from the C headers (test_abi_conformance checks those against Linux).
"""

from __future__ import annotations

import struct

import pytest

from xvf.protocols import virtqueue as Q


def test_descriptor_and_used_element_formats() -> None:
    assert Q.DESC.format == "<QIHH" and Q.DESC_SIZE == 16
    assert Q.USED_ELEM.format == "<II" and Q.USED_ELEM_SIZE == 8


def test_flags_alignment_and_limits() -> None:
    assert (Q.VRING_DESC_F_NEXT, Q.VRING_DESC_F_WRITE, Q.VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert Q.VRING_AVAIL_F_NO_INTERRUPT == 1 and Q.VRING_USED_F_NO_NOTIFY == 1
    assert (Q.DESC_ALIGN, Q.AVAIL_ALIGN, Q.USED_ALIGN) == (16, 2, 4)
    assert Q.MAX_QUEUE_SIZE == 32768


def test_xen_page_and_grant_bit() -> None:
    assert Q.PAGE_SHIFT == 12 and Q.PAGE_SIZE == 1 << Q.PAGE_SHIFT
    assert Q.GRANT_DMA_ADDR_OFF == 1 << 63


@pytest.mark.parametrize("num", [1, 2, 8, 256, 1024, 32768])
def test_part_sizes(num: int) -> None:
    assert Q.desc_bytes(num) == 16 * num
    assert Q.avail_bytes(num) == 6 + 2 * num  # flags, idx, ring[num], used_event
    assert Q.used_bytes(num) == 6 + 8 * num  # flags, idx, ring[num], avail_event
    assert Q.used_elems_bytes(num) == 4 + 8 * num


@pytest.mark.parametrize("num", [1, 2, 8, 256, 32768])
def test_ring_layout_in_one_block(num: int) -> None:
    avail, used, total = Q.ring_layout(num)
    assert avail == 16 * num
    assert used == (16 * num + 6 + 2 * num + 3) & ~3
    assert total == used + 6 + 8 * num


def test_word_indices_name_the_fields() -> None:
    num = 8
    avail = bytearray(Q.avail_bytes(num))
    struct.pack_into(f"<HH{num}HH", avail, 0, 0x1111, 0x2222, *range(num), 0x3333)
    h = memoryview(avail).cast("H")
    assert h[Q.AVAIL_FLAGS_H] == 0x1111 and h[Q.AVAIL_IDX_H] == 0x2222
    assert [h[Q.AVAIL_RING_H + i] for i in range(num)] == list(range(num))
    assert h[Q.used_event_h(num)] == 0x3333
    used = bytearray(Q.used_bytes(num))
    elems = [v for i in range(num) for v in (100 + i, 200 + i)]
    struct.pack_into(f"<HH{2 * num}IH", used, 0, 0x4444, 0x5555, *elems, 0x6666)
    uh = memoryview(used).cast("H")
    ui = memoryview(used)[: Q.used_elems_bytes(num)].cast("I")
    assert uh[Q.USED_FLAGS_H] == 0x4444 and uh[Q.USED_IDX_H] == 0x5555
    assert uh[Q.avail_event_h(num)] == 0x6666
    for slot in range(num):
        elem = Q.USED_ELEM_I * slot
        assert (ui[Q.USED_ID_I + elem], ui[Q.USED_LEN_I + elem]) == (100 + slot, 200 + slot)
        assert Q.USED_ELEM.unpack_from(used, Q.used_elems_bytes(slot)) == (100 + slot, 200 + slot)


@pytest.mark.parametrize(
    "desc", [(0, 0, 0, 0), (1 << 63 | 0x1234, 4096, 3, 7), (2**64 - 1, 2**32 - 1, 0xFFFF, 0xFFFF)]
)
def test_descriptor_round_trip(desc: tuple[int, int, int, int]) -> None:
    raw = Q.DESC.pack(*desc)
    assert len(raw) == Q.DESC_SIZE and Q.DESC.unpack(raw) == desc
    addr, length, flags, nxt = desc
    # Little-endian, in field order: addr, len, flags, next.
    assert raw == addr.to_bytes(8, "little") + length.to_bytes(4, "little") + flags.to_bytes(
        2, "little"
    ) + nxt.to_bytes(2, "little")


def test_used_element_round_trip() -> None:
    raw = Q.USED_ELEM.pack(5, 0xDEADBEEF)
    assert raw == (5).to_bytes(4, "little") + (0xDEADBEEF).to_bytes(4, "little")
    assert Q.USED_ELEM.unpack(raw) == (5, 0xDEADBEEF)


def test_need_event() -> None:
    assert Q.need_event(0, 1, 0)  # crossed event 0 going 0 -> 1
    assert not Q.need_event(5, 3, 2)
    assert Q.need_event(0xFFFF, 0, 0xFFFE)  # across the 16-bit wrap
    assert not Q.need_event(10, 10, 9)


def test_align_up() -> None:
    assert [Q.align_up(v, 4) for v in (0, 1, 4, 5)] == [0, 4, 4, 8]


def test_barriers_are_the_hot_paths() -> None:
    from xvf.hotpath import _ioreq

    assert Q.fence_acquire is _ioreq.fence_acquire
    assert Q.fence_release is _ioreq.fence_release
    assert Q.fence_full is _ioreq.fence_full
    for fence in (Q.fence_acquire, Q.fence_release, Q.fence_full):
        fence()
