"""virtio-fs on real Xen with Debian 13's virtiofsd (Rust) in Dom0, through xvf's grant relay."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.xen.cases.dom0 import Guest, Process, result, start_xvf, wait_socket
from tests.xen.rig.domu import pattern, sha256, virtio_device

FS = 26  # virtio device id (libxl: virtio,device1a)
VIRTIOFSD = next(
    (p for p in ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd") if os.path.exists(p)), None
)


@pytest.mark.skipif(VIRTIOFSD is None, reason="no virtiofsd in this Dom0")
def test_fs_read_and_write_a_shared_directory(results, sockets, procs, guests):
    share = results / "share"
    share.mkdir()
    payload = pattern("dom0file", 100_000)
    (share / "from-dom0.bin").write_bytes(payload)
    help_text = subprocess.run([VIRTIOFSD, "--help"], capture_output=True, text=True).stdout
    argv = [VIRTIOFSD, f"--socket-path={sockets / 'fs.sock0'}", f"--shared-dir={share}"]
    argv += ["--sandbox=none"] if "--sandbox" in help_text else []
    # The tag the guest mounts: virtiofsd serves it in config space where it can.
    argv += ["--tag=xvf"] if "--tag" in help_text else []
    fsd = Process("virtiofsd", argv, results)
    procs.append(fsd)
    wait_socket(sockets / "fs.sock0", fsd)
    xvf = start_xvf(results, sockets)
    procs.append(xvf)
    guest = Guest(
        "fs-grant",
        [virtio_device(FS, grant_usage=True)],
        {
            "checks": "fs",
            "fs.tag": "xvf",
            "fs.read": "from-dom0.bin",
            "fs.read.sha256": sha256(payload),
            "fs.write": "from-guest.bin",
            "fs.write.seed": "guestfile",
            "fs.write.bytes": 65536,
        },
        results,
    )
    guests.append(guest)
    guest.run_when_served()
    report = guest.wait_done()
    result(report, "fs")
    assert (share / "from-guest.bin").read_bytes() == pattern("guestfile", 65536)
    assert xvf.alive()
