"""The benchmarks' C device model (benchmarks/c/blk_dm.c, its grant relay in
blk_relay.h) moves the right bytes: a baseline that dropped or mixed up data would make
every xvf/C ratio meaningless. A guest's Python driver writes and reads through it to a
real qemu-storage-daemon, in foreign mode and in grant mode, and the disk image holds
what was written."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from benchmarks.c_dm import CDeviceModel
from benchmarks.e2e_blk import Setup
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach
from xvf.protocols import virtio as R

pytestmark = [
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler"),
    pytest.mark.skipif(
        shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon not installed"
    ),
]


class Rig:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.setup = Setup(image_mib=8)
        self.dm: CDeviceModel | None = None
        self.blk: VirtioBlk | None = None
        self.image = os.path.join(self.setup.dir, "blk.sock0.img")

    def start(self) -> None:
        self.setup.start_qsd()
        self.setup.start_hv()
        dom = self.setup.create_guest(foreign=self.mode == "foreign", memory_mib=64)
        self.dm = CDeviceModel(dom, os.path.join(self.setup.sockets, "blk.sock0"))
        self.blk = VirtioBlk(attach(dom, 0))
        self.blk.start()

    def stop(self) -> None:
        """The driver, then the C program (its counters in dm.stderr); once."""
        blk, self.blk = self.blk, None
        if blk is not None:
            blk.close()
        if self.dm is not None:
            self.dm.close()


@pytest.fixture(params=["foreign", "grant"])
def rig(request):
    rig = Rig(request.param)
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()
        rig.setup.close()


def test_writes_reach_the_disk_and_read_back(rig):
    mode, blk, dm, image = rig.mode, rig.blk, rig.dm, rig.image
    assert blk.dev.has_feature(R.F_ACCESS_PLATFORM) == (mode == "grant")
    rng = random.Random(7)
    # 4 KiB, a one-sector request, and a 40 KiB one whose buffer spans many pages
    # (grants: one copy segment per page)
    writes = {8: rng.randbytes(4096), 100: rng.randbytes(512), 2000: rng.randbytes(40960)}
    for sector, data in writes.items():
        blk.write(sector, data)
    blk.flush()
    for sector, data in writes.items():
        assert blk.read(sector, len(data) // 512) == data
    with open(image, "rb") as f:
        for sector, data in writes.items():
            f.seek(sector * 512)
            assert f.read(len(data)) == data
    assert dm.proc.poll() is None  # still serving
    rig.stop()
    assert b"refused=0 lost=0 lies=0" in dm.stderr, dm.stderr


def test_grant_relay_refuses_a_chain_larger_than_its_bounce_slot(rig):
    blk, dm = rig.blk, rig.dm
    if rig.mode != "grant":
        pytest.skip("only the grant relay has bounce slots")
    big = 128 << 10  # blk_relay.h: RELAY_SLOT is 64 KiB per request
    with pytest.raises(Exception, match="status"):
        blk.read(0, big // 512)
    # refused (completed with nothing written, status byte untouched), and still serving
    data = random.Random(3).randbytes(4096)
    blk.write(16, data)
    assert blk.read(16, 8) == data
    rig.stop()
    assert b"refused=1 lost=0 lies=0" in dm.stderr, dm.stderr
