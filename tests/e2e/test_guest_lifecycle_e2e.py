"""Guests that reset their devices, die mid-I/O, or come back with the same domain id."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from tests.conftest import needs_qsd
from xvf.platform.sim.drivers.blk import VirtioBlk
from xvf.platform.sim.guest import attach, backend_state_path, wait_served
from xvf.protocols import virtio as R

pytestmark = [pytest.mark.e2e, needs_qsd]

MIB = 1 << 20
ONE_BLK = 'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=0" ]'


def test_reset_and_renegotiate_fewer_features(
    hypervisor, sockets, start_frontend, start_blk_backend
):
    _, image = start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    fe = start_frontend(sockets, foreign=True)
    dom = hypervisor.create_domain("reprobe", memory_mib=32, virtio=ONE_BLK)
    fe.wait_log("serving virtio blk")
    first = VirtioBlk(attach(dom, 0), event_idx=True)
    first.start()
    assert first.dev.has_feature(R.F_EVENT_IDX)
    first.write(0, b"\x11" * 8192)
    first.dev.reset()  # status 0, like a driver unbind
    assert first.dev.status == 0
    second = VirtioBlk(attach(dom, 0), event_idx=False, queue_size=64)
    second.start()
    assert not second.dev.has_feature(R.F_EVENT_IDX)
    data = random.Random(1).randbytes(64 * 1024)
    second.write(16, data)
    second.flush()
    with open(image, "rb") as f:
        disk = f.read(16 * 512 + len(data))
    assert disk[:8192] == b"\x11" * 8192
    assert disk[16 * 512 :] == data
    second.close()


def test_guest_destroyed_mid_io_and_same_domid_recreated(
    hypervisor, sockets, start_frontend, start_blk_backend
):
    _, image = start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    start_blk_backend(sockets, "blk.sock1", size=8 * MIB)
    fe = start_frontend(sockets, foreign=True)
    victim = hypervisor.create_domain("victim", memory_mib=32, virtio=ONE_BLK, domid=7)
    fe.wait_log("dom7/blk0: serving")
    bystander = hypervisor.create_domain("bystander", memory_mib=32, virtio=ONE_BLK)
    fe.wait_log("blk.sock1")
    other = VirtioBlk(attach(bystander, 0))
    other.start()

    blk = VirtioBlk(attach(victim, 0))
    blk.start()
    stop = threading.Event()
    failures: list[BaseException] = []

    def stream() -> None:
        i = 0
        while not stop.is_set():
            try:
                blk.write((i % 64) * 8, b"\x42" * 4096)
            except BaseException as exc:
                failures.append(exc)
                return
            i += 1

    writer = threading.Thread(target=stream)
    writer.start()
    while not blk.dev.queues[0].in_flight() and writer.is_alive():
        pass
    hypervisor.destroy_domain(7)  # xl destroy, I/O in flight
    stop.set()
    writer.join(timeout=30)
    assert not writer.is_alive()
    fe.wait_log("dom7/blk0: stopping")

    # the other guest never noticed
    other.write(0, b"\x99" * 4096)
    assert other.read(0, 8) == b"\x99" * 4096

    # a new guest with the same domain id gets a fresh device on the same backend
    again = hypervisor.create_domain("victim-again", memory_mib=32, virtio=ONE_BLK, domid=7)
    fe.wait_log("dom7/blk0: serving virtio blk", count=2)
    fresh = VirtioBlk(attach(again, 0))
    fresh.start()
    fresh.write(128, b"\x77" * 4096)
    fresh.flush()
    with open(image, "rb") as f:
        f.seek(128 * 512)
        assert f.read(4096) == b"\x77" * 4096
    assert fe.proc.poll() is None
    assert "Traceback" not in fe.log(), fe.log()
    fresh.close()
    other.close()


def _backend_state(hypervisor, dom, index: int) -> str | None:
    from xvf.protocols.xenstore import XenStore

    with XenStore(hypervisor.xenstore_path) as xs:
        return xs.read(backend_state_path(dom, index))


def _wait_state(hypervisor, dom, index: int, want: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (state := _backend_state(hypervisor, dom, index)) != want:
        assert time.monotonic() < deadline, f"device {index} state {state!r}, never {want!r}"
        time.sleep(0.02)


def test_xenstore_state_says_served_refused_and_closed(
    hypervisor, sockets, start_frontend, start_blk_backend
):
    """xvf publishes each device's backend `state` (4 served, 6 not served) and answers
    the toolstack's Closing (5) with Closed (6), which `xl destroy` waits for."""
    start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    fe = start_frontend(sockets, foreign=True)
    line = (
        'virtio = [ "type=virtio,device2, transport=mmio, grant_usage=0",'
        ' "type=virtio,device7e, transport=mmio, grant_usage=0" ]'
    )
    dom = hypervisor.create_domain("states", memory_mib=32, virtio=line)
    assert _backend_state(hypervisor, dom, 0) in ("1", "4")  # libxl writes 1
    wait_served(dom, 0)
    _wait_state(hypervisor, dom, 1, "6")  # unknown device type: refused, and said so
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    blk.write(0, b"\x5a" * 4096)
    hypervisor.destroy_domain(dom.domid)
    assert hypervisor.backends_closed[dom.domid] is True  # xvf answered Closing in time
    fe.wait_log("the toolstack closes it (xenstore state Closing)")

    again = hypervisor.create_domain("states2", memory_mib=32, virtio=ONE_BLK)
    wait_served(again, 0)
    assert fe.stop() == 0
    assert _backend_state(hypervisor, again, 0) == "6"  # xvf gone: not served
    assert "Traceback" not in fe.log(), fe.log()


def test_same_domid_recreated_between_two_rescans(
    hypervisor, sockets, start_frontend, start_blk_backend
):
    """xvf does not run while a guest is destroyed and re-created with the same domain
    id (here: stopped; in life, a busy Dom0), so it never sees the removal: only a node
    it answered Connected that reads Initialising again. The old device (IOREQ server of
    a dead domain) is torn down and the new guest served."""
    _, image = start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    fe = start_frontend(sockets, foreign=True)
    first = hypervisor.create_domain("first", memory_mib=32, virtio=ONE_BLK, domid=9)
    wait_served(first, 0)
    blk = VirtioBlk(attach(first, 0))
    blk.start()
    blk.write(0, b"\x01" * 4096)
    fe.proc.send_signal(signal.SIGSTOP)
    try:
        hypervisor.destroy_domain(9)  # gives up waiting for xvf's Closed, as libxl does
        again = hypervisor.create_domain("again", memory_mib=32, virtio=ONE_BLK, domid=9)
    finally:
        fe.proc.send_signal(signal.SIGCONT)
    fe.wait_log("the toolstack wrote it anew")
    wait_served(again, 0)
    fresh = VirtioBlk(attach(again, 0))
    fresh.start()
    fresh.write(16, b"\x02" * 4096)
    fresh.flush()
    with open(image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == b"\x02" * 4096
    assert fe.log().count("dom9/blk0: serving virtio blk") == 2
    assert "Traceback" not in fe.log()
    fresh.close()


def test_destroy_with_relay_io_in_flight_leaves_dom0_holding_nothing(
    hypervisor, sockets, start_frontend, start_blk_backend
):
    """Grant relay: xvf holds the guest's granted pages while requests are in flight.
    By the time it answers Closed (xl destroy) it must hold none of them."""
    start_blk_backend(sockets, "blk.sock0", size=8 * MIB)
    fe = start_frontend(sockets, foreign=False)
    dom = hypervisor.create_domain(
        "relayed", memory_mib=32,
        virtio='virtio = [ "type=virtio,device2, transport=mmio, grant_usage=1" ]',
    )  # fmt: skip
    blk = VirtioBlk(attach(dom, 0))
    blk.start()
    for i in range(8):  # in flight when the guest goes
        gpa = blk.ram.alloc(128 * 1024)
        blk.submit(1, i * 256, gpa, 128 * 1024)
    hypervisor.destroy_domain(dom.domid)
    assert hypervisor.backends_closed[dom.domid]
    assert hypervisor.held_at_destroy[dom.domid] == []
    assert fe.proc.poll() is None
