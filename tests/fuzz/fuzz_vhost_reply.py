"""Fuzz target: arbitrary bytes (and fds) from a vhost-user backend as replies.

A scripted peer queues hostile bytes, optionally with file descriptors, then
half-closes its end (so every read ends: no test waits for a timeout) and the
front-end issues one or two requests. Oracle:

- each call returns a well-formed value (u64 in range, config bytes of the
  requested length, None for acked set-messages) or raises VhostUserError;
  no other exception type escapes;
- no call takes longer than the front-end's timeout plus slack;
- after close(), the process has exactly the fds it had before (received fds
  are closed, the socket is closed).
"""

from __future__ import annotations

import array
import os
import shutil
import socket
import tempfile
import time

from tests.fuzz._common import Bytes, run_atheris, tmp_root
from tests.vhost_handshake import handshake
from xvf.errors import VhostUserError
from xvf.protocols.vhost_user import VhostUserFrontend, VhostUserRegion
from xvf.protocols.vhost_user_wire import F_PROTOCOL_FEATURES
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF

TIMEOUT = 1.0
ALL_PROTOCOL = int(PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.XEN_MMAP)
N_CALLS = 10
DROPPABLE = [int(f) for f in (PF.MQ, PF.REPLY_ACK, PF.CONFIG, PF.CONFIGURE_MEM_SLOTS)]


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


def call(fe: VhostUserFrontend, which: int, arg: int) -> None:
    """One front-end request; asserts the shape of whatever comes back."""
    which %= N_CALLS
    if which == 0:
        v = fe.get_features()
        assert 0 <= v < 2**64
    elif which == 1:
        v = fe.get_protocol_features()
        assert 0 <= v < 2**64
    elif which == 2:
        v = fe.get_queue_num()
        assert 0 <= v < 2**64
    elif which == 3:
        offset, size = arg % 64, 1 + (arg >> 8) % 64
        data = fe.get_config(offset, size)
        assert isinstance(data, bytes) and len(data) == size
    elif which == 4:
        v = fe.get_vring_base(arg % 4)
        assert 0 <= v < 2**32
    elif which == 5:
        assert fe.set_owner() is None
    elif which == 6:
        v = fe.get_max_mem_slots()
        assert 0 <= v < 2**64
    elif which == 7:
        fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 4096)
            assert fe.set_mem_table([VhostUserRegion(0, 4096, 0x10000, fd, 0, 0, 0)]) is None
        finally:
            os.close(fd)
    elif which == 8:
        handshake(fe, (1 << 32) | (arg & 0xFFFF))
        assert fe.protocol_features & ~fe.offered_protocol_features == 0
    else:
        assert fe.set_vring_enable(arg % 4, bool(arg & 4)) is None


class VhostReplyHarness:
    """A listening socket in a temp dir; one connection per `check`."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xvf-fz-", dir=tmp_root())
        self.path = os.path.join(self.dir, "be.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(4)

    def close(self) -> None:
        self.srv.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def check(
        self,
        reply: bytes,
        calls: list[tuple[int, int]],
        n_fds: int = 0,
        protocol: int = ALL_PROTOCOL,
        hang_up: bool = True,
        timeout: float = TIMEOUT,
    ) -> None:
        before = open_fds()
        fe = VhostUserFrontend(self.path, timeout=timeout)
        conn, _ = self.srv.accept()
        try:
            fe.backend_features = F_PROTOCOL_FEATURES
            fe.offered_protocol_features = protocol
            fe.protocol_features = protocol
            pipes = [os.pipe() for _ in range((n_fds + 1) // 2)]
            fds = [fd for p in pipes for fd in p][:n_fds]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                if reply or anc:
                    conn.sendmsg([reply or b"\0"], anc)
            finally:
                for p in pipes:
                    os.close(p[0])
                    os.close(p[1])
            if hang_up:
                conn.shutdown(socket.SHUT_WR)
            for which, arg in calls:
                start = time.monotonic()
                try:
                    call(fe, which, arg)
                except VhostUserError:
                    pass
                took = time.monotonic() - start
                # generous slack: the point is "bounded", not a timing claim
                assert took < timeout + 5.0, f"call {which} took {took:.1f} s"
        finally:
            fe.close()
            conn.close()
        leaked = open_fds() - before
        assert not leaked, f"fds left open: {sorted(leaked)}"


_harness: VhostReplyHarness | None = None


def one_input(data: bytes) -> None:
    """Byte 0: fds to pass (0..7); 1-6: two (call, u16 arg); 7: features to drop; rest: reply."""
    global _harness
    if _harness is None:
        _harness = VhostReplyHarness()
    b = Bytes(data)
    n_fds = b.u8() % 8
    calls = [(b.u8(), b.u8() | b.u8() << 8) for _ in range(2)]
    drop = b.u8()
    protocol = ALL_PROTOCOL
    for bit, feature in enumerate(DROPPABLE):
        if drop >> bit & 1:
            protocol &= ~feature
    _harness.check(b.rest()[:65536], calls, n_fds, protocol)


if __name__ == "__main__":
    run_atheris(one_input)
