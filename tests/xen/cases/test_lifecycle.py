"""Life cycle on real Xen: two guests at once, `xl destroy` with I/O in flight and the guest
made again, xvf stopped with SIGTERM while a guest runs, a backend killed and restarted."""

from __future__ import annotations

import signal
import time

from tests.xen.cases.dom0 import Guest, result, run, start_qsd, start_xvf, wait_until
from tests.xen.cases.test_blk import BLK, MIB, make_image
from tests.xen.rig.domu import pattern, virtio_device


def blk_guest(name: str, results, seed: str, nbytes: int = 128 * 1024, **plan) -> Guest:
    return Guest(
        name,
        [virtio_device(BLK, grant_usage=True)],
        {"checks": "blk", "blk.seed": seed, "blk.sector": 2048, "blk.bytes": nbytes, **plan},
        results,
    )


def serve_one_disk(results, sockets, procs, size: int = 64 * MIB):
    """A disk image behind qemu-storage-daemon at blk.sock0, and xvf (grant mode)."""
    image = results / "disk.img"
    make_image(image, size, b"")
    procs.append(start_qsd(results, sockets / "blk.sock0", image))
    xvf = start_xvf(results, sockets)
    procs.append(xvf)
    return image, xvf


def wait_check_started(guest: Guest) -> None:
    """Until the guest has listed its devices (its checks run next), then 2 s into them."""
    wait_until(
        f"{guest.name} to start its checks",
        lambda: "XVF-GUEST: virtio" in guest.console_text(),
        120,
    )
    time.sleep(2)


def on_image(image, seed: str, nbytes: int, sector: int = 2048) -> bool:
    with open(image, "rb") as f:
        f.seek(sector * 512)
        return f.read(nbytes) == pattern(seed, nbytes)


def test_two_guests_at_once(results, sockets, procs, guests):
    images = [results / "a.img", results / "b.img"]
    for i, image in enumerate(images):
        make_image(image, 32 * MIB, b"")
        procs.append(start_qsd(results, sockets / f"blk.sock{i}", image, name=f"qsd{i}"))
    xvf = start_xvf(results, sockets)
    procs.append(xvf)
    pair = [blk_guest(f"two-{c}", results, f"two{c}") for c in "ab"]
    guests.extend(pair)
    for guest in pair:
        guest.wait_served()
    for guest in pair:
        guest.unpause()
    for guest in pair:
        result(guest.wait_done(), "blk")
    # each guest got a disk of its own: every image holds exactly one guest's data
    for image in images:
        assert [on_image(image, seed, 128 * 1024) for seed in ("twoa", "twob")].count(True) == 1
    assert xvf.alive()


def test_destroy_with_io_in_flight_then_create_again(results, sockets, procs, guests):
    image, xvf = serve_one_disk(results, sockets, procs)
    victim = blk_guest("victim", results, "victim", nbytes=32 * MIB, **{"blk.timeout": 600})
    guests.append(victim)
    victim.run_when_served()
    wait_check_started(victim)
    assert "XVF-GUEST: blk" not in victim.console_text()  # its 32 MiB are still going
    t0 = time.monotonic()
    run("xl", "destroy", "victim", timeout=120)
    destroy_s = time.monotonic() - t0
    (results / "destroy_seconds").write_text(f"{destroy_s:.2f}\n")
    victim.destroyed = True
    xvf.wait_log("stopping", timeout=60)
    # libxl waits up to 10 s per device for the backend to reach Closed: xvf answers
    assert "the toolstack closes it (xenstore state Closing)" in xvf.log()
    again = blk_guest("victim2", results, "again")
    guests.append(again)
    again.run_when_served()
    result(again.wait_done(), "blk")
    assert on_image(image, "again", 128 * 1024)
    assert xvf.alive()


def test_sigterm_while_a_guest_runs_leaves_no_vcpu_blocked(results, sockets, procs, guests):
    _, xvf = serve_one_disk(results, sockets, procs)
    guest = blk_guest("term", results, "term", nbytes=32 * MIB, **{"blk.timeout": 25})
    guests.append(guest)
    guest.run_when_served()
    wait_check_started(guest)
    assert xvf.stop(signal.SIGTERM) == 0
    assert "xvf stopped" in xvf.log()
    assert set(guest.backend_states().values()) == {"6"}  # xenstore: no longer served
    # xvf disabled its server and answered what was waiting. The guest (one vCPU) runs
    # on: its check times out and it prints its report, which a vCPU stuck on an
    # unanswered ioreq could never do.
    report = guest.wait_done(timeout=180)
    assert report.done is not None, report
    ok, values = report.results["blk"]
    assert ok or values.get("reason") == "timeout", values
    t0 = time.monotonic()
    guest.destroy()
    (results / "destroy_seconds").write_text(f"{time.monotonic() - t0:.2f}\n")
    assert not guest.exists()


def test_sigkill_mid_io_then_a_new_xvf_takes_over(results, sockets, procs, guests):
    """xvf killed with SIGKILL while a guest writes: its IOREQ server stays in Xen (it is
    Dom0's, not the process's), enabled, and a vCPU may wait on it. The next xvf serves the
    window on a server of its own, answers what waits on the old one and destroys it (its
    xenstore record says which it is); the guest finishes its report, the next is served."""
    image, xvf = serve_one_disk(results, sockets, procs)
    guest = blk_guest("kill", results, "kill", nbytes=32 * MIB, **{"blk.timeout": 25})
    guests.append(guest)
    guest.run_when_served()
    wait_check_started(guest)
    xvf.stop(signal.SIGKILL)
    again = start_xvf(results, sockets, name="xvf-again")
    procs.append(again)
    again.wait_log("left by an earlier xvf", timeout=90)
    report = guest.wait_done(timeout=180)  # no vCPU left waiting on the dead server
    assert report.done is not None, report
    guest.destroy()
    second = blk_guest("kill2", results, "second")
    guests.append(second)
    second.run_when_served()
    result(second.wait_done(), "blk")
    assert on_image(image, "second", 128 * 1024)
    assert again.alive()
    assert "Traceback" not in again.log()


def test_backend_killed_and_restarted(results, sockets, procs, guests):
    """qemu-storage-daemon dies under a running guest: xvf marks the device
    DEVICE_NEEDS_RESET, keeps serving, reconnects when the backend is back, and the next
    guest's I/O works."""
    image = results / "disk.img"
    make_image(image, 64 * MIB, b"")
    qsd = start_qsd(results, sockets / "blk.sock0", image)
    xvf = start_xvf(results, sockets)
    procs.append(xvf)
    first = blk_guest("bk1", results, "first", nbytes=32 * MIB, **{"blk.timeout": 60})
    guests.append(first)
    first.run_when_served()
    wait_check_started(first)
    qsd.stop(signal.SIGKILL)
    xvf.wait_log("closed the connection", timeout=60)
    xvf.wait_log("DEVICE_NEEDS_RESET", timeout=60)
    qsd = start_qsd(results, sockets / "blk.sock0", image, name="qsd-again")
    procs.append(qsd)
    xvf.wait_log("reconnected to backend", timeout=60)
    first.wait_done(timeout=180)  # its check fails or finishes; the guest does not hang
    first.destroy()
    second = blk_guest("bk2", results, "second")
    guests.append(second)
    second.run_when_served()
    result(second.wait_done(), "blk")
    assert on_image(image, "second", 128 * 1024)
    assert xvf.alive()
