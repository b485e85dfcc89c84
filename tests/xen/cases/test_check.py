"""`xen-vhost-frontend check` in the real Dom0: the IOREQ probe, the devices, the backend probe."""

from __future__ import annotations

import json

from tests.xen.cases.dom0 import Guest, run, start_qsd
from tests.xen.rig.domu import virtio_device

BLK = 2  # virtio device id


def test_check_reports_ioreq_support_and_a_paused_guests_device(results, sockets, procs, guests):
    """A guest created paused with one blk device, qemu-storage-daemon listening, no xvf:
    everything needed is there (exit 0), the device is listed, its backend answers."""
    image = results / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    procs.append(start_qsd(results, sockets / "blk.sock0", image))
    guest = Guest("check", [virtio_device(BLK, grant_usage=True)], {"checks": "blk"}, results)
    guests.append(guest)
    argv = ["xen-vhost-frontend", "check", "--socket-path", str(sockets)]
    table = run(*argv, check=False)
    (results / "check.txt").write_text(table.stdout + table.stderr)
    done = run(*argv, "--json", check=False)
    (results / "check.json").write_text(done.stdout + done.stderr)
    assert table.returncode == 0, table.stdout + table.stderr
    assert done.returncode == 0, done.stdout
    doc = json.loads(done.stdout)
    by_name = {f["name"]: f for f in doc["findings"]}
    assert doc["ok"] is True
    assert by_name["running under Xen"]["ok"] is True
    assert by_name["Dom0"]["ok"] is True
    ioreq = by_name["IOREQ servers"]
    assert ioreq["ok"] is True, ioreq
    assert "ESRCH" in ioreq["detail"] and "ENOENT" in ioreq["detail"], ioreq
    for dev in ("privcmd", "evtchn", "gntdev"):
        assert by_name[f"/dev/xen/{dev}"]["ok"] is True
    label = f"dom{guest.domid} (check) virtio 0"
    assert by_name[f"{label} type"]["ok"] is True
    backend = by_name[f"{label} backend"]
    assert backend["ok"] is True and "answered GET_FEATURES" in backend["detail"], backend
    assert by_name[f"{label} grant_usage"]["ok"] is True
    assert by_name[f"{label} state"]["ok"] is None  # no xvf: not served yet
    assert "IOREQ servers" in table.stdout and label in table.stdout
    # the probe used and closed one connection: qemu-storage-daemon is still there
    assert procs[0].alive()
