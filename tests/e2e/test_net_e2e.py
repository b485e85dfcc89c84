"""A simulated guest's virtio-net frames go through xvf to DPDK testpmd's vhost PMD and back.

testpmd runs with one vhost port in loop topology and io forwarding: every frame
the guest transmits (tx queue) is put back unchanged on the guest's rx queue, so
each one is checked byte for byte. testpmd has no vhost-user XEN_MMAP: foreign
mode hands it guest RAM as a shared memfd (simulator only), grant mode goes
through xvf's shadow-ring relay. Its forwarding lcore busy-polls a CPU, so it
runs only as long as one test.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from xvf.platform.sim.drivers.net import MAX_FRAME, VirtioNet
from xvf.platform.sim.guest import attach

TESTPMD = "dpdk-testpmd"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which(TESTPMD) is None,
        reason="dpdk-testpmd missing (apt-get install --no-install-recommends dpdk-dev on "
        "Debian 12; it pulls the vhost PMD, librte-net-vhost23)",
    ),
]

FRAMES = 200
BURST = 50  # frames in flight at once; the rx ring holds 256 buffers


def net_line(grants: bool) -> str:
    usage = "1" if grants else "0"
    return f'virtio = [ "type=virtio,device1, transport=mmio, grant_usage={usage}" ]'


class DpdkTestpmd:
    """One dpdk-testpmd process serving a vhost-user server socket."""

    def __init__(self, socket_path: str, prefix: str, log_path: str) -> None:
        self.prefix = prefix
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    TESTPMD, "-l", "0-1", "--no-huge", "-m", "256", "--no-pci",
                    f"--file-prefix={prefix}",
                    "--vdev", f"net_vhost0,iface={socket_path},queues=1",
                    "--",
                    "--port-topology=loop", "--forward-mode=io", "--nb-cores=1",
                    "--txq=1", "--rxq=1",
                    # the default mbuf count does not fit in 256 MiB without hugepages
                    "--total-num-mbufs=16384",
                    # non-interactive testpmd exits at stdin EOF unless it prints stats
                    "--stats-period=3600",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if self.proc.poll() is not None:
                raise AssertionError(f"testpmd exited ({self.proc.returncode}):\n{self.log()}")
            assert time.monotonic() < deadline, f"testpmd never listened on {socket_path}"
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> str:
        """Stop it (it prints its forward statistics on the way out); returns its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # testpmd stops its ports and exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # DPDK leaves its runtime directory behind
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return self.log()


@pytest.fixture
def testpmd(run_dir) -> Iterator:
    """start(socket_path) -> DpdkTestpmd; every one started is stopped at teardown."""
    started: list[DpdkTestpmd] = []

    def start(socket_path: str) -> DpdkTestpmd:
        # Its own runtime directory (/var/run/dpdk/<prefix>) per process: no clash
        # with another DPDK process on the machine.
        n = len(started)
        pmd = DpdkTestpmd(
            socket_path, f"xvf-net-{os.getpid()}-{n}", os.path.join(run_dir, f"testpmd{n}.log")
        )
        started.append(pmd)
        return pmd

    yield start
    for pmd in started:
        pmd.stop()


def make_frames(count: int, seed: int) -> list[bytes]:
    """Distinct Ethernet frames of varied lengths: locally administered MACs, a
    local-experimental ethertype, a sequence number, random payload."""
    rng = random.Random(seed)
    frames = []
    for i in range(count):
        length = rng.randint(60, min(1514, MAX_FRAME))
        header = bytes.fromhex("02000000aa01 02000000bb02 88b5") + i.to_bytes(4, "big")
        frames.append(header + rng.randbytes(length - len(header)))
    return frames


@pytest.mark.parametrize("foreign", [True, False], ids=["foreign", "grant"])
def test_guest_frames_echo_through_xvf_and_testpmd(
    hypervisor, start_frontend, testpmd, sockets, foreign
):
    pmd = testpmd(os.path.join(sockets, "net.sock0"))
    fe = start_frontend(sockets, foreign=foreign)
    dom = hypervisor.create_domain("net", memory_mib=64, vcpus=1, virtio=net_line(not foreign))
    fe.wait_log("serving virtio net")
    net = VirtioNet(attach(dom, 0))
    net.start()
    # testpmd offers CTRL_VQ, CTRL_RX, GUEST_ANNOUNCE and MQ, but the device has no
    # control queue: a Linux guest accepting them would look for queue 2 and fail
    offered = net.dev.device_features
    assert offered & (1 << 17 | 1 << 18 | 1 << 21 | 1 << 22) == 0, hex(offered)
    frames = make_frames(FRAMES, seed=7)
    back: list[bytes] = []
    for off in range(0, FRAMES, BURST):
        burst = frames[off : off + BURST]
        for frame in burst:
            net.send(frame, timeout=10)
        back += [net.receive(timeout=10) for _ in burst]
    # io forwarding on one queue keeps the order: each frame comes back as sent
    for i, (sent, got) in enumerate(zip(frames, back, strict=True)):
        assert got == sent, f"frame {i} ({len(sent)} bytes) came back as {len(got)} bytes"
    net.close()
    log = fe.log()  # before testpmd goes away, which xvf reports as an error
    assert ("guest RAM as a shared fd" if foreign else "shadow rings relayed") in log
    assert "ERROR" not in log
    # testpmd itself forwarded every frame, none dropped (its exit statistics)
    stats = pmd.stop()
    assert f"RX-packets: {FRAMES} " in stats and f"TX-packets: {FRAMES} " in stats, stats
    assert "TX-dropped: 0 " in stats, stats
