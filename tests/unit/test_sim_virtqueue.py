"""The guest's split virtqueue, driven from the device side by a small in-test consumer
that reads the rings out of guest RAM the way a backend does (virtio 1.2 section 2.7).
This tests the ring code; real backends are exercised by the e2e tests."""

from __future__ import annotations

import threading

import pytest

from xvf.errors import GrantError, SimulatorError
from xvf.platform.sim.dma import DirectDma, GrantDma, dma_to_grant
from xvf.platform.sim.grant_table import GrantTable
from xvf.platform.sim.memory import GuestRam
from xvf.platform.sim.virtqueue import DeviceBroke, QueueFull, SplitVirtqueue
from xvf.protocols.virtqueue import (
    AVAIL_IDX_H,
    AVAIL_RING_H,
    DESC,
    DESC_SIZE,
    GRANT_DMA_ADDR_OFF,
    PAGE_SHIFT,
    PAGE_SIZE,
    USED_ELEM_I,
    USED_ID_I,
    USED_IDX_H,
    USED_LEN_I,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_bytes,
    desc_bytes,
    need_event,
    ring_layout,
    used_bytes,
    used_elems_bytes,
)

MIB = 1 << 20


class DeviceSide:
    """What a backend does with the rings: translate addresses, pop chains, push used."""

    def __init__(self, ram: GuestRam, vq: SplitVirtqueue, grants: GrantTable | None = None):
        self.ram, self.size, self.grants = ram, vq.size, grants
        self.desc = self.view(vq.desc_dma, desc_bytes(vq.size), False)
        self.avail = self.view(vq.avail_dma, avail_bytes(vq.size), False).cast("H")
        used = self.view(vq.used_dma, used_bytes(vq.size), True)
        self.used_h = used.cast("H")
        self.used_i = used[: used_elems_bytes(vq.size)].cast("I")
        self.last_avail = 0
        self.used_idx = 0

    def view(self, addr: int, length: int, writable: bool) -> memoryview:
        if self.grants is None:
            return self.ram.view(addr, length)
        assert addr & GRANT_DMA_ADDR_OFF, f"{addr:#x} is not a grant address"
        off = addr & (PAGE_SIZE - 1)
        first = dma_to_grant(addr)
        pages = (off + length + PAGE_SIZE - 1) // PAGE_SIZE
        frames = [self.grants.lookup(first + i, 0, writable) for i in range(pages)]
        assert frames == list(range(frames[0], frames[0] + len(frames)))
        return self.ram.view((frames[0] << PAGE_SHIFT) + off, length)

    def pop(self) -> tuple[int, list[tuple[memoryview, bool]]] | None:
        if self.avail[AVAIL_IDX_H] == self.last_avail:
            return None
        head = self.avail[AVAIL_RING_H + self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        table, i, bufs = self.desc, head, []
        addr, length, flags, nxt = DESC.unpack_from(table, DESC_SIZE * i)
        if flags & VRING_DESC_F_INDIRECT:
            table, i = self.view(addr, length, False), 0
        while True:
            addr, length, flags, nxt = DESC.unpack_from(table, DESC_SIZE * i)
            writable = bool(flags & VRING_DESC_F_WRITE)
            bufs.append((self.view(addr, length, writable), writable))
            if not flags & VRING_DESC_F_NEXT:
                return head, bufs
            i = nxt

    def push(self, head: int, written: int) -> None:
        elem = USED_ELEM_I * (self.used_idx % self.size)
        self.used_i[USED_ID_I + elem] = head
        self.used_i[USED_LEN_I + elem] = written
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.used_h[USED_IDX_H] = self.used_idx

    def serve_one(self) -> bool:
        """Echo: copy all readable bytes into the writable buffers; report bytes written."""
        got = self.pop()
        if got is None:
            return False
        head, bufs = got
        data = b"".join(bytes(v) for v, w in bufs if not w)
        written = 0
        for v, w in bufs:
            if w:
                n = min(len(v), len(data) - written)
                v[:n] = data[written : written + n]
                written += n
        self.push(head, written)
        return True


@pytest.fixture
def ram():
    r = GuestRam(16 * MIB, bank0_size=8 * MIB)
    yield r
    r.close()


@pytest.fixture
def grants():
    g = GrantTable(1024)
    yield g
    g.close()


def test_ring_layout_follows_the_spec_alignment():
    for size in (1, 2, 256, 32768):
        avail, used, total = ring_layout(size)
        assert avail == 16 * size  # descriptor table: 16 bytes per entry, 16-aligned at 0
        assert used % 4 == 0 and used >= avail + 6 + 2 * size
        assert total == used + 6 + 8 * size


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_bad_queue_sizes_refused(ram, size):
    with pytest.raises(SimulatorError):
        SplitVirtqueue(ram, DirectDma(ram), size)


def test_roundtrip_direct(ram):
    vq = SplitVirtqueue(ram, DirectDma(ram), 8)
    dev = DeviceSide(ram, vq)
    src, dst = ram.alloc(4096), ram.alloc(4096)
    ram.write(src, b"hello virtqueue")
    head = vq.add([(src, 15)], [(dst, 64)], token="req-1")
    assert vq.num_free == 6
    assert vq.get_used() == []
    assert dev.serve_one()
    assert vq.get_used() == [("req-1", 15)]
    assert ram.read(dst, 15) == b"hello virtqueue"
    assert vq.num_free == 8
    assert head < 8
    vq.close()


def test_roundtrip_grants_uses_fresh_readonly_and_writable_grants(ram, grants):
    dma = GrantDma(ram, grants, backend_domid=0)
    vq = SplitVirtqueue(ram, dma, 16)
    ring_refs = dma.outstanding()
    dev = DeviceSide(ram, vq, grants)
    src, dst = ram.alloc(8192), ram.alloc(4096)
    ram.write(src + 4000, b"x" * 200)  # crosses a page: two read-only grants
    vq.add([(src + 4000, 200)], [(dst, 200)], token=1)
    assert dma.outstanding() == ring_refs + 3
    head, bufs = dev.pop()
    # The device may read the out buffer but not write it.
    out_addr = DESC.unpack_from(dev.desc, DESC_SIZE * head)[0]
    with pytest.raises(GrantError, match="read-only"):
        grants.lookup(dma_to_grant(out_addr), 0, writable=True)
    bufs[1][0][:] = bytes(bufs[0][0])
    dev.push(head, 200)
    assert vq.get_used() == [(1, 200)]
    assert ram.read(dst, 200) == b"x" * 200
    assert dma.outstanding() == ring_refs  # unmapped on completion
    with pytest.raises(GrantError, match="not granted"):
        grants.lookup(dma_to_grant(out_addr), 0, writable=False)
    # The next request travels on different refs.
    vq.add([(src, 8)], [], token=2)
    new_head = dev.avail[2 + 1]
    assert dma_to_grant(DESC.unpack_from(dev.desc, DESC_SIZE * new_head)[0]) != dma_to_grant(
        out_addr
    )
    vq.close()
    assert dma.outstanding() == 0


def test_indirect_descriptors_take_one_slot(ram):
    vq = SplitVirtqueue(ram, DirectDma(ram), 4, indirect=True)
    dev = DeviceSide(ram, vq)
    bufs = [ram.alloc(4096) for _ in range(6)]
    for i, b in enumerate(bufs[:3]):
        ram.write(b, bytes([65 + i]) * 4)
    vq.add([(b, 4) for b in bufs[:3]], [(b, 4) for b in bufs[3:]], token="ind")
    assert vq.num_free == 3
    head = dev.avail[2]
    assert DESC.unpack_from(dev.desc, DESC_SIZE * head)[2] == VRING_DESC_F_INDIRECT
    assert dev.serve_one()
    assert vq.get_used() == [("ind", 12)]
    assert b"".join(ram.read(b, 4) for b in bufs[3:]) == b"AAAABBBBCCCC"
    assert vq.num_free == 4
    vq.close()
    assert ram.allocated_bytes() == 6 * 4096  # the indirect table was freed


def test_queue_full_and_recovery(ram):
    vq = SplitVirtqueue(ram, DirectDma(ram), 4)
    dev = DeviceSide(ram, vq)
    b = ram.alloc(4096)
    vq.add([(b, 1)], [(b + 1, 1), (b + 2, 1)], token="a")
    with pytest.raises(QueueFull):
        vq.add([(b, 1)], [(b + 1, 1)], token="b")
    vq.add([(b, 1)], [], token="c")
    assert dev.serve_one() and dev.serve_one()
    assert [t for t, _ in vq.get_used()] == ["a", "c"]
    vq.add([(b, 1)], [(b + 1, 1), (b + 2, 1), (b + 3, 1)], token="d")
    vq.close()


def test_bad_used_id_is_detected(ram):
    vq = SplitVirtqueue(ram, DirectDma(ram), 4)
    dev = DeviceSide(ram, vq)
    b = ram.alloc(4096)
    vq.add([(b, 1)], [], token="a")
    dev.pop()
    dev.push(3, 0)  # never a head
    with pytest.raises(DeviceBroke, match="not a head"):
        vq.get_used()


def test_kick_suppression_without_event_idx(ram):
    vq = SplitVirtqueue(ram, DirectDma(ram), 4)
    dev = DeviceSide(ram, vq)
    b = ram.alloc(4096)
    assert not vq.kick_needed()  # nothing added
    vq.add([(b, 1)], [], token=1)
    assert vq.kick_needed()
    dev.used_h[0] = VRING_USED_F_NO_NOTIFY
    vq.add([(b, 1)], [], token=2)
    assert not vq.kick_needed()


def test_need_event_formula():
    assert need_event(0, 1, 0)  # crossed event 0 going 0 -> 1
    assert not need_event(5, 3, 2)
    assert need_event(0xFFFF, 0, 0xFFFE)  # across the 16-bit wrap
    assert not need_event(10, 10, 9)  # the device asked for one past idx 10


def test_event_idx_kick_and_used_event(ram):
    vq = SplitVirtqueue(ram, DirectDma(ram), 8, event_idx=True)
    dev = DeviceSide(ram, vq)
    avail_event = 2 + 4 * 8  # u16 index right after used->ring[8]
    b = ram.alloc(4096)
    dev.used_h[avail_event] = 0  # "kick me when avail idx passes 0"
    vq.add([(b, 1)], [], token=1)
    assert vq.kick_needed()
    dev.used_h[avail_event] = 5  # the device is polling until idx 6
    vq.add([(b, 1)], [], token=2)
    assert not vq.kick_needed()  # idx 1 -> 2 does not pass 5
    for t in range(3, 7):
        vq.add([(b, 1)], [], token=t)
    assert vq.kick_needed()  # idx 2 -> 6 passes 5
    while dev.serve_one():
        pass
    assert len(vq.get_used()) == 6
    assert dev.avail[2 + 8] == 6  # used_event: interrupt me at the next used entry


def test_index_wraparound(ram):
    """70000 requests through an 8-entry queue: avail and used idx wrap past 65535."""
    vq = SplitVirtqueue(ram, DirectDma(ram), 8)
    dev = DeviceSide(ram, vq)
    total = 70000
    buf = ram.alloc(4096)
    done: list[int] = []
    nxt = 0
    while len(done) < total:
        while nxt < total and vq.num_free:
            vq.add([(buf + (nxt % 8) * 8, 8)], [], token=nxt)
            nxt += 1
        while dev.serve_one():
            pass
        done.extend(tok for tok, _ in vq.get_used())
    assert done == list(range(total))  # in order, none lost or duplicated
    assert dev.used_idx == total & 0xFFFF
    assert vq.num_free == 8
    vq.close()


def test_concurrent_device_thread(ram):
    """A device thread consumes while the driver keeps the queue full (kick/interrupt
    handshake through events, as eventfds would carry it)."""
    vq = SplitVirtqueue(ram, DirectDma(ram), 16)
    dev = DeviceSide(ram, vq)
    total = 3000
    buf = ram.alloc(16 * 8)
    kick, irq, stop = threading.Event(), threading.Event(), threading.Event()

    def device():
        while not stop.is_set():
            kick.wait(1)
            kick.clear()
            while dev.serve_one():
                irq.set()

    t = threading.Thread(target=device, daemon=True)
    t.start()
    done: list[int] = []
    nxt = 0
    try:
        while len(done) < total:
            while nxt < total and vq.num_free:
                slot = buf + (nxt % 16) * 8
                ram.write(slot, nxt.to_bytes(8, "little"))
                vq.add([(slot, 8)], [(slot, 8)], token=nxt)
                nxt += 1
            if vq.kick_needed():
                kick.set()
            got = vq.get_used()
            if not got:
                irq.wait(1)
                irq.clear()
            done.extend(tok for tok, _ in got)
    finally:
        stop.set()
        kick.set()
        t.join(timeout=5)
    assert sorted(done) == list(range(total))
    assert vq.num_free == 16
    vq.close()
