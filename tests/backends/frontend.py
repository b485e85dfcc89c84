"""A minimal vhost-user front-end and driver-side split ring, for testing the reference backends.

Guest RAM is a memfd passed with SCM_RIGHTS. Guest-physical and front-end virtual addresses are
deliberately different (GPA_BASE vs UVA_BASE) so a backend that mixes them up fails.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from xvf.errors import VhostUserError

from . import protocol as p

GPA_BASE = 0x4000_0000
UVA_BASE = 0x7F00_0000_0000
MEM_SIZE = 1 << 20


class GuestRam:
    """A memfd that plays guest RAM, with a bump allocator."""

    def __init__(self, size: int = MEM_SIZE, mmap_offset: int = 0) -> None:
        import mmap

        self.size = size
        self.mmap_offset = mmap_offset
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, mmap_offset + size)
        self.map = mmap.mmap(self.fd, mmap_offset + size)
        self.next = 0x1000

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def alloc(self, n: int, align: int = 16) -> int:
        self.next = (self.next + align - 1) & ~(align - 1)
        gpa = GPA_BASE + self.next
        self.next += max(n, 1)
        if self.next > self.size:
            raise MemoryError("test guest RAM exhausted")
        return gpa

    def _off(self, gpa: int) -> int:
        return self.mmap_offset + gpa - GPA_BASE

    def write(self, gpa: int, data: bytes) -> None:
        o = self._off(gpa)
        self.map[o : o + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        o = self._off(gpa)
        return bytes(self.map[o : o + n])

    def u16(self, gpa: int) -> int:
        o = self._off(gpa)
        return memoryview(self.map)[o : o + 2].cast("H")[0]

    def set_u16(self, gpa: int, v: int) -> None:
        o = self._off(gpa)
        memoryview(self.map)[o : o + 2].cast("H")[0] = v & 0xFFFF

    def uva(self, gpa: int) -> int:
        return UVA_BASE + gpa - GPA_BASE


@dataclass
class XenRegion:
    """One region of a Xen-mmap memory table; `fd` is sent with it (plain fd, or on the
    simulator a connection to the software Xen's privcmd.sock)."""

    gpa: int
    size: int
    uva: int
    fd: int
    flags: int
    domid: int
    offset: int = 0


@dataclass
class Used:
    head: int
    length: int


class DriverQueue:
    """Driver side of one split virtqueue. Descriptors are written raw, so tests can forge them."""

    def __init__(self, ram: GuestRam, index: int, size: int) -> None:
        self.ram, self.index, self.size = ram, index, size
        self.desc = ram.alloc(16 * size, 16)
        self.avail = ram.alloc(6 + 2 * size, 2)
        self.used = ram.alloc(6 + 8 * size, 4)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self.event_idx = False  # when set, keep used_event = last seen used index
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.desc + 16 * i, p.DESC.pack(addr, length, flags, nxt))

    def add_chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """bufs: (gpa, len, device_writable) in order. Returns the head index."""
        ids = [self.free.pop(0) for _ in bufs]
        for k, (gpa, length, writable) in enumerate(bufs):
            flags = p.DESC_F_WRITE if writable else 0
            nxt = 0
            if k + 1 < len(bufs):
                flags |= p.DESC_F_NEXT
                nxt = ids[k + 1]
            self.write_desc(ids[k], gpa, length, flags, nxt)
        self.publish(ids[0])
        return ids[0]

    def add_indirect(self, bufs: list[tuple[int, int, bool]]) -> int:
        table = self.ram.alloc(16 * len(bufs), 16)
        for k, (gpa, length, writable) in enumerate(bufs):
            flags = (p.DESC_F_WRITE if writable else 0) | (
                p.DESC_F_NEXT if k + 1 < len(bufs) else 0
            )
            self.ram.write(table + 16 * k, p.DESC.pack(gpa, length, flags, k + 1))
        head = self.free.pop(0)
        self.write_desc(head, table, 16 * len(bufs), p.DESC_F_INDIRECT)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.ram.set_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.set_u16(self.avail + 2, self.avail_idx)  # published last

    def notify(self) -> None:
        os.eventfd_write(self.kick, 1)

    def get_used(self, count: int = 1, timeout: float = 5.0) -> list[Used]:
        """Wait on the call eventfd until `count` new used entries arrived."""
        out: list[Used] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            while self.ram.u16(self.used + 2) != self.last_used and len(out) < count:
                slot = self.used + 4 + 8 * (self.last_used % self.size)
                head, length = p.USED_ELEM.unpack(self.ram.read(slot, 8))
                out.append(Used(head, length))
                self.free.append(head)
                self.last_used = (self.last_used + 1) & 0xFFFF
            if len(out) >= count:
                break
            if self.event_idx:
                self.ram.set_u16(self.avail + 4 + 2 * self.size, self.last_used)
                if self.ram.u16(self.used + 2) != self.last_used:
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {self.index}: {len(out)} of {count} used entries")
            if select.select([self.call], [], [], left)[0]:
                os.eventfd_read(self.call)
        return out

    def pending_call(self) -> bool:
        return bool(select.select([self.call], [], [], 0)[0])


class Frontend:
    """Raw vhost-user messages over the socket."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.reply_ack = False

    def close(self) -> None:
        self.sock.close()

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             flags: int = p.VERSION) -> None:  # fmt: skip
        data = p.HEADER.pack(request, flags, len(payload)) + payload
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            self.sock.sendmsg([data], anc)
        else:
            self.sock.sendall(data)

    def recv(self, request: int) -> bytes:
        header = self._recv_exact(p.HEADER.size)
        req, flags, size = p.HEADER.unpack(header)
        if req != request or not flags & p.FLAG_REPLY:
            raise VhostUserError(f"reply to {req} flags {flags:#x}, expected a reply to {request}")
        return self._recv_exact(size) if size else b""

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise VhostUserError("backend closed the connection")
            buf += chunk
        return buf

    def get_u64(self, request: int) -> int:
        self.send(request)
        return p.U64.unpack(self.recv(request))[0]

    def set(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """A "set" message; with REPLY_ACK negotiated, ask for and check the ack."""
        if self.reply_ack:
            self.send(request, payload, fds, p.VERSION | p.FLAG_NEED_REPLY)
            (status,) = p.U64.unpack(self.recv(request))
            if status:
                raise VhostUserError(f"request {request} NAKed with {status}")
        else:
            self.send(request, payload, fds)

    def get_config(self, offset: int, size: int) -> bytes:
        self.send(p.GET_CONFIG, p.CONFIG_HEADER.pack(offset, size, 0) + bytes(size))
        reply = self.recv(p.GET_CONFIG)
        _off, got, _flags = p.CONFIG_HEADER.unpack_from(reply)
        return reply[p.CONFIG_HEADER.size : p.CONFIG_HEADER.size + got]

    def set_mem_table(self, ram: GuestRam, xen: tuple[int, int] | None = None) -> None:
        region = (GPA_BASE, ram.size, UVA_BASE, ram.mmap_offset)
        body = p.MEM_REGION_XEN.pack(*region, *xen) if xen else p.MEM_REGION.pack(*region)
        self.set(p.SET_MEM_TABLE, p.MEMORY_HEADER.pack(1, 0) + body, [ram.fd])

    def set_mem_table_xen(self, regions: list[XenRegion]) -> None:
        """SET_MEM_TABLE with the 40-byte Xen mmap layout (XEN_MMAP must be acked)."""
        body = b"".join(
            p.MEM_REGION_XEN.pack(r.gpa, r.size, r.uva, r.offset, r.flags, r.domid) for r in regions
        )
        header = p.MEMORY_HEADER.pack(len(regions), 0)
        self.set(p.SET_MEM_TABLE, header + body, [r.fd for r in regions])

    def handshake(self, want_features: int, want_protocol: int) -> tuple[int, int]:
        """SET_OWNER .. SET_FEATURES, acking XEN_MMAP; returns the acked (features, protocol)."""
        self.send(p.SET_OWNER)
        features = self.get_u64(p.GET_FEATURES) & want_features
        proto = self.get_u64(p.GET_PROTOCOL_FEATURES)
        acked_proto = (proto & want_protocol) | p.bit(p.PF_XEN_MMAP)
        self.send(p.SET_PROTOCOL_FEATURES, p.U64.pack(acked_proto))
        self.reply_ack = bool(acked_proto & p.bit(p.PF_REPLY_ACK))
        self.set(p.SET_FEATURES, p.U64.pack(features))
        return features, acked_proto

    def setup_ring(
        self, index: int, size: int, desc: int, avail: int, used: int, kick: int, call: int
    ) -> None:
        """SET_VRING_* for one queue; desc/avail/used are front-end (userspace) addresses."""
        self.set(p.SET_VRING_NUM, p.VRING_STATE.pack(index, size))
        self.set(p.SET_VRING_BASE, p.VRING_STATE.pack(index, 0))
        self.set(p.SET_VRING_ADDR, p.VRING_ADDR.pack(index, 0, desc, used, avail, 0))
        self.set(p.SET_VRING_KICK, p.U64.pack(index), [kick])
        self.set(p.SET_VRING_CALL, p.U64.pack(index), [call])
        self.set(p.SET_VRING_ENABLE, p.VRING_STATE.pack(index, 1))

    def setup_queue(self, q: DriverQueue) -> None:
        ram = q.ram
        self.setup_ring(
            q.index, q.size, ram.uva(q.desc), ram.uva(q.avail), ram.uva(q.used), q.kick, q.call
        )


@dataclass
class Session:
    fe: Frontend
    ram: GuestRam
    queues: list[DriverQueue]
    features: int
    protocol_features: int

    def close(self) -> None:
        self.fe.close()
        for q in self.queues:
            q.close()
        self.ram.close()


def connect(
    path: str,
    queue_sizes: list[int],
    want_features: int,
    want_protocol: int,
    xen: tuple[int, int] | None = None,
    ram: GuestRam | None = None,
) -> Session:
    """The QEMU-order handshake; acks the intersection of what is wanted and what is offered."""
    fe = Frontend(path)
    ram = ram or GuestRam()
    fe.send(p.SET_OWNER)
    features = fe.get_u64(p.GET_FEATURES)
    proto = fe.get_u64(p.GET_PROTOCOL_FEATURES)
    acked_proto = proto & want_protocol
    if xen is not None:
        acked_proto |= p.bit(p.PF_XEN_MMAP)
    fe.send(p.SET_PROTOCOL_FEATURES, p.U64.pack(acked_proto))
    fe.reply_ack = bool(acked_proto & p.bit(p.PF_REPLY_ACK))
    acked = features & want_features
    fe.set(p.SET_FEATURES, p.U64.pack(acked))
    fe.set_mem_table(ram, xen)
    queues = [DriverQueue(ram, i, n) for i, n in enumerate(queue_sizes)]
    for q in queues:
        q.event_idx = bool(acked & p.bit(p.F_EVENT_IDX))
        fe.setup_queue(q)
    return Session(fe, ram, queues, features, proto)
