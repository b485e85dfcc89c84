"""A simulated guest does real block I/O through xvf to qemu-storage-daemon.

The data is checked where it lands: the backend's disk image on the host.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import needs_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach, wait_served

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
CHUNK = 256 * 1024


def blk_line(grants: bool) -> str:
    usage = "1" if grants else "0"
    return f'virtio = [ "type=virtio,device2, transport=mmio, grant_usage={usage}" ]'


def write_read_verify(blk: VirtioBlk, image: str, total: int, depth: int, seed: int) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(total)
    ram = blk.ram
    # queue depth `depth`: keep that many writes in flight
    inflight: dict[int, int] = {}  # id(request) -> its buffer
    keep = []  # requests stay alive so their ids stay unique
    for off in range(0, total, CHUNK):
        while len(inflight) >= depth:
            for req in blk.complete(timeout=20):
                assert req.status == 0, req.describe()
                ram.free(inflight.pop(id(req)))
        gpa = ram.alloc(CHUNK)
        ram.write(gpa, payload[off : off + CHUNK])
        req = blk.submit(1, off // 512, gpa, CHUNK)
        inflight[id(req)] = gpa
        keep.append(req)
    while inflight:
        for req in blk.complete(timeout=20):
            assert req.status == 0, req.describe()
            ram.free(inflight.pop(id(req)))
    blk.flush()
    with open(image, "rb") as f:
        on_disk = f.read(total)
    assert on_disk == payload, "the backend's disk image differs from what the guest wrote"
    # and back through the guest, from a different place than it was written
    for off in range(0, total, 4 * CHUNK):
        assert blk.read(off // 512, CHUNK // 512) == payload[off : off + CHUNK]


@pytest.mark.parametrize(
    ("foreign", "threads"),
    [(True, "per-guest"), (False, "per-guest"), (False, "one")],
    ids=["foreign", "grant", "grant-one-thread"],
)
def test_guest_writes_64mib_through_xvf_to_qsd(
    hypervisor, start_frontend, start_blk_backend, foreign, threads, sockets
):
    """Also with every guest on the daemon's thread (--service-threads one): the relay
    then runs on the daemon's loop, as an FdHandler of it."""
    _, image = start_blk_backend(sockets, "blk.sock0", size=80 * MIB)
    fe = start_frontend(sockets, foreign=foreign, extra=["--service-threads", threads])
    dom = hypervisor.create_domain("blk", memory_mib=96, vcpus=2, virtio=blk_line(not foreign))
    fe.wait_log("serving virtio blk")
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    assert blk.capacity == 80 * MIB // 512
    write_read_verify(blk, image, 64 * MIB, depth=8, seed=1)
    assert blk.get_id() == b"vhost_user_blk" or blk.get_id()  # QSD answers GET_ID
    blk.close()
    # qemu-storage-daemon has no Xen mmap: a shared memfd, or xvf's relay for grants
    assert ("guest RAM as a shared fd" if foreign else "shadow rings relayed") in fe.log()
    assert "ERROR" not in fe.log()


def test_per_device_mapping_serves_grant_and_foreign_guests_from_one_daemon(
    hypervisor, start_frontend, start_blk_backend, sockets
):
    """--mapping per-device: each device's own grant_usage picks its mapping, so one xvf
    serves a grant guest (relayed) and a foreign guest side by side."""
    _, grant_image = start_blk_backend(sockets, "blk.sock0", size=16 * MIB)
    _, foreign_image = start_blk_backend(sockets, "blk.sock1", size=16 * MIB)
    fe = start_frontend(sockets, foreign=False, extra=["--mapping", "per-device"])
    granted = hypervisor.create_domain("granted", memory_mib=48, virtio=blk_line(True))
    wait_served(granted, 0)
    plain = hypervisor.create_domain("plain", memory_mib=48, virtio=blk_line(False))
    wait_served(plain, 0)
    for dom, image, seed in ((granted, grant_image, 2), (plain, foreign_image, 3)):
        blk = VirtioBlk(attach(dom, 0))
        blk.start()
        write_read_verify(blk, image, 4 * MIB, depth=4, seed=seed)
        blk.close()
    log = fe.log()
    assert "shadow rings relayed" in log and "guest RAM as a shared fd" in log
    assert f"dom{granted.domid}/blk0: serving virtio blk" in log
    assert "(grant mapping)" in log and "(foreign mapping)" in log
    assert "ERROR" not in log
