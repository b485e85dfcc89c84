"""A vCPU lent to another process (xvf.platform.sim.lend): the benchmarks' C guest runs
block I/O through xvf on its own, playing the simulated Xen's side of the ioreq page
and event channel; afterwards the simulator serves the domain again. Checked: every
request the C guest sent came back with status OK, the exits are the ones Linux makes,
and the Python driver continues on the same ring after the loan."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks.c_guest import CGuest
from tests.conftest import needs_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach
from xvf.platform.sim.lend import lend_device

pytestmark = [
    pytest.mark.e2e,
    needs_qsd,
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the C guest"),
]

MIB = 1 << 20


@pytest.mark.parametrize(
    "foreign,offload",
    [(True, False), (True, True), (False, False)],
    ids=["foreign", "offload", "grant"],
)
def test_the_c_guest_runs_io_through_xvf_and_the_simulator_serves_again_after(
    request, tmp_path, sockets, start_blk_backend, foreign, offload
):
    from tests.conftest import FrontendProcess
    from xvf.platform.sim.hypervisor import Hypervisor

    hv = Hypervisor(str(tmp_path / "xen"), kernel_eventfds=offload).start()
    request.addfinalizer(hv.close)
    start_blk_backend(sockets, "blk.sock0", size=16 * MIB)
    fe = FrontendProcess(hv, sockets, foreign, str(tmp_path / "xvf.log"), None)
    request.addfinalizer(fe.stop)
    usage = "0" if foreign else "1"
    line = f'virtio = [ "type=virtio,device2, transport=mmio, grant_usage={usage}" ]'
    dom = hv.create_domain("lend", memory_mib=64, vcpus=1, virtio=line)
    fe.wait_log("serving virtio blk")
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    loan = lend_device(dom, 0)
    assert ("kick_fd" in loan.args) and (loan.args["kick_fd"] >= 0) == offload
    guest = CGuest(blk, 8, loan.args, loan.pass_fds)
    try:
        r = guest.run("xen", 8, 200, seed=3)
    finally:
        guest.close()
        loan.close()
    stats = r["stats"]
    assert stats["requests"] == 200 and stats["errors"] == 0
    assert stats["interrupts"] > 0
    # Linux-like: InterruptStatus read and InterruptACK write on each interrupt, and
    # QueueNotify as an exit only where the Dom0 kernel holds no ioeventfd for it.
    kick_exits = 0 if offload else stats["kicks"]
    assert stats["exits"] == 2 * (stats["interrupts"] - stats["spurious"]) + kick_exits
    # The simulator serves the domain again; the Python driver continues the ring.
    vq = blk.dev.queues[0]
    vq._avail_idx = vq._last_used = guest.state["last_used"]
    data = os.urandom(64 * 1024)
    blk.write(2048, data)
    assert blk.read(2048, len(data) // 512) == data
    blk.close()
    assert "ERROR" not in fe.log()
