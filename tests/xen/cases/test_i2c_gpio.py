"""virtio-i2c (an RTC read like hwclock) and virtio-gpio on real Xen, served by the in-tree
reference backends, which map the guest's real memory themselves (XEN_MMAP): foreign regions
through privcmd, grant regions through gntdev. With and without the Dom0 kernel's privcmd
ioeventfd/irqfd offload."""

from __future__ import annotations

import re
import time

import pytest

from tests.xen.cases.dom0 import Guest, result, start_ref_backend, start_xvf
from tests.xen.rig.domu import virtio_device

I2C, GPIO = 34, 41  # virtio device ids


@pytest.mark.parametrize(
    "foreign,ioreq_only",
    [(False, False), (False, True), (True, False), (True, True)],
    ids=["grant-offload", "grant-ioreq-only", "foreign-offload", "foreign-ioreq-only"],
)
def test_rtc_over_i2c_and_gpio_lines(results, sockets, procs, guests, foreign, ioreq_only):
    procs.append(start_ref_backend(results, "i2c", sockets / "i2c.sock0", "--require-xen-mmap"))
    procs.append(start_ref_backend(results, "gpio", sockets / "gpio.sock0", "--require-xen-mmap"))
    xvf = start_xvf(results, sockets, foreign=foreign, ioreq_only=ioreq_only)
    procs.append(xvf)
    name = f"i2cgpio-{'f' if foreign else 'g'}{'-io' if ioreq_only else ''}"
    guest = Guest(
        name,
        [virtio_device(I2C, grant_usage=not foreign), virtio_device(GPIO, grant_usage=not foreign)],
        {"checks": "i2c,gpio", "gpio.line": 1},
        results,
    )
    guests.append(guest)
    guest.run_when_served()
    report = guest.wait_done()
    i2c = result(report, "i2c")
    # The RTC is the backend's clock (Dom0's), read by the guest over virtio-i2c.
    assert abs(int(i2c["rtc_epoch"]) - time.time()) < 600, i2c
    gpio = result(report, "gpio")
    assert gpio["read"] == "1,0", gpio  # what the guest wrote came back from the backend
    for dev in report.virtio:
        assert dev["grant_dma"] == ("0" if foreign else "1"), dev
    log = xvf.log()
    kind = "foreign" if foreign else "grant"
    assert f"guest memory for the backend: {kind} regions (Xen mmap), mapped by the backend" in log
    # The backends map the rings themselves in both modes: the kernel may carry
    # their kicks and interrupts in grant mode too.
    if not ioreq_only:
        assert "QueueNotify handled by the kernel (privcmd ioeventfd)" in log
        assert "interrupts injected by the kernel (privcmd irqfd)" in log
    else:
        assert "QueueNotify handled by xvf (ioreq service loop)" in log
    # The guest's service thread woke on its loopback event channel (a port of Dom0's
    # bound to itself on the thread's /dev/xen/evtchn handle)...
    assert re.search(r"loopback event channel \d+ <- \d+ wakes the service thread", log), log
    # ...and, its guest gone, stopped: with offload nothing but the event channel is
    # watched, so it waited in a read of the channel and only that loopback woke it.
    xvf.wait_log("service thread stopped after", timeout=120)
    stopped = re.search(r"service thread stopped after (\d+) wake-ups, (\d+) of them reads",
                        xvf.log())  # fmt: skip
    assert stopped, xvf.log()
    wakeups, reads = int(stopped[1]), int(stopped[2])
    (results / f"{name}.waits").write_text(f"wakeups={wakeups} channel_reads={reads}\n")
    if not ioreq_only:
        assert reads > wakeups // 2, (wakeups, reads)
    assert xvf.alive()


def test_foreign_mapping_of_a_guest_bigger_than_one_batch(results, sockets, procs, guests):
    """A 384 MiB guest foreign-mapped in one MMAPBATCH: privcmd refuses a first batch that
    does not cover the whole mapping, so xvf's old 256 MiB batches failed for it. (xl on
    Arm cannot make a guest whose maxmem exceeds memory: no populate-on-demand there, the
    build fails with 'can't allocate low memory', seen on this rig.)"""
    procs.append(start_ref_backend(results, "i2c", sockets / "i2c.sock0", "--require-xen-mmap"))
    xvf = start_xvf(results, sockets, foreign=True)
    procs.append(xvf)
    guest = Guest(
        "i2c-bigmem",
        [virtio_device(I2C, grant_usage=False)],
        {"checks": "i2c"},
        results,
        memory_mb=384,
    )
    guests.append(guest)
    guest.run_when_served()
    i2c = result(guest.wait_done(), "i2c")
    assert abs(int(i2c["rtc_epoch"]) - time.time()) < 600, i2c
    assert "384 MiB of RAM foreign-mapped in 1 bank(s)" in xvf.log()


def test_backends_get_a_privcmd_fd_restricted_to_their_guest(results, sockets, procs, guests):
    """The fd a FOREIGN region carries (what a backend maps the guest through) is a
    privcmd fd restricted to that guest: it maps the guest's RAM, and nothing of any
    other domain (EPERM, the kernel's answer for a restricted fd), while xvf's own fd
    reaches every domain."""
    import errno
    from pathlib import Path

    from xvf.errors import HypercallError
    from xvf.hotpath._layout import GUEST_RAM0_BASE, PAGE_SIZE
    from xvf.platform.xen.platform import XenPlatform

    procs.append(start_ref_backend(results, "i2c", sockets / "i2c.sock0", "--require-xen-mmap"))
    xvf = start_xvf(results, sockets, foreign=True)
    procs.append(xvf)
    guest = Guest("i2c-restrict", [virtio_device(I2C, grant_usage=False)], {"checks": "i2c"},
                  results)  # fmt: skip
    guests.append(guest)
    guest.wait_served()
    platform = XenPlatform()
    try:
        memory = platform.map_guest_memory(guest.domid)
        try:
            fds = {r.fd for r in memory.xen_regions()}
            assert fds == {memory.backend.fd} and memory.backend.fd != platform.privcmd.fd
            page, size = memory.backend.map_foreign(guest.domid, GUEST_RAM0_BASE, PAGE_SIZE)
            assert size == PAGE_SIZE
            page.close()
            with pytest.raises(HypercallError) as refused:
                memory.backend.map_foreign(0, GUEST_RAM0_BASE, PAGE_SIZE)
            assert refused.value.errno == errno.EPERM, refused.value
            (Path(results) / "restricted-privcmd.txt").write_text(str(refused.value) + "\n")
        finally:
            memory.close()
    finally:
        platform.close()
    guest.unpause()
    i2c = result(guest.wait_done(), "i2c")  # the backend maps it through that fd
    assert abs(int(i2c["rtc_epoch"]) - time.time()) < 600, i2c
