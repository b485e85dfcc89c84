"""--mapping per-device on real Xen: one xvf serves a grant guest and a foreign guest, each
device's own grant_usage deciding how its backend reaches the guest's memory."""

from __future__ import annotations

from tests.xen.cases.dom0 import Guest, Process, result, start_qsd, start_ref_backend, wait_until
from tests.xen.cases.test_blk import BLK, MIB, make_image
from tests.xen.cases.test_i2c_gpio import I2C
from tests.xen.rig.domu import pattern, virtio_device


def test_per_device_mapping_serves_a_grant_and_a_foreign_guest(results, sockets, procs, guests):
    image = results / "disk.img"
    make_image(image, 16 * MIB, b"")
    procs.append(start_qsd(results, sockets / "blk.sock0", image))
    procs.append(start_ref_backend(results, "i2c", sockets / "i2c.sock0", "--require-xen-mmap"))
    argv = ["xen-vhost-frontend", "--socket-path", str(sockets), "--mapping", "per-device"]
    xvf = Process("xvf", [*argv, "--log-level", "debug"], results)
    procs.append(xvf)
    xvf.wait_log("xvf serving (xen platform, per-device mapping", timeout=60)
    granted = Guest(
        "pd-grant",
        [virtio_device(BLK, grant_usage=True)],
        {"checks": "blk", "blk.seed": "perdev", "blk.bytes": 65536},
        results,
    )
    guests.append(granted)
    plain = Guest("pd-foreign", [virtio_device(I2C, grant_usage=False)], {"checks": "i2c"}, results)
    guests.append(plain)
    for guest in (granted, plain):
        guest.run_when_served()
    result(granted.wait_done(), "blk")
    result(plain.wait_done(), "i2c")
    with open(image, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(65536) == pattern("perdev", 65536)
    log = xvf.log()
    assert f"dom{granted.domid}/blk0: serving virtio blk" in log and "(grant mapping)" in log
    assert f"dom{plain.domid}/i2c0: serving virtio i2c" in log and "(foreign mapping)" in log
    wait_until("xvf to still run", xvf.alive, 1)
