"""Wire format of the software Xen's control socket: its privcmd/evtchn/gntdev.

A device model talks to real Xen through ioctls on /dev/xen/*. The simulator
offers the same operations as messages on a SOCK_SEQPACKET unix socket, with
file descriptors (ioreq page, guest RAM, event-channel handles) passed by
SCM_RIGHTS. dm_ops carry Xen's own `struct xen_dm_op` bytes
(include/xvf/xen_dmop.h); everything else is a small fixed layout below.

Request: {u32 op, u32 payload length} + payload. Reply: {i32 rc (0 or -errno)} + payload.
"""

from __future__ import annotations

import array
import errno
import socket
import struct
import threading
from collections.abc import Sequence

from xvf.errors import SimulatorError

OP_DM_OP = 1  # payload: u16 domid, u16 pad, u32 pad, xen_dm_op[32]  -> xen_dm_op[32]
OP_MMAP_RESOURCE = 2  # u16 domid, u16 pad, u32 type, u32 id, u32 idx, u64 num -> fd
OP_FOREIGN_MAP = 3  # u16 domid -> u32 count, count * {u64 gpa, u64 size, u64 offset}, fd
OP_EVTCHN_OPEN = 4  # -> u32 handle, fd
OP_EVTCHN_BIND = 5  # u32 handle, u32 remote_dom, u32 remote_port -> u32 local_port
OP_EVTCHN_UNBIND = 6  # u32 handle, u32 port
OP_EVTCHN_BIND_UNBOUND = 13  # u32 handle, u32 remote_dom -> u32 local_port
# OP_GNT_MAP: u16 domid, u8 writable, u8 pad, u32 count, count * u32 ref
#   -> count * u64 offset, fd
OP_GNT_MAP = 7
OP_GNT_UNMAP = 8  # u16 domid, u16 pad, u32 count, count * u32 ref

# Linux privcmd's eventfd offloads (6.7+), each carrying the eventfd in the request:
# OP_IOEVENTFD: u16 domid, u16 pad, u32 flags, u64 addr, u32 addr_len, u32 vq, + eventfd
OP_IOEVENTFD = 9
# OP_IRQFD: u16 domid, u16 pad, u32 flags, u32 irq, + eventfd
OP_IRQFD = 10
FLAG_DEASSIGN = 1
# Grant copy (gntdev's GRANT_COPY ioctl, Xen's GNTTABOP_copy) runs in the caller, as
# the hypercall does (xvf.platform.sim._grant_copy); it asks once per guest for what
# Xen sees of it. OP_GNT_COPY_DOMAIN: u16 domid -> u16 caller's domid, u16 pad,
#   u32 grant entries, u32 count, count * RAM_REGION, + the guest's RAM memfd, its
#   grant table's and its grant lock's (ESRCH: no such domain)
OP_GNT_COPY_DOMAIN = 12
COPY_DOMAIN = struct.Struct("<H")
COPY_DOMAIN_REPLY = struct.Struct("<HxxII")
RAM_REGION = struct.Struct("<QQQ")  # gpa, size, offset in the memfd
HEADER = struct.Struct("<II")
RC = struct.Struct("<i")
DM_OP_PREFIX = struct.Struct("<HHI")
DM_OP_SIZE = 32
MAX_MESSAGE = 65536
MAX_FDS = 4


def send_message(sock: socket.socket, head: bytes, payload: bytes, fds: Sequence[int] = ()) -> None:
    data = head + payload
    if len(data) > MAX_MESSAGE:
        raise SimulatorError(f"control message of {len(data)} bytes is too large")
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def recv_message(sock: socket.socket, buf: bytearray | None = None) -> tuple[bytes, list[int]]:
    """One datagram and the fds that came with it; b'' on EOF. `buf`: a MAX_MESSAGE
    bytearray to receive into, kept by a caller that receives many (saves allocating
    64 KiB per message)."""
    fds = array.array("i")
    anc_size = socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
    if buf is None:
        data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, anc_size)
    else:
        n, ancdata, flags, _ = sock.recvmsg_into([buf], anc_size)
        data = bytes(memoryview(buf)[:n])
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            _close(fd)
        raise SimulatorError("control message truncated")
    return data, list(fds)


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass


class ControlClient:
    """The device model's end: one request at a time, like an ioctl."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()  # a device's worker maps guest RAM through it too
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            msg = f"cannot reach the software Xen at {path}: {exc.strerror}"
            raise SimulatorError(msg) from exc

    @classmethod
    def adopt(cls, fd: int) -> ControlClient:
        """A client over an already-connected control socket (e.g. one received by
        SCM_RIGHTS). Owns `fd` on success; on failure the caller still owns it."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise SimulatorError(f"fd {fd} is not a socket: {exc.strerror}") from exc
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
                raise SimulatorError(f"fd {fd} is not a unix SOCK_SEQPACKET socket")
            peer = sock.getpeername()
        except OSError as exc:
            sock.detach()
            raise SimulatorError(f"fd {fd} is not a connected socket: {exc.strerror}") from exc
        except SimulatorError:
            sock.detach()
            raise
        client = cls.__new__(cls)
        client.path = peer if isinstance(peer, str) else ""
        client._lock = threading.Lock()
        client.sock = sock
        return client

    def fileno(self) -> int:
        return self.sock.fileno()

    def call(
        self, op: int, payload: bytes = b"", fds: Sequence[int] = ()
    ) -> tuple[bytes, list[int]]:
        """Returns the reply payload and fds; raises OSError(errno) when rc < 0."""
        with self._lock:  # one request at a time, from whichever thread
            return self._call(op, payload, fds)

    def _call(
        self, op: int, payload: bytes = b"", fds: Sequence[int] = ()
    ) -> tuple[bytes, list[int]]:
        send_message(self.sock, HEADER.pack(op, len(payload)), payload, list(fds))
        data, fds = recv_message(self.sock)
        if len(data) < RC.size:
            raise SimulatorError("the software Xen closed the control connection")
        (rc,) = RC.unpack_from(data)
        if rc < 0:
            for fd in fds:
                _close(fd)
            raise OSError(-rc, f"simulated hypercall {op} failed: {errno.errorcode.get(-rc, rc)}")
        return data[RC.size :], fds

    def close(self) -> None:
        self.sock.close()
