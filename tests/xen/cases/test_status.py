"""`xen-vhost-frontend status` in the real Dom0: it asks the case's running xvf what it
serves (a Linux DomU doing block I/O through the grant relay to qemu-storage-daemon)."""

from __future__ import annotations

import json
import os
import stat

from tests.xen.cases.dom0 import Guest, result, run, start_qsd, start_xvf, wait_until
from tests.xen.cases.test_blk import BLK, MIB, make_image
from tests.xen.rig.domu import virtio_device

STATUS_SOCKET = "/run/xvf/status.sock"  # the default: start_xvf gives no --status-socket


def status() -> dict:
    return json.loads(run("xen-vhost-frontend", "status", "--json").stdout)


def test_status_lists_the_guest_and_its_device(results, sockets, procs, guests):
    image = results / "disk.img"
    make_image(image, 32 * MIB, b"")
    procs.append(start_qsd(results, sockets / "blk.sock0", image))
    xvf = start_xvf(results, sockets)
    procs.append(xvf)
    assert stat.S_IMODE(os.stat(STATUS_SOCKET).st_mode) == 0o600
    assert status()["guests"] == []
    guest = Guest(
        "status",
        [virtio_device(BLK, grant_usage=True)],
        # poweroff=0: the guest stays up after its checks, so its device is still served
        {"checks": "blk", "blk.seed": "status", "blk.bytes": 256 * 1024, "poweroff": 0},
        results,
    )
    guests.append(guest)
    guest.run_when_served()
    result(guest.wait_done(), "blk")

    answer = status()
    (results / "status.json").write_text(json.dumps(answer, indent=2))
    (g,) = answer["guests"]
    assert g["domid"] == guest.domid and g["vcpus"] >= 1 and g["requests"] > 0
    # Xen on Arm broadcasts mapcache invalidations (IOREQ_TYPE_INVALIDATE) when the
    # guest's p2m drops RAM pages; they are answered and counted, not "bad"
    assert g["bad_requests"] == 0, g
    (results / "invalidates").write_text(f"{g['invalidates']}\n")
    (dev,) = g["devices"]
    assert dev["label"] == f"dom{guest.domid}/blk0"
    assert dev["mapping"] == "grant" and dev["memory"] == "relay"
    assert dev["backend"] == "connected" and dev["xenstore_state"] == 4
    assert dev["backend_socket"] == str(sockets / "blk.sock0")
    c = dev["counters"]
    assert c["exits"] > 0 and c["notifies"] > 0 and c["interrupts"] > 0
    assert c["relay_requests"] > 0 and c["relay_bytes"] >= 256 * 1024
    assert c["bad_requests"] == 0 and c["reconnects"] == 0

    table = run("xen-vhost-frontend", "status").stdout
    (results / "status.txt").write_text(table)
    assert f"dom{guest.domid}/blk0" in table and "connected" in table

    guest.destroy()
    wait_until("xvf to drop the destroyed guest", lambda: status()["guests"] == [], 60)
    assert xvf.alive()


def test_a_polling_xvf_serves_a_linux_guest_and_its_spins_find_ioreqs(
    results, sockets, procs, guests
):
    """--poll-us on real Xen: the spin reads the slots Xen writes, serves what it finds
    before the event is read, keeps those ports masked while it spins and unmasks them
    before sleeping (a lost event would hang the guest's vCPU here)."""
    image = results / "disk.img"
    make_image(image, 32 * MIB, b"")
    procs.append(start_qsd(results, sockets / "blk.sock0", image))
    xvf = start_xvf(results, sockets, extra=("--poll-us", "200"))
    procs.append(xvf)
    assert "polling: spinning up to 200 µs" in xvf.log()
    guest = Guest(
        "polling",
        [virtio_device(BLK, grant_usage=True)],
        {"checks": "blk", "blk.seed": "polling", "blk.bytes": 256 * 1024, "poweroff": 0},
        results,
    )
    guests.append(guest)
    guest.run_when_served()
    values = result(guest.wait_done(), "blk")
    assert values["match"] == "1"
    answer = status()
    (results / "status.json").write_text(json.dumps(answer, indent=2))
    (g,) = answer["guests"]
    assert answer["poll_us"] == 200
    (results / "polled").write_text(
        f"polled={answer['polled_requests']} requests={g['requests']} "
        f"idle_spins={answer['idle_spins']}\n"
    )
    assert 0 < answer["polled_requests"] <= g["requests"], answer
    assert answer["idle_spins"] > 0  # and it slept in between: the default path still runs
    guest.destroy()
    wait_until("xvf to drop the destroyed guest", lambda: status()["guests"] == [], 60)
    assert xvf.alive()
