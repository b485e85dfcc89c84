"""A minimal memfd "guest" and split virtqueue, enough to push virtio-blk requests
through a real vhost-user backend in tests. The real guest-side virtqueue is
xvf/platform/sim/virtqueue.py; this one only has to be obviously right.

Layouts: virtio 1.2 section 2.7 (split virtqueues) and 5.2.6 (virtio-blk requests).
"""

from __future__ import annotations

import mmap
import os
import select
import struct

from xvf.protocols.vhost_user import VhostUserRegion
from xvf.protocols.virtqueue import (
    AVAIL_IDX_H,
    AVAIL_RING_H,
    DESC,
    DESC_SIZE,
    USED_ELEM,
    USED_IDX_H,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    avail_bytes,
    ring_layout,
    used_bytes,
    used_elems_bytes,
)

BLK_T_IN = 0
BLK_T_OUT = 1
BLK_HDR = struct.Struct("<IIQ")  # type, reserved, sector
SECTOR = 512

# Front-end virtual addresses (SET_VRING_ADDR, userspace_addr) only need to be
# consistent with the mem table, not real; a fake base shows the two spaces apart.
FAKE_UVA_BASE = 0x1000_0000_0000


class GuestMemory:
    """Guest RAM as a memfd: `size` bytes at guest-physical `gpa`, `fd_offset` into the file."""

    def __init__(self, size: int, gpa: int = 0x4000_0000, fd_offset: int = 0) -> None:
        self.size, self.gpa, self.fd_offset = size, gpa, fd_offset
        self.fd = os.memfd_create("xvf-test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, fd_offset + size)
        self._map = mmap.mmap(self.fd, fd_offset + size)
        self.mem = memoryview(self._map)[fd_offset:]

    def region(self) -> VhostUserRegion:
        return VhostUserRegion(self.gpa, self.size, self.uva(self.gpa), self.fd, self.fd_offset)

    def uva(self, gpa: int) -> int:
        return FAKE_UVA_BASE + (gpa - self.gpa)

    def off(self, gpa: int, length: int = 0) -> int:
        off = gpa - self.gpa
        assert 0 <= off and off + length <= self.size, hex(gpa)
        return off

    def write(self, gpa: int, data: bytes) -> None:
        off = self.off(gpa, len(data))
        self.mem[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = self.off(gpa, length)
        return bytes(self.mem[off : off + length])

    def close(self) -> None:
        self.mem.release()
        self._map.close()
        os.close(self.fd)


class SplitRing:
    """Driver side of one split virtqueue living in `mem` at guest address `gpa`."""

    def __init__(self, mem: GuestMemory, gpa: int, num: int) -> None:
        self.mem, self.num = mem, num
        avail_off, used_off, total = ring_layout(num)
        self.desc = gpa
        self.avail = gpa + avail_off
        self.used = gpa + used_off
        self.end = gpa + total
        self.next_desc = 0
        self.avail_idx = 0
        self.last_used = 0
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def addrs(self) -> tuple[int, int, int]:
        """(desc, avail, used) as front-end virtual addresses, for SET_VRING_ADDR."""
        return self.mem.uva(self.desc), self.mem.uva(self.avail), self.mem.uva(self.used)

    def add_chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Queue one chain of (gpa, len, device_writes) buffers; returns its head."""
        head = self.next_desc
        for i, (gpa, length, writable) in enumerate(bufs):
            idx = (head + i) % self.num
            last = i == len(bufs) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.mem.write(
                self.desc + DESC_SIZE * idx, DESC.pack(gpa, length, flags, (idx + 1) % self.num)
            )
        self.next_desc = (head + len(bufs)) % self.num
        size = avail_bytes(self.num)
        off = self.mem.off(self.avail, size)
        with self.mem.mem[off : off + size] as raw, raw.cast("H") as avail:
            avail[AVAIL_RING_H + self.avail_idx % self.num] = head
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            # Publish idx with one 16-bit store: struct.pack_into would zero it first
            # (real-backends.md pitfall 1) and a polling backend could see idx 0.
            avail[AVAIL_IDX_H] = self.avail_idx
        return head

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def wait_used(self, timeout: float = 5.0) -> tuple[int, int]:
        """Wait for the call eventfd and return the next used element (id, len)."""
        size = used_bytes(self.num)
        off = self.mem.off(self.used, size)
        with self.mem.mem[off : off + size] as used, used.cast("H") as used_h:
            while used_h[USED_IDX_H] == self.last_used:
                ready, _, _ = select.select([self.call_fd], [], [], timeout)
                if not ready:
                    raise TimeoutError("backend never signalled the call eventfd")
                os.eventfd_read(self.call_fd)
            # used_elems_bytes(slot): where element `slot` starts in the device area
            elem = USED_ELEM.unpack_from(used, used_elems_bytes(self.last_used % self.num))
        self.last_used = (self.last_used + 1) & 0xFFFF
        return elem

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)


def blk_request(
    ring: SplitRing, scratch: int, kind: int, sector: int, data_gpa: int, length: int
) -> int:
    """One virtio-blk request: header at `scratch`, status byte after it. Returns status."""
    mem = ring.mem
    mem.write(scratch, BLK_HDR.pack(kind, 0, sector))
    status = scratch + BLK_HDR.size
    mem.write(status, b"\xff")
    head = ring.add_chain(
        [
            (scratch, BLK_HDR.size, False),
            (data_gpa, length, kind == BLK_T_IN),
            (status, 1, True),
        ]
    )
    ring.kick()
    used_id, _ = ring.wait_used()
    assert used_id == head, (used_id, head)
    return mem.read(status, 1)[0]
