"""Device side of a split virtqueue (virtio 1.2 section 2.7) over GuestMemory.

Chains are validated before a device sees them: head and next indices inside the table, no
loops (more descriptors than the table holds), indirect tables well formed and not nested,
every buffer wholly inside guest memory, readable buffers before writable ones, total length
under 4 GiB. A chain that fails is reported as a BadChain so the device can hand it back.

Buffers in an on-demand grant region are mapped while their chain is walked and held until the
chain is completed: push_used releases them (unmapping the grants) before it publishes the used
entry, since the guest revokes the grants as soon as it sees the entry.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from xvf.errors import GuestError

from . import protocol as p
from .guest_memory import GuestMemory, GuestMemoryError, HeldBuffer

log = logging.getLogger(__name__)


class ChainError(GuestError):
    """A descriptor chain the device must refuse."""


class RingError(GuestError):
    """The ring itself is broken (e.g. avail idx jumped by more than the queue size)."""


@dataclass
class Chain:
    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    held: list[HeldBuffer] = field(default_factory=list)  # on-demand grant mappings

    @property
    def count(self) -> int:
        return len(self.readable) + len(self.writable)


@dataclass
class BadChain:
    head: int
    reason: str


def _need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: did the used index move past the driver's used_event?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class Virtqueue:
    def __init__(self, index: int, max_size: int) -> None:
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.release_held(write_back=False)
        self.size = self.max_size
        self.desc = self.avail = self.used = None  # guest-physical, set by SET_VRING_ADDR
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used: int | None = None
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.started = False  # a kick fd arrived; GET_VRING_BASE stops the ring again
        self.broken = False
        self.event_idx = False
        self.indirect = False
        # head -> held buffers of the chains in flight with that head (oldest first)
        self.held: dict[int, list[list[HeldBuffer]]] = {}

    def release_held(self, write_back: bool = True) -> None:
        """Unmap every on-demand buffer still held (the rings or the memory table go away)."""
        held = getattr(self, "held", {})
        self.held = {}
        for lists in held.values():
            for buffers in lists:
                _release(buffers, write_back)

    def _complete_held(self, head: int) -> None:
        lists = self.held.get(head)
        if lists:
            _release(lists.pop(0), True)
            if not lists:
                del self.held[head]

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def set_fd(self, name: str, fd: int | None) -> None:
        old = getattr(self, name)
        if old is not None and old != fd:
            os.close(old)
        setattr(self, name, fd)

    def ready(self, mem: GuestMemory) -> bool:
        return (
            self.started
            and self.enabled
            and not self.broken
            and self.desc is not None
            and bool(mem)
        )

    # Ring accessors. Indices are read and published with 2-byte memoryview accesses, never
    # struct.pack_into, which zeroes the field before storing it.
    def _u16(self, mem: GuestMemory, gpa: int) -> int:
        return mem.slice(gpa, 2).cast("H")[0]

    def _set_u16(self, mem: GuestMemory, gpa: int, value: int) -> None:
        mem.slice(gpa, 2).cast("H")[0] = value & 0xFFFF

    def used_idx(self, mem: GuestMemory) -> int:
        return self._u16(mem, self.used + 2)

    def pop_all(self, mem: GuestMemory) -> list[Chain | BadChain]:
        """Every chain the driver has made available since the last call."""
        avail_idx = self._u16(mem, self.avail + 2)
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            self.broken = True
            raise RingError(
                f"queue {self.index}: avail idx {avail_idx} is {pending} ahead of "
                f"{self.next_avail}, more than the queue size {self.size}"
            )
        chains: list[Chain | BadChain] = []
        for _ in range(pending):
            slot = self.avail + 4 + 2 * (self.next_avail % self.size)
            head = self._u16(mem, slot)
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            chain = Chain(head)
            try:
                self._walk(mem, chain)
            except (ChainError, GuestMemoryError) as e:
                _release(chain.held, False)
                chains.append(BadChain(head, str(e)))
                continue
            if chain.held:
                self.held.setdefault(head, []).append(chain.held)
            chains.append(chain)
        if self.event_idx:
            # avail_event: ask for a kick as soon as anything new arrives.
            self._set_u16(mem, self.used + 4 + 8 * self.size, self.next_avail)
        return chains

    def more_available(self, mem: GuestMemory) -> bool:
        return self._u16(mem, self.avail + 2) != self.next_avail

    def _walk(self, mem: GuestMemory, chain: Chain) -> None:
        head = chain.head
        if head >= self.size:
            raise ChainError(f"head index {head} outside a queue of {self.size}")
        table, count = self.desc, self.size
        indirect_table = b""  # read once: the driver may not change it under us
        idx, seen, in_indirect, total = head, 0, False, 0
        while True:
            if idx >= count:
                raise ChainError(f"next index {idx} outside a table of {count}")
            seen += 1
            if seen > count:
                raise ChainError(f"descriptor loop: more than {count} descriptors in the chain")
            if in_indirect:
                raw = indirect_table[16 * idx : 16 * idx + 16]
            else:
                raw = mem.read(table + 16 * idx, 16)
            addr, length, flags, nxt = p.DESC.unpack(raw)
            if flags & p.DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError("indirect descriptor but INDIRECT_DESC was not negotiated")
                if in_indirect:
                    raise ChainError("indirect descriptor inside an indirect table")
                if flags & p.DESC_F_NEXT:
                    raise ChainError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % 16:
                    raise ChainError(f"indirect table length {length} is not a multiple of 16")
                indirect_table = mem.read(addr, length)  # wholly in guest memory
                table, count, idx, seen, in_indirect = addr, length // 16, 0, 0, True
                continue
            buf = mem.buffer(addr, length, bool(flags & p.DESC_F_WRITE), chain.held)
            total += length
            if total > 0xFFFFFFFF:
                raise ChainError("chain is longer than 4 GiB in total")
            if flags & p.DESC_F_WRITE:
                chain.writable.append(buf)
            elif chain.writable:
                raise ChainError("device-readable descriptor after a device-writable one")
            else:
                chain.readable.append(buf)
            if not flags & p.DESC_F_NEXT:
                return
            idx = nxt

    def push_used(self, mem: GuestMemory, head: int, length: int) -> None:
        self._complete_held(head)  # grants unmapped before the guest can see the entry
        slot = self.used + 4 + 8 * (self.next_used % self.size)
        mem.write(slot, p.USED_ELEM.pack(head, length))
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._set_u16(mem, self.used + 2, self.next_used)

    def signal(self, mem: GuestMemory) -> None:
        """Write the call eventfd if the driver wants to hear about the used entries so far."""
        if self.call_fd is None:
            return
        if self.event_idx:
            used_event = self._u16(mem, self.avail + 4 + 2 * self.size)
            old = self.signalled_used
            self.signalled_used = self.next_used
            if old is not None and not _need_event(used_event, self.next_used, old):
                return
        os.eventfd_write(self.call_fd, 1)


def _release(buffers: list[HeldBuffer], write_back: bool) -> None:
    for hb in buffers:
        hb.release(write_back)
