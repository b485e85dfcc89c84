"""`xvf check`: what serving virtio devices on this Dom0 needs, item by item, with the fix.

Each check is one small function returning Finding(s). A finding's `ok` is True (there),
False (missing or wrong) or None (not applicable, or cannot be told from here); `needed`
says whether a False fails the check (exit status 1) or is only reported (kernel offload).

How IOREQ server support is told (Debian's arm64 Xen is built without it):
  1. a harmless dm_op: XEN_DMOP_destroy_ioreq_server for server id 0xffff (never a
     valid id: Xen allows 8 per domain). Xen builds the dm_op hypercall only with
     CONFIG_IOREQ_SERVER (xen/include/hypercall-defs.c), so without it the hypercall
     answers ENOSYS. With it, against DOMID_INVALID the domain lookup answers ESRCH
     (xen/arch/arm/dm.c), and against a real DomU the server lookup answers ENOENT
     (xen/common/ioreq.c). Neither touches any domain or server.
  2. the hypervisor's own .config through hypfs (`xenhypfs cat /buildinfo/config`, there
     when Xen has CONFIG_HYPFS_CONFIG; xenhypfs un-gzips it), as corroboration.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from typing import Protocol

from xvf.errors import ConfigError, HypercallError, PlatformUnavailable, XvfError

SYS_HYPERVISOR = "/sys/hypervisor"
PROC_XEN = "/proc/xen"
DEV_XEN = "/dev/xen"
MIN_XEN = (4, 18)  # xl's `virtio = [...]` line and libxl's virtio nodes
UNUSED_SERVER_ID = 0xFFFF  # >= MAX_NR_IOREQ_SERVERS (8): never names a server
PROBE_TIMEOUT = 3.0
XENBUS_CONNECTED, XENBUS_CLOSED = 4, 6
# Backends that serve exactly one frontend connection and exit when it closes: a probe
# would use up their one connection, so only the socket is looked at.
ONE_SHOT_BACKENDS = {"fs": "virtiofsd"}

# DomU kernel options per device type (Linux 6.x option names).
DOMU_DRIVERS = {
    "net": "CONFIG_VIRTIO_NET",
    "blk": "CONFIG_VIRTIO_BLK",
    "console": "CONFIG_VIRTIO_CONSOLE",
    "rng": "CONFIG_HW_RANDOM_VIRTIO",
    "scsi": "CONFIG_SCSI_VIRTIO",
    "gpu": "CONFIG_DRM_VIRTIO_GPU",
    "input": "CONFIG_VIRTIO_INPUT",
    "vsock": "CONFIG_VIRTIO_VSOCKETS",
    "sound": "CONFIG_SND_VIRTIO",
    "fs": "CONFIG_VIRTIO_FS",
    "scmi": "CONFIG_ARM_SCMI_TRANSPORT_VIRTIO",
    "i2c": "CONFIG_I2C_VIRTIO",
    "gpio": "CONFIG_GPIO_VIRTIO",
    "spi": "CONFIG_SPI_VIRTIO",
}


@dataclass
class Finding:
    name: str
    ok: bool | None  # None: not applicable, or unknown from here
    detail: str
    fix: str = ""
    needed: bool = True
    section: str = "dom0"

    @property
    def fails(self) -> bool:
        return self.ok is False and self.needed

    @property
    def mark(self) -> str:
        if self.ok is True:
            return "ok"
        if self.ok is False:
            return "MISSING" if self.needed else "absent"
        return "info" if self.section == "domu" else "?"


# ---- small readers ---------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


# ---- the hypervisor --------------------------------------------------------------------


def check_under_xen(root: str = SYS_HYPERVISOR) -> Finding:
    kind = _read(os.path.join(root, "type"))
    if kind == "xen":
        return Finding("running under Xen", True, f"{root}/type: xen", section="hypervisor")
    seen = f"{root}/type is {kind!r}" if kind is not None else f"{root}/type is missing"
    return Finding(
        "running under Xen",
        False,
        f"not running under Xen ({seen})",
        "boot the machine through the Xen hypervisor (GRUB's Xen entry, or Xen as the "
        "bootloader's kernel with this kernel as Dom0) and run `xvf check` in Dom0; the Dom0 "
        "kernel needs CONFIG_XEN and CONFIG_XEN_SYS_HYPERVISOR",
        section="hypervisor",
    )


def xen_version(root: str = SYS_HYPERVISOR) -> tuple[int, int, str] | None:
    major = _read(os.path.join(root, "version", "major"))
    minor = _read(os.path.join(root, "version", "minor"))
    if not (major and minor and major.isdigit() and minor.isdigit()):
        return None
    return int(major), int(minor), _read(os.path.join(root, "version", "extra")) or ""


def check_xen_version(root: str = SYS_HYPERVISOR) -> Finding:
    version = xen_version(root)
    if version is None:
        return Finding(
            "Xen version",
            None,
            f"cannot read {root}/version/{{major,minor}}",
            "`xl info` shows xen_version; xvf needs Xen >= 4.18",
            section="hypervisor",
        )
    major, minor, extra = version
    text = f"Xen {major}.{minor}{extra}"
    if (major, minor) >= MIN_XEN:
        return Finding("Xen version", True, text, section="hypervisor")
    return Finding(
        "Xen version",
        False,
        f"{text}: too old; xl's virtio = [...] line and libxl's virtio nodes came in 4.18",
        "install Xen 4.18 or newer (Debian 13 ships 4.20)",
        section="hypervisor",
    )


def check_dom0(proc_xen: str = PROC_XEN) -> Finding:
    caps = _read(os.path.join(proc_xen, "capabilities"))
    if caps is not None and "control_d" in caps.split():
        return Finding("Dom0", True, f"{proc_xen}/capabilities: control_d")
    if caps is None:
        return Finding(
            "Dom0",
            False,
            f"{proc_xen}/capabilities is missing",
            "mount xenfs: `mount -t xenfs xenfs /proc/xen` (kernel option CONFIG_XENFS)",
        )
    return Finding(
        "Dom0",
        False,
        f"{proc_xen}/capabilities is {caps!r}: this is a DomU, not the control domain",
        "run xvf in Dom0",
    )


def _hypfs_tool() -> str | None:
    found = shutil.which("xenhypfs")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/xen-*/bin/xenhypfs"))
    return candidates[-1] if candidates else None


def hypfs_ioreq_config() -> tuple[bool | None, str]:
    """(CONFIG_IOREQ_SERVER is y, what was seen) from Xen's /buildinfo/config; None if unknown."""
    tool = _hypfs_tool()
    if tool is None:
        return None, "xenhypfs not installed (Debian: xen-utils)"
    try:
        done = subprocess.run(
            [tool, "cat", "/buildinfo/config"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{tool} failed: {exc}"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return None, (
            f"`xenhypfs cat /buildinfo/config` failed ({why[-1] if why else done.returncode}): "
            "Xen without CONFIG_HYPFS_CONFIG"
        )
    lines = done.stdout.splitlines()
    if "CONFIG_IOREQ_SERVER=y" in lines:
        return True, "hypfs /buildinfo/config: CONFIG_IOREQ_SERVER=y"
    if any(ln.startswith("CONFIG_") for ln in lines):
        return False, "hypfs /buildinfo/config has no CONFIG_IOREQ_SERVER=y"
    return None, "hypfs /buildinfo/config is not a Kconfig file"


def _dm_op_errno(dm_op, domid: int) -> int:
    from xvf.hotpath import _privcmd as P

    try:
        dm_op(domid, P.dm_op_destroy_ioreq_server(UNUSED_SERVER_ID))
    except HypercallError as exc:
        return exc.errno
    return 0


def probe_ioreq(dm_op, guest_domid: int | None) -> tuple[bool | None, str]:
    """IOREQ servers present? from harmless destroy_ioreq_server calls (see the module doc)."""
    from xvf.hotpath._privcmd import DOMID_INVALID

    err = _dm_op_errno(dm_op, DOMID_INVALID)
    seen = [f"dm_op against DOMID_INVALID: {_errname(err)}"]
    if err in (errno.ENOSYS, errno.EOPNOTSUPP):
        return False, "; ".join(seen) + " (no dm_op hypercall: built without CONFIG_IOREQ_SERVER)"
    present: bool | None = True if err == errno.ESRCH else None
    if guest_domid is not None:
        err = _dm_op_errno(dm_op, guest_domid)
        seen.append(
            f"destroy of unused server {UNUSED_SERVER_ID:#x} of dom{guest_domid}: {_errname(err)}"
        )
        if err == errno.ENOENT:
            present = True
        elif err in (errno.ENOSYS, errno.EOPNOTSUPP):
            present = False
    return present, "; ".join(seen)


IOREQ_FIX = (
    "rebuild the hypervisor with CONFIG_EXPERT=y and CONFIG_IOREQ_SERVER=y (Debian's arm64 "
    "Xen lacks it; only the hypervisor needs rebuilding, keep Debian's tools): see "
    "docs/real-xen.md section 1"
)


def check_ioreq(dm_op, guest_domid: int | None, use_hypfs: bool = True) -> Finding:
    present, detail = probe_ioreq(dm_op, guest_domid) if dm_op else (None, "privcmd unusable")
    if use_hypfs:
        config, seen = hypfs_ioreq_config()
        detail += f"; {seen}"
        if present is None:
            present = config
    if present is True:
        return Finding("IOREQ servers", True, detail, section="hypervisor")
    if present is False:
        return Finding("IOREQ servers", False, detail, IOREQ_FIX, section="hypervisor")
    return Finding(
        "IOREQ servers",
        None,
        detail,
        "cannot tell from here: look for CONFIG_IOREQ_SERVER=y in the hypervisor's .config "
        "(e.g. /boot/xen-*.config) or start xvf and watch for create_ioreq_server failing "
        "with ENOSYS",
        section="hypervisor",
    )


# ---- Dom0 kernel ------------------------------------------------------------------------


def check_device(name: str, dev_dir: str = DEV_XEN) -> tuple[Finding, int]:
    """/dev/xen/<name> opens and is the right driver; returns the open fd (or -1)."""
    from xvf.platform.xen import devices

    dev = devices.DEVICES[name]
    label = f"{dev_dir}/{name}"
    try:
        fd = devices.open_device(dev_dir, name)
    except PlatformUnavailable as exc:
        return Finding(label, False, str(exc), f"`modprobe {dev.module}` ({dev.option})"), -1
    err = _driver_probe(name, fd)
    if err:
        os.close(fd)
        msg = str(devices.not_the_driver(dev_dir, name, err))
        return Finding(label, False, msg, f"load {dev.module} ({dev.option})"), -1
    return Finding(label, True, f"{dev.purpose} ({dev.module})"), fd


def _driver_probe(name: str, fd: int) -> int:
    from xvf.errors import EventChannelError
    from xvf.hotpath import _privcmd as P
    from xvf.hotpath._evtchn import EventChannel

    if name == "privcmd":
        return P.Privcmd(fd).probe()
    if name == "evtchn":
        try:
            EventChannel(fd).reset()
        except EventChannelError as exc:
            return exc.errno or errno.EIO
    return 0


def check_offload(irqfd: bool, ioeventfd: bool) -> Finding:
    both = irqfd and ioeventfd
    detail = (
        f"privcmd irqfd {'yes' if irqfd else 'no'}, ioeventfd {'yes' if ioeventfd else 'no'}: "
        + (
            "QueueNotify and interrupts can be left to the kernel"
            if both
            else "xvf's own ioreq loop handles QueueNotify and interrupts (works, slower)"
        )
    )
    return Finding(
        "kernel offload",
        both,
        detail,
        ""
        if both
        else "Dom0 kernel with CONFIG_XEN_PRIVCMD_EVENTFD (Linux 6.7+; depends on "
        "CONFIG_XEN_VIRTIO, which Debian's kernel lacks)",
        needed=False,
    )


def check_xenstore(path: str | None):
    """(Finding, XenStore or None)."""
    from xvf.protocols.xenstore import XenStore

    try:
        xs = XenStore(path, timeout=5)
        name = xs.read("/local/domain/0/name")
    except XvfError as exc:
        return Finding("xenstored", False, str(exc), "start xenstored (Debian: xencommons)"), None
    return Finding("xenstored", True, f"{xs.path} (Dom0 is {name!r})"), xs


# ---- guests ----------------------------------------------------------------------------


def guest_name(xs, domid: int) -> str:
    try:
        return xs.read(f"/local/domain/{domid}/name") or "?"
    except XvfError:
        return "?"


def check_type(label: str, node):
    """(Finding, DeviceType or None)."""
    from xvf.device.types import device_type

    try:
        dev = device_type(node.device_id)
    except ConfigError as exc:
        return Finding(
            f"{label} type",
            False,
            f"{node.compatible}: {exc}",
            "use a device type xvf knows, or remove the device from the guest's virtio line",
            section="guests",
        ), None
    return Finding(
        f"{label} type",
        True,
        f"{dev.name} ({node.compatible}: {dev.description})",
        section="guests",
    ), dev


def probe_backend(path: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Connect and ask GET_FEATURES; (answered, what happened). The connection is closed."""
    from xvf.protocols.vhost_user import VhostUserFrontend

    try:
        with VhostUserFrontend(path, timeout=timeout) as fe:
            features = fe.get_features()
    except (XvfError, OSError) as exc:
        return False, str(exc)
    return True, f"answered GET_FEATURES ({features:#x})"


def check_socket(label: str, path: str, dev_name: str, state: int | None) -> Finding:
    name = f"{label} backend"
    start = f"start the {dev_name} backend listening on {path}"
    if state == XENBUS_CONNECTED:
        return Finding(name, True, f"{path}: served by xvf now (not probed)", section="guests")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return Finding(name, False, f"{path} is missing", start, section="guests")
    if not stat.S_ISSOCK(mode):
        return Finding(name, False, f"{path} is not a socket", start, section="guests")
    one_shot = ONE_SHOT_BACKENDS.get(dev_name)
    if one_shot:
        return Finding(
            name,
            True,
            f"{path} is a socket (not probed: {one_shot} serves one connection and exits "
            "when it closes)",
            section="guests",
        )
    answered, what = probe_backend(path)
    if answered:
        return Finding(name, True, f"{path} {what}", section="guests")
    return Finding(
        name,
        False,
        f"{path} does not answer: {what}",
        f"restart the backend on {path}; some serve one frontend at a time, so a second "
        "frontend (an xvf still connected?) is refused",
        section="guests",
    )


def check_grant_usage(label: str, grant_usage: bool, mapping: str) -> Finding:
    name = f"{label} grant_usage"
    value = int(grant_usage)
    if mapping == "per-device":
        how = "grant" if grant_usage else "foreign"
        return Finding(name, True, f"{value}: {how} mapping (per-device)", section="guests")
    wanted = mapping == "grant"
    if grant_usage == wanted:
        return Finding(name, True, f"{value}, as {mapping} mapping needs", section="guests")
    other = "--mapping grant (the default)" if grant_usage else "--mapping foreign"
    return Finding(
        name,
        False,
        f"grant_usage={value} but xvf maps with {mapping}: the guest's DMA addresses would "
        f"be {'grant' if grant_usage else 'guest-physical'} addresses {mapping} mapping "
        "cannot resolve",
        f"set grant_usage={int(wanted)} in the guest's virtio line, or run xvf with {other} "
        "(or --mapping per-device)",
        section="guests",
    )


def check_state(label: str, state: int | None) -> Finding:
    name = f"{label} state"
    if state == XENBUS_CONNECTED:
        return Finding(name, True, "4: served by xvf", section="guests")
    if state == XENBUS_CLOSED:
        return Finding(
            name,
            False,
            "6: xvf refused or stopped serving it",
            "xvf's log names the reason; fix it and restart xvf (or recreate the guest)",
            section="guests",
        )
    return Finding(
        name,
        None,
        f"{state}: not served (yet); xvf publishes 4 once it serves the device",
        "start xen-vhost-frontend; create guests paused (xl create -p) and unpause them "
        "after state 4",
        needed=False,
        section="guests",
    )


def _socket_paths(nodes, socket_dir: str) -> dict[tuple[int, int], str]:
    """<dir>/<name>.sock<N> per device, N counted per name in (domid, devid) order as xvf does
    when it starts with these devices present."""
    from xvf.device.types import BY_ID, socket_name

    counts: dict[str, int] = {}
    paths = {}
    for node in sorted(nodes, key=lambda n: (n.domid, n.devid)):
        dev = BY_ID.get(node.device_id)
        if dev is None:
            continue
        n = counts.get(dev.name, 0)
        counts[dev.name] = n + 1
        paths[(node.domid, node.devid)] = os.path.join(socket_dir, socket_name(dev, n))
    return paths


def _state_of(xs, node) -> int | None:
    raw = xs.read(f"{node.backend_path}/state")
    return int(raw) if raw and raw.strip().isdigit() else None


def check_guests(xs, socket_dir: str | None, mapping: str, own_domid: int = 0):
    """(findings, nodes) for every guest's virtio devices."""
    from xvf.daemon.discovery import read_virtio_devices

    nodes, errors = read_virtio_devices(xs, own_domid)
    nodes = [n for n in nodes if not n.closing]
    findings = [
        Finding("xenstore entry", False, str(e), "fix or recreate the guest", section="guests")
        for e in errors
    ]
    if not nodes:
        findings.append(
            Finding(
                "guests",
                None,
                "no guest has virtio devices for this domain",
                needed=False,
                section="guests",
            )
        )
        return findings, nodes
    paths = _socket_paths(nodes, socket_dir or "")
    for node in sorted(nodes, key=lambda n: (n.domid, n.devid)):
        label = f"dom{node.domid} ({guest_name(xs, node.domid)}) virtio {node.devid}"
        found, dev = check_type(label, node)
        findings.append(found)
        state = _state_of(xs, node)
        if dev is not None:
            if socket_dir:
                path = paths[(node.domid, node.devid)]
                findings.append(check_socket(label, path, dev.name, state))
            else:
                findings.append(
                    Finding(
                        f"{label} backend",
                        None,
                        "not checked: no --socket-path given",
                        "pass the --socket-path xvf runs with",
                        needed=False,
                        section="guests",
                    )
                )
        findings.append(check_grant_usage(label, node.grant_usage, mapping))
        findings.append(check_state(label, state))
    return findings, nodes


# ---- what the DomU kernel needs (informational) -------------------------------------------


def domu_needs(nodes) -> list[Finding]:
    from xvf.device.types import BY_ID

    found = [
        Finding(
            "DomU: virtio-mmio",
            None,
            "CONFIG_VIRTIO_MMIO=y (and CONFIG_XEN for a PVH guest)",
            needed=False,
            section="domu",
        ),
        Finding(
            "DomU: grant DMA",
            None,
            "CONFIG_XEN_VIRTIO=y for grant_usage=1 guests (Debian's stock arm64 kernel lacks "
            "it: such a guest needs its own kernel)",
            needed=False,
            section="domu",
        ),
    ]
    names = sorted({BY_ID[n.device_id].name for n in nodes if n.device_id in BY_ID})
    for name in names:
        option = DOMU_DRIVERS.get(name, "?")
        extra = {"i2c": " (+ CONFIG_I2C_CHARDEV)", "gpio": " (+ CONFIG_GPIO_CDEV)"}.get(name, "")
        found.append(
            Finding(f"DomU: {name} driver", None, f"{option}{extra}", needed=False, section="domu")
        )
    return found


# ---- the whole check ----------------------------------------------------------------------


class _DmOpHandle(Protocol):
    """What the IOREQ probe issues its dm_ops through: privcmd, or the software Xen."""

    def dm_op(self, domid: int, op: bytes) -> bytes: ...
    def close(self) -> None: ...


# (findings, handle for dm_ops or None, xenstore path or None for the default)
_HostFindings = tuple[list[Finding], _DmOpHandle | None, str | None]


def _dom0_findings(args) -> _HostFindings:
    """Host findings; (findings, open Privcmd or None, xenstore path: None = the default)."""
    findings = [check_under_xen()]
    if findings[0].ok is not True:
        return findings, None, None
    findings += [check_xen_version(), check_dom0()]
    fds = {}
    for name in ("privcmd", "evtchn", "gntdev"):
        found, fd = check_device(name)
        findings.append(found)
        fds[name] = fd
    for name in ("evtchn", "gntdev"):
        if fds[name] >= 0:
            os.close(fds[name])
    if fds["privcmd"] < 0:
        return findings, None, None
    from xvf.hotpath import _privcmd as P

    pc = P.Privcmd(fds["privcmd"])
    irqfd, ioeventfd = pc.probe_eventfd_ioctls()
    findings.append(check_offload(irqfd is not None, ioeventfd))
    return findings, pc, None


def _sim_findings(args) -> _HostFindings:
    from xvf.platform.sim.platform import SimPlatform

    try:
        platform = SimPlatform(args.sim)
    except XvfError as exc:
        return (
            [
                Finding(
                    "software Xen",
                    False,
                    str(exc),
                    "start one with `xvf sim`",
                    section="hypervisor",
                )
            ],
            None,
            None,
        )
    findings = [
        Finding("software Xen", True, f"xvf.platform.sim at {args.sim}", section="hypervisor")
    ]
    findings.append(check_offload(platform.supports_irqfd, platform.supports_ioeventfd))
    return findings, platform, platform.xenstore_path()


def collect(args) -> list[Finding]:
    from xvf.app.cli import mapping_of

    mapping = mapping_of(args)
    sim = getattr(args, "sim", None)
    findings, handle, xs_path = (_sim_findings if sim else _dom0_findings)(args)
    if not findings[0].ok:  # not under Xen, or no software Xen: nothing else to ask
        return findings + domu_needs([])
    try:
        xs_finding, xs = check_xenstore(xs_path)
        nodes, guest_findings = [], []
        if xs is not None:
            try:
                guest_findings, nodes = check_guests(xs, args.socket_path, mapping)
            finally:
                xs.close()
        domids = sorted({n.domid for n in nodes})
        dm_op = handle.dm_op if handle is not None else None
        findings.append(check_ioreq(dm_op, domids[0] if domids else None, use_hypfs=not sim))
        return [*findings, xs_finding, *guest_findings, *domu_needs(nodes)]
    finally:
        if handle is not None:
            handle.close()


# ---- output -------------------------------------------------------------------------------

SECTIONS = {
    "hypervisor": "Hypervisor",
    "dom0": "Dom0",
    "guests": "Guests",
    "domu": "What the DomU kernel needs (not checkable from Dom0)",
}


def print_table(findings: list[Finding], out=None) -> None:
    out = out or sys.stdout
    width = max(len(f.name) for f in findings)
    for key, title in SECTIONS.items():
        part = [f for f in findings if f.section == key]
        if not part:
            continue
        print(f"{title}:", file=out)
        for f in part:
            print(f"  {f.mark:<7} {f.name:<{width}}  {f.detail}", file=out)
            if f.fix and f.ok is not True:
                print(f"  {'':<7} {'':<{width}}  fix: {f.fix}", file=out)
    failing = [f for f in findings if f.fails]
    if failing:
        print(
            f"{len(failing)} needed item(s) missing: " + ", ".join(f.name for f in failing),
            file=out,
        )
    else:
        print("everything xvf needs is there", file=out)


def run_check(args) -> int:
    findings = collect(args)
    ok = not any(f.fails for f in findings)
    if args.json:
        doc = {
            "ok": ok,
            "findings": [{**dataclasses.asdict(f), "mark": f.mark} for f in findings],
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print_table(findings)
    return 0 if ok else 1
