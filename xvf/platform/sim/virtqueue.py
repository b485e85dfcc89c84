"""The driver side of a split virtqueue (virtio 1.2 section 2.7) in guest RAM.

The three rings live in one coherent DMA allocation, like Linux's
vring_create_virtqueue_split: descriptor table at 0 (16-byte aligned), avail
ring right after it (2-byte aligned), used ring at the next 4-byte boundary.
Buffers are mapped with the DMA ops for each request and unmapped when the
device returns them, so in grant mode every request travels on fresh grants.

Ordering (real-backends.md pitfall 1): ring indices a backend reads
concurrently are stored through `memoryview.cast("H")`, never with
struct.pack_into, and avail idx is published after the descriptors and ring
slot it covers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from xvf.errors import SimulatorError
from xvf.platform.sim.dma import DmaOps
from xvf.platform.sim.memory import GuestRam
from xvf.protocols.virtqueue import (
    AVAIL_IDX_H,
    AVAIL_RING_H,
    DESC,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_ELEM_I,
    USED_FLAGS_H,
    USED_ID_I,
    USED_IDX_H,
    USED_LEN_I,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_bytes,
    avail_event_h,
    desc_bytes,
    need_event,
    ring_layout,
    used_bytes,
    used_elems_bytes,
    used_event_h,
)


class QueueFull(SimulatorError):
    """Not enough free descriptors for the request (Linux: -ENOSPC)."""


class DeviceBroke(SimulatorError):
    """The device returned something no correct device returns (Linux: BAD_RING)."""


@dataclass
class _InFlight:
    token: object
    descs: list[int] = field(default_factory=list)  # the chain, kept driver-side
    mappings: list[tuple[int, int]] = field(default_factory=list)  # (dma, length)
    indirect_gpa: int | None = None


class SplitVirtqueue:
    """One split virtqueue, driver side."""

    def __init__(
        self,
        ram: GuestRam,
        dma: DmaOps,
        size: int,
        *,
        index: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise SimulatorError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.ram = ram
        self.dma = dma
        self.size = size
        self.index = index
        self.event_idx = event_idx
        self.indirect = indirect
        avail_off, used_off, total = ring_layout(size)
        self._ring_bytes = total
        self.ring_gpa, ring_dma = dma.alloc_coherent(total)
        self.desc_dma = ring_dma
        self.avail_dma = ring_dma + avail_off
        self.used_dma = ring_dma + used_off
        self._desc = ram.view(self.ring_gpa, desc_bytes(size))
        self._avail = ram.view(self.ring_gpa + avail_off, avail_bytes(size)).cast("H")
        used = ram.view(self.ring_gpa + used_off, used_bytes(size))
        self._used_h = used.cast("H")
        self._used_i = used[: used_elems_bytes(size)].cast("I")
        self._used_event = used_event_h(size)
        self._avail_event = avail_event_h(size)
        used.release()
        # Free descriptors are chained through a Python list (the device never
        # reads free descriptors, so their `next` fields need not be written).
        self._next_free = list(range(1, size + 1))
        self._free_head = 0
        self.num_free = size
        self._inflight: list[_InFlight | None] = [None] * size
        self._avail_idx = 0  # shadow of avail->idx
        self._last_used = 0
        self._added_since_kick = 0
        self.closed = False

    # -- adding buffers -----------------------------------------------------
    def add(
        self,
        out_bufs: list[tuple[int, int]],
        in_bufs: list[tuple[int, int]],
        token: object,
    ) -> int:
        """Expose one request: device-readable `out_bufs` then device-writable `in_bufs`
        (each (gpa, length)). Returns the head descriptor index."""
        if self.closed:
            raise SimulatorError(f"virtqueue {self.index} is closed")
        total = len(out_bufs) + len(in_bufs)
        if total == 0:
            raise SimulatorError("a request needs at least one buffer")
        if token is None:
            raise SimulatorError("a request token must not be None")
        use_indirect = self.indirect and total > 1
        needed = 1 if use_indirect else total
        if needed > self.num_free:
            raise QueueFull(
                f"virtqueue {self.index}: {needed} descriptors needed, {self.num_free} free"
            )
        entry = _InFlight(token)
        try:
            segs = []
            for bufs, writes in ((out_bufs, False), (in_bufs, True)):
                for gpa, length in bufs:
                    addr = self.dma.map(gpa, length, writes)
                    entry.mappings.append((addr, length))
                    segs.append((addr, length, VRING_DESC_F_WRITE if writes else 0))
            if use_indirect:
                head = self._add_indirect(entry, segs)
            else:
                head = self._add_direct(entry, segs)
        except Exception:
            for addr, length in entry.mappings:
                self.dma.unmap(addr, length)
            if entry.indirect_gpa is not None:
                self.ram.free(entry.indirect_gpa)
            raise
        self._inflight[head] = entry
        # Ring slot first, then publish the index with a single 16-bit store.
        self._avail[AVAIL_RING_H + self._avail_idx % self.size] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self._avail[AVAIL_IDX_H] = self._avail_idx
        self._added_since_kick += 1
        return head

    def _take_desc(self) -> int:
        d = self._free_head
        self._free_head = self._next_free[d]
        self.num_free -= 1
        return d

    def _add_direct(self, entry: _InFlight, segs: list[tuple[int, int, int]]) -> int:
        descs = entry.descs = [self._take_desc() for _ in segs]
        for i, (addr, length, flags) in enumerate(segs):
            last = i + 1 == len(segs)
            nxt = 0 if last else descs[i + 1]
            DESC.pack_into(
                self._desc,
                descs[i] * DESC_SIZE,
                addr,
                length,
                flags | (0 if last else VRING_DESC_F_NEXT),
                nxt,
            )
        return descs[0]

    def _add_indirect(self, entry: _InFlight, segs: list[tuple[int, int, int]]) -> int:
        table_len = DESC_SIZE * len(segs)
        gpa = self.ram.alloc(table_len)
        entry.indirect_gpa = gpa
        table = self.ram.view(gpa, table_len)
        for i, (addr, length, flags) in enumerate(segs):
            last = i + 1 == len(segs)
            DESC.pack_into(
                table,
                i * DESC_SIZE,
                addr,
                length,
                flags | (0 if last else VRING_DESC_F_NEXT),
                0 if last else i + 1,
            )
        table_dma = self.dma.map(gpa, table_len, False)
        entry.mappings.append((table_dma, table_len))
        head = self._take_desc()
        entry.descs = [head]
        DESC.pack_into(self._desc, head * DESC_SIZE, table_dma, table_len, VRING_DESC_F_INDIRECT, 0)
        return head

    # -- notifications ----------------------------------------------------------
    def kick_needed(self) -> bool:
        """Whether the device wants a notify for what was added since the last call
        (virtqueue_kick_prepare)."""
        added = self._added_since_kick
        self._added_since_kick = 0
        if added == 0:
            return False
        if self.event_idx:
            avail_event = self._used_h[self._avail_event]
            old = (self._avail_idx - added) & 0xFFFF
            return need_event(avail_event, self._avail_idx, old)
        return not self._used_h[USED_FLAGS_H] & VRING_USED_F_NO_NOTIFY

    # -- completions -----------------------------------------------------------
    def get_used(self) -> list[tuple[object, int]]:
        """Take every buffer the device returned: [(token, written_len)], in used order."""
        done: list[tuple[object, int]] = []
        used_idx = self._used_h[USED_IDX_H]
        while self._last_used != used_idx:
            elem = USED_ELEM_I * (self._last_used % self.size)
            head = self._used_i[USED_ID_I + elem]
            written = self._used_i[USED_LEN_I + elem]
            entry = self._inflight[head] if head < self.size else None
            if entry is None:
                raise DeviceBroke(f"virtqueue {self.index}: used id {head} is not a head in flight")
            self._inflight[head] = None
            self._release(head, entry)
            self._last_used = (self._last_used + 1) & 0xFFFF
            done.append((entry.token, written))
            if self._last_used == used_idx:
                used_idx = self._used_h[USED_IDX_H]
        if self.event_idx:
            # Interrupt me at the next buffer (pitfall 7: keep used_event moving).
            self._avail[self._used_event] = self._last_used
        return done

    def _release(self, head: int, entry: _InFlight) -> None:
        # Splice the whole chain back onto the free list (from the driver's own
        # record: the device could have scribbled over the table).
        chain = entry.descs
        for a, b in itertools.pairwise(chain):
            self._next_free[a] = b
        self._next_free[chain[-1]] = self._free_head
        self._free_head = head
        self.num_free += len(chain)
        for addr, length in entry.mappings:
            self.dma.unmap(addr, length)
        if entry.indirect_gpa is not None:
            self.ram.free(entry.indirect_gpa)

    def in_flight(self) -> int:
        return sum(1 for e in self._inflight if e is not None)

    def detach_unused(self) -> list[object]:
        """After a device reset: reclaim every request still in flight; returns the tokens."""
        tokens = []
        for head, entry in enumerate(self._inflight):
            if entry is not None:
                self._inflight[head] = None
                self._release(head, entry)
                tokens.append(entry.token)
        return tokens

    def close(self) -> None:
        """Free the rings (the device must be reset or the queue disabled first)."""
        if self.closed:
            return
        self.detach_unused()
        self.closed = True
        for v in (self._used_i, self._used_h, self._avail, self._desc):
            v.release()
        self.dma.free_coherent(self.ring_gpa, self._ring_bytes, self.desc_dma)
