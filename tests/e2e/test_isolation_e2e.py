"""One guest's backend hangs, is slow, or dies and comes back wedged: another guest's
register accesses keep being answered at once, and the stuck guest's own vCPU waits
a bounded time, then finds its device DEVICE_NEEDS_RESET and recovers once its
backend answers again.

A wedged backend is a real qemu-storage-daemon stopped with SIGSTOP: the kernel
still accepts connections on its socket, nothing answers them.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.conftest import needs_qsd
from xvf.device.vhost_device import BACKEND_ANSWER_LIMIT_S
from xvf.platform.sim.backends import start_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach
from xvf.platform.sim.virtio_driver import DomainMmioTransport
from xvf.protocols import virtio as R

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
ONE_BLK = 'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=0" ]'
# A bystander's access waits for nothing but xvf's service loop. The bound is far
# below what a stuck backend used to cost it (the 5 s vhost-user timeout) and far
# above a loaded machine's scheduling noise.
BYSTANDER_WORST_S = 1.0


class Bystander(threading.Thread):
    """Reads the other guest's registers and config space in a loop, timing each
    (on a vCPU of its own: the guest's I/O runs on vCPU 0 meanwhile)."""

    def __init__(self, dom, index: int, vcpu: int) -> None:
        super().__init__(daemon=True)
        self.t = DomainMmioTransport(dom, dom.virtio[index].base, vcpu=vcpu)
        self.worst = 0.0
        self.accesses = 0
        self.errors: list[BaseException] = []
        self.halt = threading.Event()

    def finish(self) -> None:
        """Stop timing, and check the bystander was never held up."""
        self.halt.set()
        self.join(5)
        assert not self.errors, self.errors
        assert self.worst < BYSTANDER_WORST_S, f"bystander stalled {self.worst:.2f}s"

    def run(self) -> None:
        t = self.t
        try:
            while not self.halt.is_set():
                for offset in (R.STATUS, R.CONFIG, R.CONFIG + 4, R.QUEUE_NUM_MAX):
                    start = time.monotonic()
                    t.read(offset, 4)
                    self.worst = max(self.worst, time.monotonic() - start)
                    self.accesses += 1
                time.sleep(0.002)
        except BaseException as exc:
            self.errors.append(exc)


def _wedge(qsd) -> None:
    qsd.proc.send_signal(signal.SIGSTOP)


def _unwedge(qsd) -> None:
    if qsd.proc.poll() is None:  # from a timer thread too: never raise there
        try:
            qsd.proc.send_signal(signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("fault", ["hangs", "answers-after-seconds", "dies-returns-wedged"])
def test_a_stuck_backend_stalls_no_other_guest(
    hypervisor, start_frontend, start_blk_backend, sockets, request, fault
):
    _, image_b = start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    qsd_a, image_a = start_blk_backend(sockets, "blk.sock1", size=8 * MIB)
    fe = start_frontend(sockets, foreign=True)
    dom_b = hypervisor.create_domain("bystander", memory_mib=32, vcpus=2, virtio=ONE_BLK)
    fe.wait_log("blk.sock0")
    dom_a = hypervisor.create_domain("stuck", memory_mib=32, virtio=ONE_BLK)
    fe.wait_log("blk.sock1")
    blk_b = VirtioBlk(attach(dom_b, 0))
    blk_b.start()
    blk_a = VirtioBlk(attach(dom_a, 0))
    blk_a.start()
    blk_a.write(0, b"\x11" * 4096)
    capacity = blk_a.dev.t.read(R.CONFIG, 4)

    bystander = Bystander(dom_b, 0, vcpu=1)
    bystander.start()
    if fault == "dies-returns-wedged":
        qsd_a.kill()
        fe.wait_log("closed the connection")
        # The new one is wedged before xvf can see its socket: started elsewhere,
        # stopped, then moved into place (a socket is found by its inode).
        hidden = os.path.join(sockets, "starting.sock")
        qsd_a = start_qsd(image_a, hidden)
        request.addfinalizer(qsd_a.stop)
        _wedge(qsd_a)
        os.rename(hidden, os.path.join(sockets, "blk.sock1"))
        time.sleep(0.5)  # xvf's next reconnection attempt now waits in its handshake
    else:
        _wedge(qsd_a)
    request.addfinalizer(lambda: _unwedge(qsd_a))

    # The stuck guest's config reads are answered from xvf's cache, at once.
    start = time.monotonic()
    assert blk_a.dev.t.read(R.CONFIG, 4) == capacity
    assert time.monotonic() - start < BYSTANDER_WORST_S
    # Its reset needs the backend (the rings must stop): its vCPU waits, boundedly.
    if fault == "answers-after-seconds":  # within the bound: nothing is given up
        threading.Timer(1.0, _unwedge, (qsd_a,)).start()
    start = time.monotonic()
    blk_a.dev.t.write(R.STATUS, 4, 0)
    waited = time.monotonic() - start
    assert waited < BACKEND_ANSWER_LIMIT_S + 1.0, f"reset held its vCPU {waited:.1f}s"
    if fault == "answers-after-seconds":
        assert waited >= 0.9, "the reset did not wait for the backend to stop its rings"
        assert blk_a.dev.status == 0
    time.sleep(2.0)
    # Meanwhile the other guest does I/O as usual.
    blk_b.write(0, b"\x22" * 65536)
    blk_b.flush()
    bystander.finish()
    print(
        f"{fault}: bystander worst access {bystander.worst * 1000:.1f} ms over "
        f"{bystander.accesses} accesses; stuck guest's reset answered after {waited:.2f}s"
    )
    assert bystander.accesses > 100
    with open(image_b, "rb") as f:
        assert f.read(65536) == b"\x22" * 65536

    # The stuck guest recovers once its backend answers again.
    _unwedge(qsd_a)
    if fault != "answers-after-seconds":
        fe.wait_log("reconnected to backend", timeout=30)
    blk_a = VirtioBlk(attach(dom_a, 0))
    blk_a.start()
    blk_a.write(8, b"\x33" * 4096)
    blk_a.flush()
    with open(image_a, "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == b"\x33" * 4096
    log = fe.log()
    if fault == "hangs":  # by the message timeout or the watchdog, whichever first
        assert log.count("marked DEVICE_NEEDS_RESET") == 1, "the stall is reported once"
    elif fault == "answers-after-seconds":
        assert "DEVICE_NEEDS_RESET" not in log and "reconnect" not in log
    assert fe.proc.poll() is None
    blk_a.close()
    blk_b.close()
