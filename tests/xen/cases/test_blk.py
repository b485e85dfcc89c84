"""virtio-blk on real Xen: a Linux DomU writes and reads through xvf to qemu-storage-daemon."""

from __future__ import annotations

from tests.xen.cases.dom0 import Guest, result, start_qsd, start_xvf
from tests.xen.rig.domu import pattern, sha256, virtio_device

MIB = 1 << 20
BLK = 2  # virtio device id


def make_image(path, size: int, ref: bytes, ref_sector: int = 0) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(ref_sector * 512)
        f.write(ref)


def test_blk_grant_mapping_through_the_relay(results, sockets, procs, guests):
    """Grant mode (the default) with a backend that cannot map Xen memory: xvf relays the
    ring through shadow memory, mapping the guest's grants through the real gntdev."""
    image = results / "disk.img"
    ref = pattern("dom0ref", 8192)
    make_image(image, 64 * MIB, ref, ref_sector=64)
    procs.append(start_qsd(results, sockets / "blk.sock0", image))
    xvf = start_xvf(results, sockets)
    procs.append(xvf)
    seed, sector, nbytes = "grantblk", 4096, 256 * 1024
    guest = Guest(
        "blk-grant",
        [virtio_device(BLK, grant_usage=True)],
        {
            "checks": "blk",
            "blk.seed": seed,
            "blk.sector": sector,
            "blk.bytes": nbytes,
            "blk.ref.sector": 64,
            "blk.ref.bytes": len(ref),
            "blk.ref.sha256": sha256(ref),
        },
        results,
    )
    guests.append(guest)
    guest.run_when_served()
    report = guest.wait_done()
    values = result(report, "blk")
    assert values["match"] == "1" and values["ref_match"] == "1"
    assert int(values["size_sectors"]) == 64 * MIB // 512
    (dev,) = [v for v in report.virtio if v.get("type") == "blk"]
    assert dev["grant_dma"] == "1", dev  # Linux used grant DMA (xen-grant-dma) for it
    # what the backend holds is what the guest wrote
    with open(image, "rb") as f:
        f.seek(sector * 512)
        assert f.read(nbytes) == pattern(seed, nbytes)
    assert "shadow rings relayed by xvf" in xvf.log()
    assert xvf.alive()


def test_blk_foreign_mapping_with_qsd_is_refused_and_the_guest_does_not_hang(
    results, sockets, procs, guests
):
    """qemu-storage-daemon has no XEN_MMAP, so it cannot reach a foreign-mapped guest on Xen:
    xvf refuses at the handshake, says what to do, and the guest finds no device there
    (it boots and finishes instead of hanging on its first request)."""
    image = results / "disk.img"
    make_image(image, 16 * MIB, b"")
    procs.append(start_qsd(results, sockets / "blk.sock0", image))
    xvf = start_xvf(results, sockets, foreign=True)
    procs.append(xvf)
    guest = Guest(
        "blk-foreign",
        [virtio_device(BLK, grant_usage=False)],
        {"checks": "blk", "blk.timeout": 10},
        results,
    )
    guests.append(guest)
    states = guest.wait_served(allow_refused=True)
    assert set(states.values()) == {"6"}, states
    log = xvf.log()
    assert "does not offer it" in log and "grant_usage=1" in log
    assert "now reads as 'no device'" in log
    guest.unpause()
    report = guest.wait_done()
    ok, values = report.results["blk"]
    assert not ok and values.get("reason") == "no_device", values
    assert report.done is not None  # the guest ran to the end
    assert xvf.alive()


def test_ten_devices_on_one_ioreq_server(results, sockets, procs, guests):
    """Xen allows 8 IOREQ servers per domain; libxl can give a guest 11 virtio devices.
    xvf serves all of a guest's windows on ONE server: here 10 devices, of which blk is
    served and 9 (a type xvf does not know) read as "no device"."""
    image = results / "disk.img"
    make_image(image, 16 * MIB, b"")
    procs.append(start_qsd(results, sockets / "blk.sock0", image))
    xvf = start_xvf(results, sockets)
    procs.append(xvf)
    unknown = "type=virtio,device7e, transport=mmio, grant_usage=1"
    guest = Guest(
        "ten-devices",
        [virtio_device(BLK, grant_usage=True)] + [unknown] * 9,
        {"checks": "blk", "blk.seed": "ten", "blk.bytes": 65536},
        results,
    )
    guests.append(guest)
    states = guest.wait_served(allow_refused=True)
    assert sorted(states.values()) == ["4"] + ["6"] * 9, states
    guest.unpause()
    report = guest.wait_done()
    result(report, "blk")
    assert [v["type"] for v in report.virtio] == ["blk"]  # the other nine were skipped
    servers = [
        line for line in xvf.log().splitlines() if "IOREQ server" in line and "enabled" in line
    ]
    assert len(servers) == 1, servers
