"""`xvf check`: on this host (no Xen) and against the software Xen."""

from __future__ import annotations

import errno
import json
import os
import socket

import pytest

from tests.conftest import needs_qsd
from xvf.app import doctor
from xvf.app.cli import main
from xvf.errors import HypercallError
from xvf.hotpath._privcmd import DOMID_INVALID
from xvf.protocols.xenstore import XenStore

BLK = "type=virtio,device2, transport=mmio, grant_usage=1"
UNKNOWN = "type=virtio,device99, transport=mmio, grant_usage=1"
I2C_NO_GRANTS = "type=virtio,device22, transport=mmio, grant_usage=0"
FS = "type=virtio,device1a, transport=mmio, grant_usage=1"


def virtio(*devices: str) -> str:
    return "virtio = [ " + ", ".join(f'"{d}"' for d in devices) + " ]"


def check_json(capsys, *argv: str) -> tuple[int, dict[str, dict]]:
    rc = main(["check", "--json", *argv])
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is (rc == 0)
    return rc, {f["name"]: f for f in doc["findings"]}


@pytest.mark.skipif(os.path.exists("/sys/hypervisor/type"), reason="this host may be Xen")
def test_not_under_xen_says_so_with_the_fix_and_fails(capsys):
    rc = main(["check"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "not running under Xen" in out
    assert "fix: boot the machine through the Xen hypervisor" in out
    assert "What the DomU kernel needs" in out and "CONFIG_XEN_VIRTIO" in out


def test_under_xen_reads_type_and_version(tmp_path):
    (tmp_path / "version").mkdir()
    (tmp_path / "type").write_text("xen\n")
    for name, value in (("major", "4"), ("minor", "20"), ("extra", ".4")):
        (tmp_path / "version" / name).write_text(value + "\n")
    assert doctor.check_under_xen(str(tmp_path)).ok is True
    found = doctor.check_xen_version(str(tmp_path))
    assert found.ok is True and found.detail == "Xen 4.20.4"
    (tmp_path / "version" / "minor").write_text("17\n")
    assert doctor.check_xen_version(str(tmp_path)).ok is False


def test_dom0_capabilities(tmp_path):
    assert doctor.check_dom0(str(tmp_path)).ok is False  # xenfs not mounted
    assert "mount -t xenfs" in doctor.check_dom0(str(tmp_path)).fix
    (tmp_path / "capabilities").write_text("control_d\n")
    assert doctor.check_dom0(str(tmp_path)).ok is True
    (tmp_path / "capabilities").write_text("\n")
    assert "DomU" in doctor.check_dom0(str(tmp_path)).detail


def fake_dm_op(answers: dict[int, int]):
    def dm_op(domid: int, op: bytes) -> bytes:
        raise HypercallError("dm_op", answers[domid])

    return dm_op


def test_ioreq_probe_errnos():
    """ESRCH (no such domain) / ENOENT (no such server): the dm_op code is there;
    ENOSYS: Xen has no dm_op hypercall (built without CONFIG_IOREQ_SERVER)."""
    with_ioreq = fake_dm_op({DOMID_INVALID: errno.ESRCH, 3: errno.ENOENT})
    assert doctor.probe_ioreq(with_ioreq, None)[0] is True
    present, detail = doctor.probe_ioreq(with_ioreq, 3)
    assert present is True and "ESRCH" in detail and "ENOENT" in detail
    without = fake_dm_op({DOMID_INVALID: errno.ENOSYS})
    found = doctor.check_ioreq(without, 3, use_hypfs=False)
    assert found.ok is False and "CONFIG_IOREQ_SERVER" in found.fix
    odd = fake_dm_op({DOMID_INVALID: errno.EPERM})
    assert doctor.check_ioreq(odd, None, use_hypfs=False).ok is None


def test_grant_usage_against_the_mapping():
    assert doctor.check_grant_usage("d", True, "grant").ok is True
    assert doctor.check_grant_usage("d", False, "foreign").ok is True
    assert doctor.check_grant_usage("d", False, "per-device").ok is True
    bad = doctor.check_grant_usage("d", False, "grant")
    assert bad.ok is False and "grant_usage=1" in bad.fix and "--mapping foreign" in bad.fix
    bad = doctor.check_grant_usage("d", True, "foreign")
    assert bad.ok is False and "grant_usage=0" in bad.fix


def test_sim_guest_devices_unknown_missing_and_mismatched(hypervisor, sockets, capsys):
    dom = hypervisor.create_domain("g1", virtio=virtio(BLK, UNKNOWN, I2C_NO_GRANTS))
    sim = ["--sim", hypervisor.run_dir, "--socket-path", sockets]
    rc, f = check_json(capsys, *sim)
    assert rc == 1
    label = f"dom{dom.domid} (g1) virtio"
    assert f["IOREQ servers"]["ok"] is True and "ENOENT" in f["IOREQ servers"]["detail"]
    assert f["xenstored"]["ok"] is True
    assert f[f"{label} 0 type"]["ok"] is True
    missing = f[f"{label} 0 backend"]
    assert missing["ok"] is False and missing["detail"].endswith("blk.sock0 is missing")
    assert f[f"{label} 0 grant_usage"]["ok"] is True
    assert f[f"{label} 0 state"]["ok"] is None  # no xvf: not failing
    assert f[f"{label} 1 type"]["ok"] is False
    assert "not supported" in f[f"{label} 1 type"]["detail"]
    assert f[f"{label} 2 grant_usage"]["ok"] is False
    assert f[f"{label} 2 backend"]["detail"].endswith("i2c.sock0 is missing")
    # per-device mapping takes grant_usage=0 as foreign
    _, f = check_json(capsys, *sim, "--mapping", "per-device")
    assert f[f"{label} 2 grant_usage"]["ok"] is True
    # the table says the same
    assert main(["check", *sim]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "fix: start the blk backend listening on" in out


@needs_qsd
def test_sim_backend_present_and_answering(hypervisor, sockets, start_blk_backend, capsys):
    start_blk_backend(sockets, "blk.sock0")
    dom = hypervisor.create_domain("g2", virtio=virtio(BLK))
    rc, f = check_json(capsys, "--sim", hypervisor.run_dir, "--socket-path", sockets)
    backend = f[f"dom{dom.domid} (g2) virtio 0 backend"]
    assert backend["ok"] is True and "answered GET_FEATURES" in backend["detail"], backend
    assert rc == 0, f
    # the probe closed its connection: the backend answers a second time
    assert doctor.probe_backend(os.path.join(sockets, "blk.sock0"))[0] is True


def test_sim_backend_that_does_not_answer(hypervisor, sockets, capsys):
    hypervisor.create_domain("g3", virtio=virtio(BLK))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(sockets, "blk.sock0"))
    listener.listen(1)  # accepts into the backlog, never answers
    try:
        found = doctor.check_socket("d", os.path.join(sockets, "blk.sock0"), "blk", None)
    finally:
        listener.close()
    assert found.ok is False and "does not answer" in found.detail


def test_served_and_one_shot_backends_are_not_probed(hypervisor, sockets, capsys):
    dom = hypervisor.create_domain("g4", virtio=virtio(BLK, FS))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(sockets, "fs.sock0"))
    listener.listen(1)
    with XenStore(hypervisor.xenstore_path) as xs:
        xs.write(f"/local/domain/0/backend/virtio/{dom.domid}/0/state", "4")
    try:
        rc, f = check_json(capsys, "--sim", hypervisor.run_dir, "--socket-path", sockets)
    finally:
        listener.close()
    label = f"dom{dom.domid} (g4) virtio"
    assert f[f"{label} 0 backend"]["ok"] is True
    assert "served by xvf now (not probed)" in f[f"{label} 0 backend"]["detail"]
    assert f[f"{label} 0 state"]["ok"] is True
    assert "virtiofsd serves one connection" in f[f"{label} 1 backend"]["detail"]
    assert rc == 0, f


def test_refused_device_fails(hypervisor, sockets, capsys):
    dom = hypervisor.create_domain("g5", virtio=virtio(BLK))
    with XenStore(hypervisor.xenstore_path) as xs:
        xs.write(f"/local/domain/0/backend/virtio/{dom.domid}/0/state", "6")
    rc, f = check_json(capsys, "--sim", hypervisor.run_dir)
    assert rc == 1
    state = f[f"dom{dom.domid} (g5) virtio 0 state"]
    assert state["ok"] is False and "xvf's log" in state["fix"]
    assert f[f"dom{dom.domid} (g5) virtio 0 backend"]["ok"] is None  # no --socket-path


def test_no_software_xen(tmp_path, capsys):
    rc, f = check_json(capsys, "--sim", str(tmp_path))
    assert rc == 1 and f["software Xen"]["ok"] is False
