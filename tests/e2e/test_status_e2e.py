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
from xvf.platform.sim.backends import status_socket_of
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach

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
    # the relay's queues are fds the guest's thread watches: it waits in epoll_wait
    thread = guest["service_thread"]
    assert thread["waits_in"] == "epoll_wait" and thread["wakeups"] > 0, thread
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
    assert "service thread waits in epoll_wait" in table.stdout
    assert f"dom{dom.domid}/blk0" in table.stdout and "relay" in table.stdout
    assert "connected" in table.stdout
    blk.close()
    assert "ERROR" not in fe.log()


@pytest.mark.kernel_eventfds
def test_with_the_kernels_offload_the_guests_thread_waits_in_a_read_of_its_channel(
    hypervisor, start_frontend, start_blk_backend, sockets
):
    """Foreign mapping: the (simulated) Dom0 kernel's ioeventfd/irqfd carry the kicks
    and interrupts, the guest's thread watches nothing but its event channel and waits
    in a read of it; ISR reads and ACKs still come to it, and are served."""
    start_blk_backend(sockets, "blk.sock0", size=16 * MIB)
    fe = start_frontend(sockets, foreign=True)
    dom = hypervisor.create_domain("rd", memory_mib=64, vcpus=1, virtio=LINE.replace(
        "grant_usage=1", "grant_usage=0"))  # fmt: skip
    fe.wait_log("serving virtio blk")
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    data = os.urandom(64 * 1024)
    blk.write(0, data)
    assert blk.read(0, len(data) // 512) == data
    res = xvf_status(status_socket_of(hypervisor.run_dir), "--json")
    assert res.returncode == 0, res.stderr
    (guest,) = json.loads(res.stdout)["guests"]
    thread = guest["service_thread"]
    assert thread["waits_in"] == "read", thread
    assert 0 < thread["channel_reads"] <= thread["wakeups"], thread
    (dev,) = guest["devices"]
    assert (dev["queue_notify"], dev["interrupts"]) == ("kernel ioeventfd", "kernel irqfd"), dev
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


def test_a_silent_or_garbled_client_does_not_hold_the_daemon(hypervisor, start_frontend, sockets):
    """The socket lives in xvf's event loop: a client that never sends its request must
    not block the next one (nor the ioreq path), and garbage gets an error, not a crash."""
    fe = start_frontend(sockets, foreign=True)
    fe.wait_log("xvf serving")
    path = status_socket_of(hypervisor.run_dir)
    with socket.socket(socket.AF_UNIX) as silent, socket.socket(socket.AF_UNIX) as bad:
        silent.connect(path)  # says nothing
        bad.settimeout(10)
        bad.connect(path)
        bad.sendall(b"not json\n")
        assert b'"error"' in bad.recv(4096)
        res = xvf_status(path, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["guests"] == []
    assert fe.proc.poll() is None


class _Loop:
    def __init__(self) -> None:
        self.fds: dict[int, object] = {}

    def add_reader(self, fd: int, cb) -> None:
        self.fds[fd] = cb

    def remove_fd(self, fd: int) -> None:
        self.fds.pop(fd, None)


def test_a_socket_held_by_a_live_daemon_is_left_alone_and_a_stale_one_replaced(run_dir, caplog):
    from xvf.app.status import StatusServer

    path = os.path.join(run_dir, "st", "status.sock")
    first = StatusServer(path, _Loop(), dict)
    assert first.open()
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    second = StatusServer(path, _Loop(), dict)
    assert not second.open()
    assert "belongs to another running xvf" in caplog.text
    first.sock.close()  # dies without cleaning up: the file stays, nobody listens
    assert os.path.exists(path)
    third = StatusServer(path, _Loop(), dict)
    assert third.open()
    third.close()
    assert not os.path.exists(path)


def test_the_config_file_names_the_status_socket_for_the_client_too(run_dir):
    """`xvf --config FILE status` asks the socket the daemon was told in FILE."""
    path = os.path.join(run_dir, "from-config.sock")
    cfg = os.path.join(run_dir, "xvf.toml")
    with open(cfg, "w") as f:
        f.write(f'status_socket = "{path}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "xvf", "--config", cfg, "status"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert done.returncode == 1 and path in done.stderr, done.stderr


def test_a_polling_daemon_serves_block_io_and_counts_what_its_spins_found(
    hypervisor, start_frontend, start_blk_backend, sockets
):
    start_blk_backend(sockets, "blk.sock0", size=16 * MIB)
    fe = start_frontend(sockets, foreign=False, extra=["--poll-us", "500"])
    dom = hypervisor.create_domain("poll", memory_mib=64, vcpus=1, virtio=LINE)
    fe.wait_log("serving virtio blk")
    assert "polling: spinning up to 500 µs" in fe.log()
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    data = os.urandom(128 * 1024)
    blk.write(0, data)
    assert blk.read(0, len(data) // 512) == data
    res = xvf_status(status_socket_of(hypervisor.run_dir), "--json")
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["poll_us"] == 500
    # The driver's register accesses follow each other closely (status, queue set-up,
    # kicks, interrupt acknowledgements): some land within a spin.
    assert answer["polled_requests"] > 0
    assert answer["polled_requests"] <= answer["guests"][0]["requests"]
    table = xvf_status(status_socket_of(hypervisor.run_dir))
    assert "polling 500 µs before each sleep" in table.stdout
    blk.close()
    assert "ERROR" not in fe.log()
