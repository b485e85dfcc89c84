"""vhost-user codecs and the front-end's reply checking.

The codecs are checked against the spec's numbers and, where Linux has the same
struct (linux/vhost_types.h), against the C compiler. The front-end is driven
against a scripted peer that sends what a real backend never would: wrong
request echoes, bad flags, wrong sizes, truncated or oversized replies, stray
fds, early hang-ups. Each such reply must raise VhostUserError, promptly, and
leave no fd behind.
"""

from __future__ import annotations

import array
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import pytest

from xvf.errors import VhostUserError, XvfError
from xvf.protocols import vhost_user_wire as W
from xvf.protocols.vhost_user import VhostUserFrontend, VhostUserRegion
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF
from xvf.protocols.vhost_user_wire import Request as R

# -- codecs ---------------------------------------------------------------------------


def test_numbers_match_the_spec():
    assert W.HEADER_SIZE == 12
    assert W.F_PROTOCOL_FEATURES == 1 << 30
    spec_bits = {
        "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "MTU": 4, "BACKEND_REQ": 5,
        "CROSS_ENDIAN": 6, "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9,
        "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11, "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13,
        "INBAND_NOTIFICATIONS": 14, "CONFIGURE_MEM_SLOTS": 15, "STATUS": 16, "XEN_MMAP": 17,
        "SHARED_OBJECT": 18, "DEVICE_STATE": 19,
    }  # fmt: skip
    assert {f.name: f.value.bit_length() - 1 for f in PF} == spec_bits
    assert (R.GET_FEATURES, R.SET_MEM_TABLE, R.GET_VRING_BASE, R.SET_VRING_ERR) == (1, 5, 11, 14)
    assert (R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.SET_VRING_ENABLE) == (15, 17, 18)
    assert (R.GET_CONFIG, R.SET_CONFIG, R.RESET_DEVICE, R.SET_STATUS, R.GET_STATUS) == (
        24, 25, 34, 39, 40)  # fmt: skip
    # the value rust-vmm's vm-memory accepts, not the spec's bit 8
    assert W.XEN_MMAP_MAP_ON_DEMAND == 0x8
    assert (W.XEN_MMAP_FOREIGN, W.XEN_MMAP_GRANT) == (0x1, 0x2)


def test_scalar_codecs_round_trip():
    assert W.decode_header(W.encode_header(R.SET_VRING_NUM, 0x9, 8)) == (8, 0x9, 8)
    assert W.decode_u64(W.encode_u64(0xFEDC_BA98_7654_3210)) == 0xFEDC_BA98_7654_3210
    assert W.decode_vring_state(W.encode_vring_state(3, 0xBEEF)) == (3, 0xBEEF)
    addr = W.encode_vring_addr(2, 0, desc=0x1000, used=0x3000, avail=0x2000, log=0x4000)
    assert len(addr) == 40
    assert W.decode_vring_addr(addr) == (2, 0, 0x1000, 0x3000, 0x2000, 0x4000)
    assert W.decode_u64(W.encode_vring_fd(5, True)) == 5
    assert W.decode_u64(W.encode_vring_fd(5, False)) == 5 | 0x100


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_vring_layouts_match_linux_vhost_types(tmp_path):
    src = tmp_path / "v.c"
    src.write_text(r"""
#include <linux/vhost_types.h>
#include <stdio.h>
int main(void) {
    struct vhost_vring_state s = { .index = 3, .num = 0xbeef };
    struct vhost_vring_addr a = { .index = 2, .flags = 1, .desc_user_addr = 0x1000,
        .used_user_addr = 0x3000, .avail_user_addr = 0x2000, .log_guest_addr = 0x4000 };
    fwrite(&s, sizeof s, 1, stdout);
    fwrite(&a, sizeof a, 1, stdout);
    return 0;
}
""")
    exe = tmp_path / "v"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True).stdout
    ours = W.encode_vring_state(3, 0xBEEF) + W.encode_vring_addr(
        2, 1, desc=0x1000, used=0x3000, avail=0x2000, log=0x4000
    )
    assert out == ours


def _regions(flags: int = 0) -> list[VhostUserRegion]:
    return [
        VhostUserRegion(0x4000_0000, 0x100_0000, 0x7F00_0000_0000, 7, 0, flags, 5),
        VhostUserRegion(0x2_0000_0000, 0x20_0000, 0x7F10_0000_0000, 8, 0x1000, flags, 5),
    ]


def test_mem_table_plain_layout():
    data = W.encode_mem_table(_regions(), xen=False)
    assert len(data) == 8 + 2 * 32
    assert struct.unpack_from("<II", data) == (2, 0)
    assert struct.unpack_from("<4Q", data, 8 + 32) == (0x2_0000_0000, 0x20_0000,
                                                      0x7F10_0000_0000, 0x1000)  # fmt: skip
    back = W.decode_mem_table(data, xen=False)
    assert [(r.gpa, r.size, r.uva, r.fd_offset) for r in back] == [
        (r.gpa, r.size, r.uva, r.fd_offset) for r in _regions()
    ]


def test_mem_table_xen_layout():
    flags = W.XEN_MMAP_GRANT | W.XEN_MMAP_MAP_ON_DEMAND
    data = W.encode_mem_table(_regions(flags), xen=True)
    assert len(data) == 8 + 2 * 40
    assert struct.unpack_from("<4QII", data, 8) == (0x4000_0000, 0x100_0000,
                                                    0x7F00_0000_0000, 0, 0xA, 5)  # fmt: skip
    back = W.decode_mem_table(data, xen=True)
    assert [(r.xen_mmap_flags, r.domid) for r in back] == [(0xA, 5), (0xA, 5)]
    # a region without flags is still described (flags 0: map the fd) once negotiated
    plain = W.encode_mem_table(_regions(), xen=True)
    assert struct.unpack_from("<II", plain, 8 + 32) == (0, 5)


def test_single_region_layout_for_add_and_rem_mem_reg():
    """VhostUserSingleMemoryRegion: u64 padding, then the region (Xen mmap fields too)."""
    plain, xen = W.encode_single_region(_regions()[1], xen=False), None
    assert len(plain) == 8 + 32
    assert struct.unpack_from("<Q4Q", plain) == (0, 0x2_0000_0000, 0x20_0000,
                                                 0x7F10_0000_0000, 0x1000)  # fmt: skip
    xen = W.encode_single_region(_regions(W.XEN_MMAP_GRANT)[0], xen=True)
    assert len(xen) == 8 + 40
    assert struct.unpack_from("<II", xen, 8 + 32) == (W.XEN_MMAP_GRANT, 5)


def test_mem_table_refusals():
    with pytest.raises(VhostUserError, match="did not negotiate XEN_MMAP"):
        W.encode_mem_table(_regions(W.XEN_MMAP_FOREIGN), xen=False)
    with pytest.raises(VhostUserError, match="at most 8"):
        W.encode_mem_table(_regions() * 5, xen=False)
    with pytest.raises(VhostUserError, match="at least one"):
        W.encode_mem_table([], xen=False)
    with pytest.raises(VhostUserError, match="unknown Xen mmap flags 0x100"):
        W.encode_mem_table(_regions(0x100), xen=True)
    with pytest.raises(VhostUserError, match="for 2 regions"):
        W.decode_mem_table(W.encode_mem_table(_regions(), xen=False), xen=True)


def test_config_codec():
    data = W.encode_config(20, 4, b"\x01\x02\x03\x04")
    assert data == struct.pack("<III", 20, 4, 0) + b"\x01\x02\x03\x04"
    assert W.decode_config(data) == (20, 4, 0, b"\x01\x02\x03\x04")
    assert W.encode_config(0, 60) == struct.pack("<III", 0, 60, 0) + bytes(60)
    with pytest.raises(VhostUserError, match="outside"):
        W.encode_config(250, 8)
    with pytest.raises(VhostUserError, match="carries 3"):
        W.decode_config(struct.pack("<III", 0, 4, 0) + b"abc")


# -- a scripted backend -------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Peer:
    """The backend end of one connection; replies are queued before the front-end asks."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        conn.settimeout(2.0)

    def reply(
        self,
        req: int,
        payload: bytes = b"",
        flags: int = W.VERSION | W.FLAG_REPLY,
        size: int | None = None,
        fds: list[int] | None = None,
    ) -> None:
        size = len(payload) if size is None else size
        msg = W.encode_header(req, flags, size) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.conn.sendmsg([msg], anc)

    def u64(self, req: int, value: int) -> None:
        self.reply(req, W.encode_u64(value))

    def read(self) -> tuple[int, int, bytes, list[int]]:
        """One request as sent: (request, flags, payload, fds); the fds are closed."""
        hdr, anc, _, _ = self.conn.recvmsg(12, socket.CMSG_SPACE(64), socket.MSG_WAITALL)
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data))
        for fd in fds:
            os.close(fd)
        req, flags, size = W.decode_header(hdr)
        payload = self.conn.recv(size, socket.MSG_WAITALL) if size else b""
        return req, flags, payload, fds

    def pending(self) -> bytes:
        self.conn.setblocking(False)
        try:
            return self.conn.recv(4096)
        except BlockingIOError:
            return b"<nothing>"
        finally:
            self.conn.settimeout(2.0)


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    d = tempfile.mkdtemp(prefix="xvf-vuw-", dir="/tmp")
    path = os.path.join(d, "be.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    yield path, srv
    srv.close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pair(listener) -> Iterator[tuple[VhostUserFrontend, Peer]]:
    path, srv = listener
    fe = VhostUserFrontend(path, timeout=2.0)
    conn, _ = srv.accept()
    yield fe, Peer(conn)
    fe.close()
    conn.close()


FEATURES = W.F_PROTOCOL_FEATURES | (1 << 32)


# What these tests ack of what the peer offers (xvf's device asks for its own set).
PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.XEN_MMAP


def handshake(fe: VhostUserFrontend, peer: Peer, offered: int) -> None:
    """Script the replies to a handshake in QEMU's order, make it message by message
    and check what went over the wire."""
    acked = offered & PROTOCOL
    ack, mq = (bool(acked & f) for f in (PF.REPLY_ACK, PF.MQ))
    peer.u64(R.GET_FEATURES, FEATURES)
    peer.u64(R.GET_PROTOCOL_FEATURES, offered)
    if mq:
        peer.u64(R.GET_QUEUE_NUM, 4)
    if ack:
        peer.u64(R.SET_OWNER, 0)
        peer.u64(R.SET_FEATURES, 0)
    assert fe.get_features() == FEATURES
    fe.set_protocol_features(fe.get_protocol_features() & PROTOCOL)
    if mq:
        assert fe.get_queue_num() == 4
    fe.set_owner()
    fe.set_features(FEATURES)
    seq = [peer.read() for _ in range(5 + mq)]
    expected = [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES]
    expected += [R.GET_QUEUE_NUM] if mq else []
    expected += [R.SET_OWNER, R.SET_FEATURES]
    assert [s[0] for s in seq] == expected
    by_req = {s[0]: s for s in seq}
    assert W.decode_u64(by_req[R.SET_PROTOCOL_FEATURES][2]) == acked
    assert not by_req[R.SET_PROTOCOL_FEATURES][1] & W.FLAG_NEED_REPLY
    assert bool(by_req[R.SET_OWNER][1] & W.FLAG_NEED_REPLY) == ack
    assert not by_req[R.GET_FEATURES][1] & W.FLAG_NEED_REPLY
    assert W.decode_u64(by_req[R.SET_FEATURES][2]) == FEATURES
    assert fe.acked_features == FEATURES
    assert fe.protocol_features == acked
    assert fe.queue_num == (4 if mq else None)


def test_missing_socket_is_named(tmp_path):
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(VhostUserError, match=r"nobody\.sock.*No such file"):
        VhostUserFrontend(path)


def test_refused_socket_is_named(listener):
    path, srv = listener
    srv.close()  # the file stays, nobody listens
    with pytest.raises(VhostUserError, match=r"be\.sock.*refused"):
        VhostUserFrontend(path)
    assert issubclass(VhostUserError, XvfError)


def test_negotiation_with_reply_ack(pair):
    fe, peer = pair
    handshake(fe, peer, 0x8F2B)  # what QSD offers
    # every set-message now carries NEED_REPLY and waits for its ack
    peer.u64(R.SET_VRING_NUM, 0)
    fe.set_vring_num(0, 256)
    req, flags, payload, _ = peer.read()
    assert (req, flags, W.decode_vring_state(payload)) == (
        R.SET_VRING_NUM,
        W.VERSION | W.FLAG_NEED_REPLY,
        (0, 256),
    )


def test_negotiation_without_reply_ack(pair):
    fe, peer = pair
    handshake(fe, peer, int(PF.CONFIG))
    fe.set_vring_base(1, 7)  # no ack expected, none read
    req, flags, payload, _ = peer.read()
    assert (req, flags, W.decode_vring_state(payload)) == (R.SET_VRING_BASE, W.VERSION, (1, 7))
    with pytest.raises(VhostUserError, match="GET_QUEUE_NUM needs protocol feature MQ"):
        fe.get_queue_num()
    assert peer.pending() == b"<nothing>"  # refused locally, nothing was sent


def test_nonzero_ack_raises_but_keeps_the_connection(pair):
    fe, peer = pair
    handshake(fe, peer, int(PF.REPLY_ACK))
    peer.u64(R.SET_VRING_ADDR, 1)
    with pytest.raises(VhostUserError, match=r"failed SET_VRING_ADDR \(reply-ack status 0x1\)"):
        fe.set_vring_addr(0, 0x1000, 0x2000, 0x3000)
    req, _, payload, _ = peer.read()
    assert req == R.SET_VRING_ADDR
    assert W.decode_vring_addr(payload) == (0, 0, 0x1000, 0x3000, 0x2000, 0)
    peer.u64(R.GET_FEATURES, FEATURES)
    assert fe.get_features() == FEATURES


def test_set_mem_table_xen_regions_and_fds(pair):
    fe, peer = pair
    handshake(fe, peer, int(PF.REPLY_ACK | PF.XEN_MMAP))
    r, w = os.pipe()
    try:
        regions = [VhostUserRegion(0x4000_0000, 1 << 20, 0x7000_0000, r, 0,
                                   W.XEN_MMAP_FOREIGN, 3)]  # fmt: skip
        peer.u64(R.SET_MEM_TABLE, 0)
        fe.set_mem_table(regions)
        req, flags, payload, fds = peer.read()
        assert req == R.SET_MEM_TABLE and len(fds) == 1 and len(payload) == 48
        assert flags & W.FLAG_NEED_REPLY
        (got,) = W.decode_mem_table(payload, xen=True)
        assert (got.gpa, got.size, got.uva, got.xen_mmap_flags, got.domid) == (
            0x4000_0000, 1 << 20, 0x7000_0000, W.XEN_MMAP_FOREIGN, 3)  # fmt: skip
    finally:
        os.close(r)
        os.close(w)


def test_a_memory_table_reply_may_take_longer_than_other_replies(listener):
    """A backend maps the guest's memory for SET_MEM_TABLE (seconds for a big guest):
    its ack may take up to mem_timeout; any other reply still times out at timeout."""
    path, srv = listener
    fe = VhostUserFrontend(path, timeout=0.3, mem_timeout=2.0)
    conn, _ = srv.accept()
    peer = Peer(conn)
    r, w = os.pipe()
    try:
        handshake(fe, peer, int(PF.REPLY_ACK))
        region = VhostUserRegion(0x4000_0000, 1 << 20, 0x7000_0000, r, 0)
        late = threading.Timer(0.8, peer.u64, (R.SET_MEM_TABLE, 0))
        late.start()
        fe.set_mem_table([region])  # acked after 0.8 s: within mem_timeout
        late.join()
        assert peer.read()[0] == R.SET_MEM_TABLE

        def too_late() -> None:
            with contextlib.suppress(OSError):  # the front-end has given up and hung up
                peer.u64(R.GET_FEATURES, FEATURES)

        late = threading.Timer(0.8, too_late)
        late.start()
        with pytest.raises(VhostUserError, match=r"did not answer GET_FEATURES within 0\.3 s"):
            fe.get_features()
        late.join()
    finally:
        fe.close()
        conn.close()
        os.close(r)
        os.close(w)


def test_set_mem_table_without_xen_refuses_xen_regions(pair):
    fe, peer = pair
    handshake(fe, peer, int(PF.REPLY_ACK))
    region = VhostUserRegion(0x4000_0000, 1 << 20, 0x7000_0000, 0, 0, W.XEN_MMAP_GRANT, 3)
    with pytest.raises(VhostUserError, match="XEN_MMAP"):
        fe.set_mem_table([region])
    assert peer.pending() == b"<nothing>"


def test_vring_fd_messages(pair):
    fe, peer = pair
    handshake(fe, peer, 0)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.set_vring_kick(2, efd)
        fe.set_vring_call(2, None)
        fe.set_vring_err(2, efd)
    finally:
        os.close(efd)
    got = [peer.read() for _ in range(3)]
    assert [(g[0], W.decode_u64(g[2]), len(g[3])) for g in got] == [
        (R.SET_VRING_KICK, 2, 1),
        (R.SET_VRING_CALL, 2 | 0x100, 0),
        (R.SET_VRING_ERR, 2, 1),
    ]
    with pytest.raises(VhostUserError, match="queue index 256"):
        fe.set_vring_kick(256, None)
    with pytest.raises(VhostUserError, match="not 16-byte aligned"):
        fe.set_vring_addr(0, 0x1008, 0x2000, 0x3000)


def test_vring_enable_skipped_without_protocol_features(pair):
    fe, peer = pair
    peer.u64(R.GET_FEATURES, 1 << 32)
    assert fe.get_features() == 1 << 32
    fe.set_owner()
    fe.set_features(1 << 32)
    assert [peer.read()[0] for _ in range(3)] == [R.GET_FEATURES, R.SET_OWNER, R.SET_FEATURES]
    assert fe.acked_features == 1 << 32
    fe.set_vring_enable(0, True)  # rings start enabled; the message is not allowed
    assert peer.pending() == b"<nothing>"
    with pytest.raises(VhostUserError, match="did not offer"):
        fe.get_protocol_features()


def test_get_config_checks(pair):
    fe, peer = pair
    handshake(fe, peer, int(PF.CONFIG | PF.REPLY_ACK))
    peer.reply(R.GET_CONFIG, W.encode_config(0, 8, b"\x00\x40" + bytes(6)))
    assert fe.get_config(0, 8) == b"\x00\x40" + bytes(6)
    assert peer.read()[2] == W.encode_config(0, 8)
    peer.reply(R.GET_CONFIG, b"")  # the spec's error indication
    with pytest.raises(VhostUserError, match="refused GET_CONFIG"):
        fe.get_config(0, 8)
    peer.read()
    peer.reply(R.GET_CONFIG, W.encode_config(4, 8, bytes(8)))
    with pytest.raises(VhostUserError, match="with 8 bytes at 4"):
        fe.get_config(0, 8)


def test_get_vring_base_checks_the_queue(pair):
    fe, peer = pair
    peer.reply(R.GET_VRING_BASE, W.encode_vring_state(1, 9))
    with pytest.raises(VhostUserError, match="for queue 0 with queue 1"):
        fe.get_vring_base(0)


# -- hostile replies ------------------------------------------------------------------

HOSTILE = {
    "wrong request": (dict(req=R.GET_PROTOCOL_FEATURES, payload=bytes(8)),
                      "answered GET_FEATURES with GET_PROTOCOL_FEATURES"),
    "unknown request": (dict(req=99, payload=bytes(8)), "with request 99"),
    "no reply flag": (dict(payload=bytes(8), flags=W.VERSION), "without the reply flag"),
    "version 2": (dict(payload=bytes(8), flags=2 | W.FLAG_REPLY), "protocol version 2"),
    "short": (dict(payload=bytes(4)), "with 4 payload bytes, expected 8"),
    "long": (dict(payload=bytes(16)), "with 16 payload bytes"),
    # claims 2 GiB: must be refused from the header, not read
    "oversized": (dict(payload=bytes(8), size=1 << 31), "with 2147483648 payload bytes"),
    "truncated then silent": (dict(payload=bytes(3), size=8), "did not answer GET_FEATURES"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_reply_poisons_the_connection(pair, case):
    fe, peer = pair
    fe.timeout = 0.3
    spec, message = HOSTILE[case]
    spec = dict(spec)
    peer.reply(spec.pop("req", R.GET_FEATURES), **spec)
    with pytest.raises(VhostUserError, match=message) as err:
        fe.get_features()
    assert fe.socket_path in str(err.value)
    # the front-end hung up on it, and refuses further use of the connection
    peer.read()  # our GET_FEATURES
    peer.conn.settimeout(2.0)
    while peer.conn.recv(4096):
        pass  # the peer reaches EOF: the socket was shut down
    with pytest.raises(VhostUserError, match="unusable"):
        fe.get_features()


def test_stray_fds_are_closed_and_refused(pair):
    fe, peer = pair
    before = open_fds()
    pipes = [os.pipe() for _ in range(3)]
    peer.reply(R.GET_FEATURES, bytes(8), fds=[fd for p in pipes for fd in p])
    for p in pipes:
        for fd in p:
            os.close(fd)
    with pytest.raises(VhostUserError, match=r"passed 6 file descriptor\(s\)"):
        fe.get_features()
    assert open_fds() == before


def test_truncated_then_eof(pair):
    fe, peer = pair
    peer.reply(R.GET_FEATURES, bytes(5), size=8)
    peer.conn.close()
    with pytest.raises(VhostUserError, match="closed the connection"):
        fe.get_features()


def test_eof_before_the_request(pair):
    fe, peer = pair
    peer.conn.close()  # the send itself fails (EPIPE)
    with pytest.raises(VhostUserError, match=r"be\.sock closed the connection"):
        fe.get_features()


def test_reset_with_unread_request(pair):
    fe, peer = pair

    def hang_up_unread() -> None:
        peer.conn.recv(1, socket.MSG_PEEK)  # the request arrived; leave it unread
        peer.conn.close()  # -> ECONNRESET on the front-end's read

    t = threading.Thread(target=hang_up_unread)
    t.start()
    try:
        with pytest.raises(VhostUserError, match="closed the connection"):
            fe.get_features()
    finally:
        t.join()


def test_no_fd_leaks_across_failures(listener):
    path, srv = listener
    before = open_fds()
    for case in sorted(HOSTILE):
        fe = VhostUserFrontend(path, timeout=0.2)
        conn, _ = srv.accept()
        spec, _ = HOSTILE[case]
        spec = dict(spec)
        Peer(conn).reply(spec.pop("req", R.GET_FEATURES), **spec)
        with pytest.raises(VhostUserError):
            fe.get_features()
        fe.close()
        conn.close()
        with pytest.raises(VhostUserError, match="is closed"):
            fe.get_features()
        assert fe.fileno() == -1
    assert open_fds() == before


def test_bad_fd_is_refused_without_harming_the_connection(pair):
    fe, peer = pair
    handshake(fe, peer, 0)
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # r is now a closed fd number
    with pytest.raises(VhostUserError, match="sending SET_VRING_CALL failed: Bad file"):
        fe.set_vring_call(0, r)
    assert peer.pending() == b"<nothing>"
    peer.u64(R.GET_FEATURES, FEATURES)
    assert fe.get_features() == FEATURES
