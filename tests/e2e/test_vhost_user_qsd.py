"""xvf's vhost-user front-end against a real qemu-storage-daemon vhost-user-blk export.

Data is checked where the backend put it: in the disk image, with os.pread.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator

import pytest

from tests.conftest import needs_qsd
from tests.qsd import QsdExport, qsd_export
from tests.vhost_handshake import handshake
from tests.virtio_ring_for_tests import (
    BLK_T_IN,
    BLK_T_OUT,
    SECTOR,
    GuestMemory,
    SplitRing,
    blk_request,
)
from xvf.errors import VhostUserError
from xvf.protocols.vhost_user import VhostUserFrontend
from xvf.protocols.vhost_user_wire import F_PROTOCOL_FEATURES, XEN_MMAP_FOREIGN
from xvf.protocols.vhost_user_wire import ProtocolFeature as PF

pytestmark = [pytest.mark.e2e, needs_qsd]

VERSION_1 = 1 << 32
BLK_F_SEG_MAX = 1 << 2
BLK_F_BLK_SIZE = 1 << 6
BLK_F_FLUSH = 1 << 9
EVENT_IDX = 1 << 29  # not wanted: the test ring does not maintain used_event
WANTED = VERSION_1 | BLK_F_SEG_MAX | BLK_F_BLK_SIZE | BLK_F_FLUSH
QSIZE = 128
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def export() -> Iterator[QsdExport]:
    yield from qsd_export()


@pytest.fixture
def fe(export: QsdExport) -> Iterator[VhostUserFrontend]:
    frontend = VhostUserFrontend(export.socket_path, timeout=5.0)
    yield frontend
    frontend.close()


class LiveQueue:
    """Guest memory (1 MiB into the memfd: mmap_offset != 0) with queue 0 running."""

    def __init__(self, fe: VhostUserFrontend) -> None:
        self.mem = GuestMemory(2 << 20, fd_offset=1 << 20)
        self.ring = SplitRing(self.mem, self.mem.gpa, QSIZE)
        self.data = self.mem.gpa + 0x10000
        self.scratch = self.mem.gpa + 0x8000
        fe.set_mem_table([self.mem.region()])
        fe.set_vring_num(0, QSIZE)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(0, *self.ring.addrs())
        fe.set_vring_kick(0, self.ring.kick_fd)
        fe.set_vring_call(0, self.ring.call_fd)
        fe.set_vring_enable(0, True)

    def close(self) -> None:
        self.ring.close()
        self.mem.close()


@pytest.fixture
def live(fe: VhostUserFrontend) -> Iterator[LiveQueue]:
    handshake(fe, WANTED)
    q = LiveQueue(fe)
    yield q
    q.close()


def test_full_negotiation(fe: VhostUserFrontend):
    handshake(fe, WANTED)
    assert fe.backend_features & VERSION_1 and fe.backend_features & F_PROTOCOL_FEATURES
    assert fe.backend_features & EVENT_IDX  # offered, not wanted, so not acked
    assert fe.acked_features == WANTED | F_PROTOCOL_FEATURES
    # QSD offers MQ, REPLY_ACK and CONFIG of the default set (no XEN_MMAP, STATUS, ...)
    assert fe.offered_protocol_features & PF.REPLY_ACK
    assert not fe.offered_protocol_features & PF.XEN_MMAP
    assert fe.protocol_features == PF.MQ | PF.REPLY_ACK | PF.CONFIG
    assert fe.queue_num == 1


def test_config_capacity_is_image_size(fe: VhostUserFrontend, export: QsdExport):
    handshake(fe, WANTED)
    cfg = fe.get_config(0, 60)
    capacity, blk_size, num_queues = (
        struct.unpack_from("<Q", cfg, 0)[0],
        struct.unpack_from("<I", cfg, 20)[0],
        struct.unpack_from("<H", cfg, 34)[0],
    )
    assert capacity == export.image_size // SECTOR
    assert (blk_size, num_queues) == (512, 1)
    assert fe.get_config(0, 8) == cfg[:8]  # a partial read of the same bytes


def test_write_lands_in_the_image(fe: VhostUserFrontend, live: LiveQueue, export: QsdExport):
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(4 * SECTOR))
    live.mem.write(live.data, pattern)
    assert blk_request(live.ring, live.scratch, BLK_T_OUT, 11, live.data, len(pattern)) == 0
    with open(export.image, "rb") as img:
        assert os.pread(img.fileno(), len(pattern), 11 * SECTOR) == pattern
        assert os.pread(img.fileno(), SECTOR, 10 * SECTOR) == bytes(SECTOR)


def test_read_sees_the_image(fe: VhostUserFrontend, live: LiveQueue, export: QsdExport):
    blob = os.urandom(2 * SECTOR)
    with open(export.image, "r+b") as img:
        os.pwrite(img.fileno(), blob, 40 * SECTOR)
    live.mem.write(live.data, bytes(len(blob)))
    assert blk_request(live.ring, live.scratch, BLK_T_IN, 40, live.data, len(blob)) == 0
    assert live.mem.read(live.data, len(blob)) == blob
    # past the end of the disk: the device answers IOERR (1), it does not drop the request
    past = export.image_size // SECTOR
    assert blk_request(live.ring, live.scratch, BLK_T_IN, past, live.data, SECTOR) == 1


def test_get_vring_base_after_stop(fe: VhostUserFrontend, live: LiveQueue):
    for sector in range(3):
        live.mem.write(live.data, bytes([sector + 1]) * SECTOR)
        assert blk_request(live.ring, live.scratch, BLK_T_OUT, sector, live.data, SECTOR) == 0
    fe.set_vring_enable(0, False)
    assert fe.get_vring_base(0) == live.ring.avail_idx == 3


def test_backend_killed_mid_session(fe: VhostUserFrontend, live: LiveQueue, export: QsdExport):
    export.kill()
    with pytest.raises(VhostUserError, match="closed the connection"):
        fe.set_vring_num(0, QSIZE)
    with pytest.raises(VhostUserError, match="unusable"):
        fe.get_features()


def test_new_session_after_close(fe: VhostUserFrontend, live: LiveQueue, export: QsdExport):
    # What xvf does when a device reconnects: close the session, open another.
    fe.close()
    # QSD serves the next client: a fresh session does I/O again
    fe2 = VhostUserFrontend(export.socket_path)
    try:
        handshake(fe2, WANTED)
        q = LiveQueue(fe2)
        try:
            q.mem.write(q.data, b"\x5a" * SECTOR)
            assert blk_request(q.ring, q.scratch, BLK_T_OUT, 5, q.data, SECTOR) == 0
        finally:
            q.close()
    finally:
        fe2.close()
    with open(export.image, "rb") as img:
        assert os.pread(img.fileno(), SECTOR, 5 * SECTOR) == b"\x5a" * SECTOR


def test_session_leaks_no_fds(export: QsdExport):
    before = open_fds()
    fe = VhostUserFrontend(export.socket_path)
    handshake(fe, WANTED)
    q = LiveQueue(fe)
    q.mem.write(q.data, b"\x01" * SECTOR)
    assert blk_request(q.ring, q.scratch, BLK_T_OUT, 0, q.data, SECTOR) == 0
    fe.get_vring_base(0)
    q.close()
    fe.close()
    assert open_fds() == before


def test_missing_socket_names_the_path(export: QsdExport):
    path = os.path.join(os.path.dirname(export.socket_path), "absent.sock")
    with pytest.raises(VhostUserError, match=r"absent\.sock"):
        VhostUserFrontend(path)


# -- the Xen mmap layout against a backend that requires it ---------------------------
# QSD offers no XEN_MMAP. The repo's rust-vmm stand-in (tests/backends, run as its own
# process with --require-xen-mmap, as a rust-vmm `xen` build behaves) checks the 40-byte
# region layout and the flags the way rust-vmm does.


@pytest.fixture
def xen_backend(start_ref_backend) -> Iterator[str]:
    run_dir = tempfile.mkdtemp(prefix="xvf-vux-", dir="/tmp")
    sock = os.path.join(run_dir, "i2c.sock")
    start_ref_backend("i2c", sock, "--require-xen-mmap")
    yield sock
    shutil.rmtree(run_dir, ignore_errors=True)


def test_xen_mmap_regions_accepted(xen_backend: str):
    with VhostUserFrontend(xen_backend) as fe:
        handshake(fe, VERSION_1)
        assert fe.protocol_features & PF.XEN_MMAP
        q = LiveQueue(fe)  # SET_MEM_TABLE with the 40-byte region layout, flags 0
        try:
            # no REPLY_ACK here: a reply to GET_VRING_BASE proves nothing was refused
            assert fe.get_vring_base(0) == 0
        finally:
            q.close()


def test_xen_mmap_foreign_region_refused_by_backend(xen_backend: str):
    mem = GuestMemory(1 << 20)
    try:
        with VhostUserFrontend(xen_backend) as fe:
            handshake(fe, VERSION_1)
            region = mem.region()
            region.xen_mmap_flags, region.domid = XEN_MMAP_FOREIGN, 7
            fe.set_mem_table([region])  # this backend cannot map privcmd: it hangs up
            with pytest.raises(VhostUserError, match="closed the connection"):
                fe.get_vring_base(0)
    finally:
        mem.close()


def test_not_acking_xen_mmap_is_fatal_for_a_xen_backend(xen_backend: str):
    with VhostUserFrontend(xen_backend) as fe:
        with pytest.raises(VhostUserError, match="closed the connection"):
            handshake(fe, VERSION_1, protocol=PF.MQ)
