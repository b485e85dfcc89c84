"""A simulated guest runs a FUSE session through xvf to QEMU 7.2's C virtiofsd.

virtiofsd serves no config space (no CONFIG protocol feature), so the tag the
guest reads is the one xvf synthesises (--fs-tag). Files are checked where they
live: the shared directory on the host.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from tests.conftest import wait_for_socket
from xvf.platform.sim.drivers.fs import VirtioFs
from xvf.platform.sim.guest import attach

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.access(VIRTIOFSD, os.X_OK),
        reason=f"{VIRTIOFSD} missing (QEMU 7.2's C virtiofsd: apt-get install "
        "qemu-system-common on Debian 12; QEMU 8+ no longer ships it)",
    ),
]


def fs_line(grants: bool) -> str:
    usage = "1" if grants else "0"
    return f'virtio = [ "type=virtio,device1a, transport=mmio, grant_usage={usage}" ]'


@pytest.fixture
def virtiofsd(run_dir):
    """start(socket_path, share_dir): one virtiofsd; it serves a single connection."""
    procs: list[subprocess.Popen] = []

    def start(socket_path: str, share: str) -> subprocess.Popen:
        log = open(os.path.join(run_dir, "virtiofsd.log"), "wb")
        proc = subprocess.Popen(
            [VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={share}",
             "-o", "cache=auto"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        procs.append(proc)
        wait_for_socket(socket_path, proc, "virtiofsd")
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
        p.wait(timeout=10)


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign", "grant"])
def test_guest_reads_and_writes_files_through_xvf_to_virtiofsd(
    hypervisor, start_frontend, virtiofsd, sockets, run_dir, foreign
):
    share = os.path.join(run_dir, "share")
    os.makedirs(share)
    rng = random.Random(7)
    host_data = rng.randbytes(300 * 1024)
    with open(os.path.join(share, "from-host.bin"), "wb") as f:
        f.write(host_data)
    virtiofsd(os.path.join(sockets, "fs.sock0"), share)
    fe = start_frontend(sockets, foreign=foreign, extra=["--fs-tag", "hostshare"])
    dom = hypervisor.create_domain("fs", memory_mib=64, vcpus=1, virtio=fs_line(not foreign))
    fe.wait_log("serving virtio fs")
    fs = VirtioFs(attach(dom, 0))
    fs.start()
    assert fs.tag == "hostshare"  # virtiofsd has no CONFIG: xvf's own config space
    assert fs.num_request_queues == 1
    fs.init()
    assert fs.minor >= 31

    entry = fs.lookup("from-host.bin")
    assert entry["size"] == len(host_data)
    assert fs.getattr(entry["nodeid"])["size"] == len(host_data)
    fh = fs.open(entry["nodeid"])
    got = bytearray()
    while len(got) < len(host_data):
        piece = fs.read(entry["nodeid"], fh, len(got), 64 * 1024)
        assert piece, "READ hit end of file early"
        got += piece
    assert bytes(got) == host_data
    assert fs.read(entry["nodeid"], fh, len(host_data), 4096) == b""  # end of file
    fs.release(entry["nodeid"], fh)

    guest_data = rng.randbytes(200 * 1024)
    nodeid, wfh = fs.create("from-guest.bin")
    assert fs.write(nodeid, wfh, 0, guest_data) == len(guest_data)
    fs.flush(nodeid, wfh)
    fs.release(nodeid, wfh, os.O_WRONLY)
    with open(os.path.join(share, "from-guest.bin"), "rb") as f:
        assert f.read() == guest_data
    fs.close()

    log = fe.log()
    # virtiofsd has no Xen mmap: a shared memfd, or xvf's relay for grants
    assert ("guest RAM as a shared fd" if foreign else "shadow rings relayed") in log
    assert "ERROR" not in log
