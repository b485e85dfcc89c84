"""Shadow-virtqueue relay: grant-mode guests served by backends that cannot map grants.

In grant mode every address the guest puts in a ring is a grant DMA address
(bit 63 set, `(first_ref << 12) + offset`, consecutive refs per page). A
standard vhost-user backend only understands addresses inside the memory
regions it was given. So xvf gives it one region it owns (`ShadowMemory`),
builds a shadow split ring there per guest queue, and relays requests
(`GrantRelayQueue`): guest kick -> map the request's grants, copy the
device-readable bytes into bounce buffers, post a shadow chain, kick the
backend; backend call -> copy the written bytes back, complete the guest's
used ring, unmap, interrupt. This is the technique of QEMU's vDPA shadow
virtqueues.

Malformed guest chains are never forwarded: they are completed with used len 0
and counted in `GrantRelayQueue.bad_requests` (for virtio-blk the guest then
sees a request that wrote nothing, not a status, which is good enough for a
broken or hostile driver). A head index out of range cannot be completed at all
(there is no such request); it is counted and skipped.

Ordering (real-backends.md pitfall 1): ring indices are stored through
`memoryview.cast("H")`, each after the entries it publishes.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from xvf.errors import GrantError, GuestError, XvfError
from xvf.hotpath._gnttab import GrantMapping
from xvf.hotpath._ioreq import MmioState
from xvf.protocols import virtio as V
from xvf.protocols.vhost_user_wire import VhostUserRegion
from xvf.protocols.virtqueue import (
    AVAIL_ALIGN,
    AVAIL_IDX_H,
    AVAIL_RING_H,
    DESC,
    DESC_ALIGN,
    DESC_SIZE,
    GRANT_DMA_ADDR_OFF,
    MAX_QUEUE_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    USED_ALIGN,
    USED_ELEM_I,
    USED_ID_I,
    USED_IDX_H,
    USED_LEN_I,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    avail_bytes,
    avail_event_h,
    desc_bytes,
    fence_acquire,
    fence_full,
    fence_release,
    ring_layout,
    used_bytes,
    used_elems_bytes,
    used_event_h,
)
from xvf.ratelimit import RateLimitedLog

log = logging.getLogger("xvf.protocols.grant_relay")

MAX_REFS_PER_MAP = 4096  # gntdev / the simulator refuse more in one map
DEFAULT_SHADOW_SIZE = 64 << 20

# Feature bits the guest must not be offered in relay mode: the relay completes
# in backend order, not necessarily in avail order (IN_ORDER). Packed rings are
# never offered by xvf. INDIRECT_DESC is supported (tables are flattened into
# the shadow ring). EVENT_IDX works either way: the relay keeps avail_event
# (guest) and used_event (shadow) at "notify me of every buffer" and simply
# always notifies the other side (extra notifications are allowed); masking it
# too saves nothing measurable here.
GUEST_FEATURE_MASK = ~(1 << V.F_IN_ORDER)


def relay_guest_features(features: int) -> int:
    """The device features to offer a grant-mode guest when the relay serves it."""
    return features & GUEST_FEATURE_MASK


class GrantPages(Protocol):
    """What the relay needs of a grant mapper: only mapping and unmapping. The
    platform's GrantMapper (xvf.platform.interface) is one; declared here so that
    this protocol layer needs nothing from the platform layer above it."""

    def map(self, refs: list[int], writable: bool) -> GrantMapping: ...
    def map_many(self, groups: list[tuple[list[int], bool]]) -> list[GrantMapping]: ...
    def unmap(self, refs: list[int]) -> None: ...


class RelayError(GuestError):
    """A guest descriptor chain the relay refuses (completed with used len 0)."""


# -- shadow memory ----------------------------------------------------------------
class ShadowMemory:
    """One memfd owned by xvf: the only memory region the backend sees (gpa 0..size).

    A first-fit allocator hands out shadow rings and bounce buffers; the first
    page is never handed out so no shadow address is 0.
    """

    ALIGN = 64

    def __init__(self, size: int = DEFAULT_SHADOW_SIZE) -> None:
        if size < 2 * PAGE_SIZE or size % PAGE_SIZE:
            raise XvfError(f"shadow memory size {size:#x} must be pages, at least two")
        self.size = size
        self.fd = os.memfd_create("xvf-shadow", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mmap = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.uva = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        self.mem = memoryview(self._mmap)
        self._free: list[tuple[int, int]] = [(PAGE_SIZE, size - PAGE_SIZE)]  # sorted (off, len)
        self._used: dict[int, int] = {}
        self.capacity = size - PAGE_SIZE
        # Queues stalled for lack of space; retried whenever space is freed.
        self.waiters: list[Callable[[], None]] = []

    def region(self) -> VhostUserRegion:
        return VhostUserRegion(gpa=0, size=self.size, uva=self.uva, fd=self.fd, fd_offset=0)

    def alloc(self, length: int, align: int = ALIGN) -> int | None:
        """Offset (== shadow gpa) of `length` free bytes, or None when full."""
        length = max(align, (length + align - 1) // align * align)
        for i, (off, span) in enumerate(self._free):
            start = (off + align - 1) // align * align
            pad = start - off
            if span >= pad + length:
                rest = []
                if pad:
                    rest.append((off, pad))
                if span > pad + length:
                    rest.append((start + length, span - pad - length))
                self._free[i : i + 1] = rest
                self._used[start] = length
                return start
        return None

    def free(self, offset: int) -> None:
        length = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, length))
        self._free.insert(i, (offset, length))
        # Coalesce with the neighbours.
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
            length += self._free.pop(i + 1)[1]
            self._free[i] = (offset, length)
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + length)

    def wake_waiters(self) -> None:
        waiters, self.waiters = self.waiters, []
        for retry in waiters:
            retry()

    def close(self) -> None:
        self.mem.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still exported; the mapping goes with the process
        os.close(self.fd)


# -- guest address helpers -----------------------------------------------------------
def grant_span(addr: int, length: int) -> tuple[list[int], int]:
    """The grant refs a grant DMA address range covers and its offset in the first page."""
    if not addr & GRANT_DMA_ADDR_OFF:
        raise RelayError(f"address {addr:#x} is not a grant address (bit 63 clear)")
    if length <= 0:
        raise RelayError(f"grant range of length {length}")
    raw = addr & ~GRANT_DMA_ADDR_OFF
    offset = raw & (PAGE_SIZE - 1)
    first = raw >> PAGE_SHIFT
    count = (offset + length + PAGE_SIZE - 1) >> PAGE_SHIFT
    if count > MAX_REFS_PER_MAP or first + count > 1 << 32:
        raise RelayError(f"grant range {addr:#x}+{length:#x} is too large or out of range")
    return list(range(first, first + count)), offset


class _Grants:
    """One gntdev mapping of a list of refs, shared by `users` holders: the last `put()`
    (or `release()`) unmaps it. `offset` is where the mapped range starts in it. With
    `unmaps`, the refs to give back are collected there (the relay gives them back in
    one call before the guest can see the requests complete) instead of at once."""

    def __init__(
        self,
        mapper: GrantPages,
        refs: list[int],
        mapping: GrantMapping,
        offset: int = 0,
        unmaps: list[int] | None = None,
    ) -> None:
        self.mapper = mapper
        self.refs = refs
        self.mapping = mapping
        self.offset = offset
        self.users = 1
        self._unmaps = unmaps

    @classmethod
    def span(
        cls,
        mapper: GrantPages,
        addr: int,
        length: int,
        writable: bool,
        unmaps: list[int] | None = None,
    ) -> _Grants:
        refs, offset = grant_span(addr, length)
        try:
            mapping = mapper.map(refs, writable)
        except GrantError as exc:
            raise RelayError(f"grant {addr:#x}+{length:#x} refused: {exc}") from None
        return cls(mapper, refs, mapping, offset, unmaps)

    def put(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.release()

    def release(self) -> None:
        self.mapping.close()
        if self._unmaps is not None:
            self._unmaps.extend(self.refs)
        else:
            self.mapper.unmap(self.refs)


# -- one relayed queue --------------------------------------------------------------
@dataclass
class _Segment:
    addr: int
    length: int
    writable: bool


@dataclass
class _Request:
    guest_head: int
    segments: list[_Segment]
    refs: int = 0  # grant refs its segments span
    bounce: int = -1  # shadow offset of the request's bounce block
    offsets: list[int] = field(default_factory=list)  # each segment's bounce offset
    shadow_descs: list[int] = field(default_factory=list)
    # device-writable segments: (mapping, start in it, length, bounce offset)
    writes: list[tuple[_Grants, int, int, int]] = field(default_factory=list)


# Requests whose device-readable grants one kick maps together (with QD32 and
# EVENT_IDX a kick usually finds many): one gntdev map for all of them, copied and
# unmapped at once, plus one per request for its device-writable segments.
MAX_BATCH = 64


class GrantRelayQueue:
    """Relays one guest split virtqueue through a shadow ring in `shadow`."""

    def __init__(
        self,
        index: int,
        num: int,
        desc: int,
        avail: int,
        used: int,
        mapper: GrantPages,
        shadow: ShadowMemory,
        state: MmioState,
        kick_fd_to_backend: int,
        call_fd_from_backend: int = -1,
        label: str = "",
        on_broken: Callable[[str], None] | None = None,
    ) -> None:
        """`on_broken(why)`: the guest broke the ring itself (an avail index further
        ahead than the queue is long, a head outside it): the queue stops and the
        device is to be marked DEVICE_NEEDS_RESET, as QEMU's virtio_error does."""
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise GuestError(
                f"queue {index}: size {num} is not a power of two up to {MAX_QUEUE_SIZE}"
            )
        parts = (
            ("desc", desc, DESC_ALIGN),
            ("avail", avail, AVAIL_ALIGN),
            ("used", used, USED_ALIGN),
        )
        for name, addr, align in parts:
            if addr % align:
                raise GuestError(f"queue {index}: {name} ring {addr:#x} is not {align}-aligned")
        self.index = index
        # who logs: domN/typeM queue I (the journal shows no other context)
        self.where = f"{label} queue {index}".strip()
        self.num = num
        self.mapper = mapper
        self.shadow = shadow
        self.state = state
        self.backend_kick_fd = kick_fd_to_backend
        self.backend_call_fd = call_fd_from_backend  # drained by on_backend_call if >= 0
        self.bad_requests = 0
        # for `xvf status`: requests relayed and bytes copied (to the shadow and back)
        self.relayed_requests = 0
        self.copied_bytes = 0
        self.stalled = False
        self.stopped = False
        self.broken = False  # the guest broke the ring: nothing more is relayed
        self.quiesced = False  # a reset is stopping the ring: nothing more is posted
        self.on_broken = on_broken
        self._refusals = RateLimitedLog(log)
        self._lies = RateLimitedLog(log)
        self._used_event = used_event_h(num)
        self._avail_event = avail_event_h(num)
        self._grants: list[_Grants] = []
        self._unmaps: list[int] = []  # refs of closed mappings, given back by _give_back
        self._views: list[memoryview] = []
        try:
            self._guest_desc = self._map_ring(desc, desc_bytes(num), False)
            self._guest_avail = self._map_ring(avail, avail_bytes(num), False).cast("H")
            used_raw = self._map_ring(used, used_bytes(num), True)
            self._guest_used_h = used_raw.cast("H")
            self._guest_used_i = used_raw[: used_elems_bytes(num)].cast("I")
            self._views += [self._guest_avail, self._guest_used_h, self._guest_used_i]
            self._build_shadow_ring()
        except Exception:
            self._release_rings()
            raise
        self.guest_kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.last_avail = 0  # next guest avail slot to take
        self._guest_used_idx = 0
        self._shadow_avail_idx = 0
        self._shadow_last_used = 0
        self._free_descs = list(range(num - 1, -1, -1))  # a stack of shadow descriptors
        self._inflight: dict[int, _Request] = {}  # shadow head -> request

    @property
    def counters(self) -> tuple[int, int, int]:
        """(requests relayed, bytes copied, bad requests), for `xvf status`."""
        return self.relayed_requests, self.copied_bytes, self.bad_requests

    def _map_ring(self, addr: int, length: int, writable: bool) -> memoryview:
        try:
            g = _Grants.span(self.mapper, addr, length, writable)
        except RelayError as exc:
            raise GuestError(f"queue {self.index}: ring: {exc}") from None
        self._grants.append(g)
        view = memoryview(g.mapping)[g.offset : g.offset + length]
        self._views.append(view)
        return view

    def _build_shadow_ring(self) -> None:
        n = self.num
        avail_off, used_off, total = ring_layout(n)
        base = self.shadow.alloc(total, PAGE_SIZE)
        if base is None:
            raise XvfError(f"queue {self.index}: no room for a shadow ring of {total} bytes")
        self._ring_base = base
        self.shadow.mem[base : base + total] = bytes(total)
        self.shadow_desc = base
        self.shadow_avail = base + avail_off
        self.shadow_used = base + used_off
        mem = self.shadow.mem
        self._sdesc = mem[base : base + desc_bytes(n)]
        self._savail = mem[self.shadow_avail : self.shadow_avail + avail_bytes(n)].cast("H")
        sused = mem[self.shadow_used : self.shadow_used + used_bytes(n)]
        self._sused_h = sused.cast("H")
        self._sused_i = sused[: used_elems_bytes(n)].cast("I")
        self._views += [self._sdesc, self._savail, sused, self._sused_h, self._sused_i]

    @property
    def vring_addrs(self) -> tuple[int, int, int]:
        """(desc, avail, used) front-end addresses of the shadow ring, for SET_VRING_ADDR."""
        u = self.shadow.uva
        return u + self.shadow_desc, u + self.shadow_avail, u + self.shadow_used

    # -- guest -> backend --------------------------------------------------------
    def on_guest_kick(self) -> None:
        try:
            os.read(self.guest_kick_fd, 8)
        except BlockingIOError:
            pass
        self._process_avail()

    def _break(self, why: str) -> None:
        self.broken = True
        if self.on_broken is not None:
            self.on_broken(f"queue {self.index}: {why}")

    def _process_avail(self) -> None:
        if self.stopped or self.broken or self.quiesced:
            return
        self.stalled = False
        batch: list[_Request] = []
        batch_refs = posted = completed = 0
        while True:
            ahead = (self._guest_avail[AVAIL_IDX_H] - self.last_avail) & 0xFFFF
            if ahead > self.num:
                # Bounded work per kick: never walk entries that cannot exist.
                self._break(
                    f"avail index {self._guest_avail[AVAIL_IDX_H]} is {ahead} entries ahead of "
                    f"{self.last_avail}, more than the queue's {self.num}"
                )
                break
            if self.last_avail == self._guest_avail[AVAIL_IDX_H]:
                # EVENT_IDX: ask for a kick at the very next buffer, then look again
                # so a buffer published meanwhile (guest saw the old value) is not lost.
                self._guest_used_h[self._avail_event] = self.last_avail
                fence_full()
                if self.last_avail == self._guest_avail[AVAIL_IDX_H]:
                    break
            fence_acquire()  # the entry and its descriptors after the index that covers them
            head = self._guest_avail[AVAIL_RING_H + self.last_avail % self.num]
            if head >= self.num:
                self.bad_requests += 1
                self._break(f"avail entry {self.last_avail} names head {head} of {self.num}")
                break
            try:
                req = _Request(head, self._walk_chain(head))
                req.refs = sum(len(grant_span(s.addr, s.length)[0]) for s in req.segments)
            except RelayError as exc:
                self._refuse(head, exc)
                completed += 1
                self.last_avail = (self.last_avail + 1) & 0xFFFF
                continue
            if batch and (len(batch) >= MAX_BATCH or batch_refs + req.refs > MAX_REFS_PER_MAP):
                p, c = self._post_batch(batch)
                posted, completed = posted + p, completed + c
                batch, batch_refs = [], 0
            if not self._reserve(req):
                self._stall()
                break  # resumed by the completions that free room
            batch.append(req)
            batch_refs += req.refs
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        if batch:
            p, c = self._post_batch(batch)
            posted, completed = posted + p, completed + c
        if posted:  # the backend first: giving grants back is one more round trip
            os.write(self.backend_kick_fd, (1).to_bytes(8, "little"))
        self._give_back()
        if completed:
            fence_release()
            self._guest_used_h[USED_IDX_H] = self._guest_used_idx
            self.state.raise_interrupt(1)

    def _give_back(self) -> None:
        """Give back the grants of closed mappings, in one call: before the guest can
        see their requests completed, as it may end its grants then."""
        if self._unmaps:
            refs, self._unmaps[:] = list(self._unmaps), []
            self.mapper.unmap(refs)

    def _refuse(self, head: int, exc: RelayError) -> None:
        self._refusals(logging.WARNING, "%s: request %d refused: %s", self.where, head, exc)
        self.bad_requests += 1
        self._complete_guest(head, 0)

    def _stall(self) -> None:
        self.stalled = True
        self.shadow.waiters.append(self._process_avail)

    def _walk_chain(self, head: int) -> list[_Segment]:
        """Read and validate the chain once (the guest may change it behind us)."""
        addr, length, flags, nxt = DESC.unpack_from(self._guest_desc, DESC_SIZE * head)
        if flags & VRING_DESC_F_INDIRECT:
            if flags & VRING_DESC_F_NEXT:
                raise RelayError("indirect descriptor chained with NEXT")
            return self._walk_indirect(addr, length)
        segments: list[_Segment] = []
        idx = head
        while True:
            if flags & VRING_DESC_F_INDIRECT:
                raise RelayError("indirect descriptor inside a chain")
            segments.append(_Segment(addr, length, bool(flags & VRING_DESC_F_WRITE)))
            if not flags & VRING_DESC_F_NEXT:
                return self._checked(segments)
            if len(segments) >= self.num:
                raise RelayError(f"chain from {head} is longer than the queue (a loop)")
            idx = nxt
            if idx >= self.num:
                raise RelayError(f"next index {idx} out of range")
            addr, length, flags, nxt = DESC.unpack_from(self._guest_desc, DESC_SIZE * idx)

    def _walk_indirect(self, addr: int, length: int) -> list[_Segment]:
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.num:
            raise RelayError(f"indirect table of {length} bytes")
        table = _Grants.span(self.mapper, addr, length, False, self._unmaps)
        try:
            with memoryview(table.mapping) as raw:
                data = bytes(raw[table.offset : table.offset + length])
        finally:
            table.release()
        count = length // DESC_SIZE
        segments: list[_Segment] = []
        i = 0
        while True:
            a, n, f, nxt = DESC.unpack_from(data, DESC_SIZE * i)
            if f & VRING_DESC_F_INDIRECT:
                raise RelayError("nested indirect descriptor")
            segments.append(_Segment(a, n, bool(f & VRING_DESC_F_WRITE)))
            if not f & VRING_DESC_F_NEXT:
                return self._checked(segments)
            if len(segments) >= count:
                raise RelayError("indirect chain longer than its table (a loop)")
            if nxt >= count:
                raise RelayError(f"indirect next index {nxt} out of range")
            i = nxt

    def _checked(self, segments: list[_Segment]) -> list[_Segment]:
        total = 0
        for s in segments:
            if not s.addr & GRANT_DMA_ADDR_OFF:
                raise RelayError(f"address {s.addr:#x} is not a grant address")
            if s.length == 0:
                raise RelayError("zero-length descriptor")
            total += (s.length + ShadowMemory.ALIGN - 1) // ShadowMemory.ALIGN * ShadowMemory.ALIGN
        if total > self.shadow.capacity // 2:
            raise RelayError(f"request of {total} bytes exceeds the relay's bounce space")
        return segments

    def _reserve(self, req: _Request) -> bool:
        """Shadow descriptors and a bounce block for `req`; False (nothing held) if full."""
        if len(req.segments) > len(self._free_descs):
            return False
        align = ShadowMemory.ALIGN
        sizes = [(s.length + align - 1) // align * align for s in req.segments]
        bounce = self.shadow.alloc(sum(sizes))
        if bounce is None:
            return False
        req.bounce = bounce
        req.offsets = []
        off = bounce
        for size in sizes:
            req.offsets.append(off)
            off += size
        req.shadow_descs = [self._free_descs.pop() for _ in req.segments]
        return True

    def _post_batch(self, batch: list[_Request]) -> tuple[int, int]:
        """Map the batch's grants (two maps for all), copy, post; returns (posted, refused).
        If a batch map is refused, each request is mapped alone, so that only the one
        with a bad grant is refused, as without batching."""
        if not self._fill_batch(batch):
            kept = []
            for req in batch:
                try:
                    self._fill_alone(req)
                    kept.append(req)
                except RelayError as exc:
                    self._release_request(req)
                    self._refuse(req.guest_head, exc)
            refused = len(batch) - len(kept)
            batch = kept
        else:
            refused = 0
        for req in batch:
            self._publish(req)
        if batch:
            fence_release()  # descriptors, bounce data and entries before the index
            self._savail[AVAIL_IDX_H] = self._shadow_avail_idx  # published last
        return len(batch), refused

    def _fill_batch(self, batch: list[_Request]) -> bool:
        """The batch's device-readable segments through one mapping, copied and unmapped
        at once; each request's device-writable segments through one mapping of its own,
        kept until it completes (the guest may end its grants as soon as it sees the
        request used, so no mapping may outlive the request it belongs to)."""
        readable: list[tuple[_Segment, int, int]] = []  # (segment, start in map, bounce)
        ro_refs: list[int] = []
        writable: list[tuple[_Request, list[int], list[tuple[_Segment, int, int]]]] = []
        for req in batch:
            rw_refs: list[int] = []
            rw_segs: list[tuple[_Segment, int, int]] = []
            for seg, bounce in zip(req.segments, req.offsets, strict=True):
                refs, offset = grant_span(seg.addr, seg.length)
                if seg.writable:
                    rw_segs.append((seg, len(rw_refs) * PAGE_SIZE + offset, bounce))
                    rw_refs += refs
                else:
                    readable.append((seg, len(ro_refs) * PAGE_SIZE + offset, bounce))
                    ro_refs += refs
            if rw_refs:
                writable.append((req, rw_refs, rw_segs))
        groups = [(ro_refs, False)] if ro_refs else []
        groups += [(rw_refs, True) for _, rw_refs, _ in writable]
        try:
            maps = self.mapper.map_many(groups)  # one request to the hypervisor's side
        except GrantError:
            return False
        mem = self.shadow.mem
        ro = _Grants(self.mapper, ro_refs, maps[0], unmaps=self._unmaps) if ro_refs else None
        mapped = [
            (req, _Grants(self.mapper, rw_refs, m, unmaps=self._unmaps), rw_segs)
            for (req, rw_refs, rw_segs), m in zip(
                writable, maps[1 if ro_refs else 0 :], strict=True
            )
        ]
        if ro is not None:
            try:
                with memoryview(ro.mapping) as raw:
                    for seg, start, bounce in readable:
                        mem[bounce : bounce + seg.length] = raw[start : start + seg.length]
                        self.copied_bytes += seg.length
            finally:
                ro.release()  # copied now, so the grants are released now
        for req, g, rw_segs in mapped:
            g.users = len(rw_segs)
            with memoryview(g.mapping) as raw:
                for seg, start, bounce in rw_segs:
                    # The whole area goes back at completion (backends under-report
                    # `len`): start it as the guest's bytes, never stale bounce bytes.
                    mem[bounce : bounce + seg.length] = raw[start : start + seg.length]
                    req.writes.append((g, start, seg.length, bounce))
        return True

    def _fill_alone(self, req: _Request) -> None:
        """`req`'s segments, each through its own mapping (a batch map was refused)."""
        mem = self.shadow.mem
        for seg, bounce in zip(req.segments, req.offsets, strict=True):
            g = _Grants.span(self.mapper, seg.addr, seg.length, seg.writable, self._unmaps)
            start = g.offset
            if seg.writable:
                req.writes.append((g, start, seg.length, bounce))
                with memoryview(g.mapping) as raw:
                    mem[bounce : bounce + seg.length] = raw[start : start + seg.length]
            else:
                try:
                    with memoryview(g.mapping) as raw:
                        mem[bounce : bounce + seg.length] = raw[start : start + seg.length]
                finally:
                    g.release()
                self.copied_bytes += seg.length

    def _publish(self, req: _Request) -> None:
        descs = req.shadow_descs
        for i, (s, gpa) in enumerate(zip(req.segments, req.offsets, strict=True)):
            last = i + 1 == len(descs)
            flags = (VRING_DESC_F_WRITE if s.writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            DESC.pack_into(
                self._sdesc, DESC_SIZE * descs[i], gpa, s.length, flags, 0 if last else descs[i + 1]
            )
        self._inflight[descs[0]] = req
        self._savail[AVAIL_RING_H + self._shadow_avail_idx % self.num] = descs[0]
        self._shadow_avail_idx = (self._shadow_avail_idx + 1) & 0xFFFF
        self.relayed_requests += 1

    def _release_request(self, req: _Request) -> None:
        for g, _, _, _ in req.writes:
            g.put()
        req.writes.clear()
        if req.bounce >= 0:
            self.shadow.free(req.bounce)
            req.bounce = -1
        self._free_descs.extend(req.shadow_descs)
        req.shadow_descs = []

    # -- backend -> guest ----------------------------------------------------------
    def on_backend_call(self) -> None:
        if self.backend_call_fd >= 0:
            try:
                os.read(self.backend_call_fd, 8)
            except BlockingIOError:
                pass
        if self.stopped:
            return
        completed = 0
        used_idx = self._sused_h[USED_IDX_H]
        while self._shadow_last_used != used_idx:
            fence_acquire()  # entries after the index that covers them
            slot = self._shadow_last_used % self.num
            elem = USED_ELEM_I * slot
            shead, written = self._sused_i[USED_ID_I + elem], self._sused_i[USED_LEN_I + elem]
            self._shadow_last_used = (self._shadow_last_used + 1) & 0xFFFF
            req = self._inflight.pop(shead, None)
            if req is None:
                self._lies(
                    logging.ERROR, "%s: backend used id %d is not in flight", self.where, shead
                )
                continue
            self._complete_guest(req.guest_head, self._copy_back(req, written))
            self._release_request(req)
            completed += 1
            if self._shadow_last_used == used_idx:
                # EVENT_IDX on the shadow ring: call me at the next completion.
                self._savail[self._used_event] = self._shadow_last_used
                fence_full()
                used_idx = self._sused_h[USED_IDX_H]
        self._give_back()
        if completed:
            fence_release()  # used entries and copied-back data before the index
            self._guest_used_h[USED_IDX_H] = self._guest_used_idx  # published last
            self.state.raise_interrupt(1)
            self.shadow.wake_waiters()

    def _copy_back(self, req: _Request, written: int) -> int:
        """Copy the request's whole device-writable area back to the guest; returns the
        used length to report: the backend's, capped at that area.

        The whole area, not `written` bytes: backends under-report (rust-vmm's
        vhost-device-i2c says 1 for a failed transfer whose status byte trails the
        read buffer), and a guest driver may read the status and ignore the length.
        Bytes the backend did not write go back as the guest's own (see _post)."""
        mem = self.shadow.mem
        total = 0
        for g, start, length, off in req.writes:
            with memoryview(g.mapping) as raw:
                raw[start : start + length] = mem[off : off + length]
            total += length
        self.copied_bytes += total
        return min(written, total)

    def _complete_guest(self, head: int, length: int) -> None:
        elem = USED_ELEM_I * (self._guest_used_idx % self.num)
        self._guest_used_i[USED_ID_I + elem] = head
        self._guest_used_i[USED_LEN_I + elem] = length
        self._guest_used_idx = (self._guest_used_idx + 1) & 0xFFFF

    # -- teardown ---------------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self._inflight)

    def quiesce(self) -> None:
        """Post nothing more to the backend (its ring is being stopped): also when
        freed shadow space would have resumed this queue."""
        self.quiesced = True
        if self._process_avail in self.shadow.waiters:
            self.shadow.waiters.remove(self._process_avail)

    def backend_used_idx(self) -> int:
        """The used index the backend has published on the shadow ring (any thread)."""
        return self._sused_h[USED_IDX_H]

    def shadow_avail_idx(self) -> int:
        """The avail index xvf has published to the backend on the shadow ring."""
        return self._savail[AVAIL_IDX_H]

    def stop(self) -> int:
        """Drop every request in flight and all grant mappings; returns the guest's
        last avail index consumed. Stop the backend's ring first (GET_VRING_BASE)."""
        if self.stopped:
            return self.last_avail
        self.stopped = True
        if self._process_avail in self.shadow.waiters:
            self.shadow.waiters.remove(self._process_avail)
        for req in self._inflight.values():
            self._release_request(req)
        self._inflight.clear()
        self._give_back()
        self._release_rings()
        self.shadow.free(self._ring_base)
        os.close(self.guest_kick_fd)
        return self.last_avail

    def _release_rings(self) -> None:
        for v in reversed(self._views):
            v.release()
        self._views.clear()
        for g in self._grants:
            g.release()
        self._grants.clear()
