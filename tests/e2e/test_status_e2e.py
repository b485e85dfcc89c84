"""`xvf status` against a running xvf serving a simulated guest doing block I/O."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_qsd
from xvf.sim.backends import status_socket_of
from xvf.sim.drivers.blk import VirtioBlk
from xvf.sim.guest import attach

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
LINE = 'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=1" ]'


def xvf_status(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xvf", "status", "--status-socket", path, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


def test_status_shows_the_guest_the_device_and_its_counters(
    hypervisor, start_frontend, start_blk_backend, sockets
):
    start_blk_backend(sockets, "blk.sock0", size=16 * MIB)
    fe = start_frontend(sockets, foreign=False)  # grant mode: relayed through xvf
    dom = hypervisor.create_domain("st", memory_mib=64, vcpus=2, virtio=LINE)
    fe.wait_log("serving virtio blk")
    path = status_socket_of(hypervisor.run_dir)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    data = os.urandom(256 * 1024)
    blk.write(0, data)
    assert blk.read(0, len(data) // 512) == data

    res = xvf_status(path, "--json")
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    (guest,) = answer["guests"]
    assert guest["domid"] == dom.domid and guest["vcpus"] == 2
    assert guest["ioreq_server"] is not None and guest["requests"] > 0
    (dev,) = guest["devices"]
    assert dev["label"] == f"dom{dom.domid}/blk0" and dev["type"] == "blk"
    assert dev["mapping"] == "grant" and dev["memory"] == "relay"
    assert dev["backend"] == "connected" and dev["xenstore_state"] == 4
    assert dev["backend_socket"] == os.path.join(sockets, "blk.sock0")
    c = dev["counters"]
    assert c["exits"] > 0 and c["notifies"] > 0 and c["interrupts"] > 0
    assert c["relay_requests"] > 0 and c["relay_bytes"] >= 2 * len(data)
    assert c["device_resets"] >= 1 and c["reconnects"] == 0 and c["bad_requests"] == 0

    table = xvf_status(path)
    assert table.returncode == 0, table.stderr
    assert f"dom{dom.domid}: IOREQ server" in table.stdout
    assert f"dom{dom.domid}/blk0" in table.stdout and "relay" in table.stdout
    assert "connected" in table.stdout
    blk.close()
    assert "ERROR" not in fe.log()


def test_status_says_why_it_cannot_ask(run_dir):
    missing = xvf_status(os.path.join(run_dir, "none.sock"))
    assert missing.returncode == 1 and "no status socket" in missing.stderr
    stale = os.path.join(run_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # bound, never listening: what a daemon that died leaves
    refused = xvf_status(stale)
    assert refused.returncode == 1 and "not running" in refused.stderr
