"""The rig's DomU: an initramfs whose /init runs the guest-side checks, and its xl config.

The guest is the rig's one kernel plus a busybox initramfs (no root disk, no modules). Its
/init (tests/xen/domu/init) reads a test plan from `xvf.*` words on the kernel command line,
reports the virtio devices it sees, runs the checks and powers the domain off. The Dom0 side
reads the guest console and parses it with parse_console(); the line format is documented
there. Data written by the guest is pattern(seed, n), so Dom0 can verify it byte for byte.

Run `python3 -m tests.xen.rig.domu smoke` to boot the initramfs on bare QEMU (no Xen).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import trixie
from .cache import cache_dir, fingerprint, log, stage

GUEST_DIR = Path(__file__).resolve().parent.parent / "domu"
GUEST_FILES = {  # source in tests/xen/domu -> (path in the initramfs, mode)
    "init": ("init", 0o755),
    "lib.sh": ("lib/xvf/lib.sh", 0o644),
    "checks.sh": ("lib/xvf/checks.sh", 0o644),
}
BUSYBOX_PACKAGE = "busybox-static"
# What exists before /init mounts devtmpfs: the kernel opens /dev/console for PID 1's stdio.
DEVICE_NODES = {"dev/console": (0o600, 5, 1), "dev/null": (0o666, 1, 3)}
DIRECTORIES = [
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt",
    "lib", "lib/xvf", "etc", "root",
]  # fmt: skip
FORMAT = "domu-initramfs-1"  # bump when the layout built here changes

# What the guest's init accepts in a parameter's name and value (lib.sh load_params).
_PARAM_KEY = re.compile(r"^[a-z0-9._]+$")
_PARAM_VALUE = re.compile(r"^[A-Za-z0-9._:,/+@-]+$")
_SEED = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def pattern(seed: str, nbytes: int) -> bytes:
    """The data the guest writes for `seed` (lib.sh pattern()): 64-byte self-locating lines.

    Line i is "xvf:SEED:iiiiiiii:" padded with '.' to 63 characters plus "\\n"; the whole is
    cut to `nbytes`. Seeds are 1-40 characters of [A-Za-z0-9_-], so a line never overflows.
    """
    if not _SEED.match(seed):
        raise ValueError(f"seed {seed!r}: want 1-40 characters of [A-Za-z0-9_-]")
    lines = (nbytes + 63) // 64
    out = b"".join(f"xvf:{seed}:{i:08d}:".ljust(63, ".").encode() + b"\n" for i in range(lines))
    return out[:nbytes]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plan_cmdline(params: dict[str, str | int]) -> str:
    """`xvf.KEY=VALUE` words for the guest's init, e.g. {"checks": "blk", "blk.seed": "s1"}.

    Raises on what init would ignore, so a typo cannot silently drop a parameter.
    """
    words = []
    for key, value in params.items():
        value = str(value)
        if not _PARAM_KEY.match(key) or not _PARAM_VALUE.match(value):
            raise ValueError(f"guest parameter xvf.{key}={value!r} would be ignored by init")
        words.append(f"xvf.{key}={value}")
    return " ".join(words)


# ---------------------------------------------------------------- initramfs


class _Cpio:
    """A newc ("070701") archive written in memory: fixed owner and times, so the same
    inputs give the same bytes, and device nodes need no mknod (nor root)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:  # fmt: skip
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]  # fmt: skip
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, perm: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = 0
        self._entry("TRAILER!!!", 0, nlink=1)
        self._pad_to(512)
        return self.buf.getvalue()

    def _pad_to(self, n: int) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % n))


def _busybox_deb() -> Path:
    dest = cache_dir() / "debs" / "single"
    found = sorted(dest.glob(f"{BUSYBOX_PACKAGE}_*.deb"))
    if found:
        return found[-1]
    trixie.update()
    return trixie.download(BUSYBOX_PACKAGE, dest)


def _applets_from_binary(busybox: bytes) -> list[str]:
    """Applet names from the binary's own table (NUL-separated, sorted, starting "[", "[["),
    for hosts without qemu-aarch64-static: they are all installed in bin/."""
    start = busybox.find(b"[\0[[\0")
    if start < 0:
        raise RuntimeError("busybox: applet name table not found")
    names: list[bytes] = []
    for raw in busybox[start:].split(b"\0"):
        if not raw or not re.fullmatch(rb"[a-z0-9_.\[\]-]+", raw) or (names and raw <= names[-1]):
            break
        names.append(raw)
    return [f"bin/{n.decode()}" for n in names]


def _applets(busybox: Path) -> list[str]:
    """Install paths (bin/cat, usr/sbin/i2cget, ...) of every applet the binary has."""
    data = busybox.read_bytes()
    qemu = shutil.which("qemu-aarch64-static")
    if qemu:
        done = subprocess.run(
            [qemu, str(busybox), "--list-full"], capture_output=True, text=True, check=True
        )
        paths = [p.strip() for p in done.stdout.splitlines() if p.strip()]
    else:
        paths = _applets_from_binary(data)
    if "bin/sh" not in paths:
        raise RuntimeError("busybox has no sh applet")
    return paths


def _initramfs_contents(busybox: Path) -> bytes:
    cpio = _Cpio()
    for d in DIRECTORIES:
        cpio.directory(d)
    for name, (perm, major, minor) in DEVICE_NODES.items():
        cpio.chardev(name, perm, major, minor)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for path in _applets(busybox):
        if path == "bin/busybox":
            continue
        if path == "linuxrc":
            continue  # /init is ours
        parent = path.rsplit("/", 1)[0]
        if parent not in DIRECTORIES:
            raise RuntimeError(f"busybox applet {path} outside the known directories")
        cpio.symlink(path, "/bin/busybox")
    for src, (dest, perm) in GUEST_FILES.items():
        cpio.file(dest, (GUEST_DIR / src).read_bytes(), perm)
    return cpio.finish()


def _domu_dir() -> Path:
    path = cache_dir() / "domu"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_domu_initramfs() -> Path:
    """$XVF_RIG_CACHE/domu/initramfs.cpio.gz: busybox (trixie's arm64 busybox-static) with
    its applet links, the two device nodes, and /init plus /lib/xvf/*.sh from tests/xen/domu."""
    deb = _busybox_deb()
    out = _domu_dir() / "initramfs.cpio.gz"
    inputs = fingerprint(
        FORMAT, deb.name, Path(__file__), *(GUEST_DIR / name for name in sorted(GUEST_FILES))
    )

    def build() -> None:
        with tempfile.TemporaryDirectory(dir=_domu_dir()) as tmp:
            trixie.extract(deb, Path(tmp))
            data = _initramfs_contents(Path(tmp) / "usr/bin/busybox")
        part = out.with_name(out.name + ".part")
        part.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
        part.rename(out)
        log(f"domu: {out} ({out.stat().st_size // 1024} KiB, {len(data) // 1024} KiB unpacked)")

    stage("domu-initramfs", inputs, [out], build)
    return out


# ---------------------------------------------------------------- xl


def virtio_device(virtio_id: int, grant_usage: bool = True, backend: str | None = None) -> str:
    """One `virtio = [...]` entry (xl 4.18+) for a virtio-mmio device of id `virtio_id`.

    type: the device-tree compatible libxl writes, "virtio,device<id in hex>" (22 is i2c,
    29 gpio, 2 blk, 1a fs); transport: only mmio on Arm; grant_usage=1: libxl adds the
    `iommus = <&xen_grant_dma backend-domid>` link that makes Linux use grant DMA, so the
    backend maps grants instead of all guest memory; backend: the domain serving it (Dom0).
    """
    spec = f"type=virtio,device{virtio_id:x}, transport=mmio, grant_usage={int(grant_usage)}"
    if backend is not None:
        spec += f", backend={backend}"
    return spec


def _quote(value: str) -> str:
    if '"' in value or "\n" in value or "\\" in value:
        raise ValueError(f"{value!r} cannot be written as an xl string")
    return f'"{value}"'


def xl_config(
    name: str,
    kernel: Path,
    initramfs: Path,
    virtio: list[str],
    extra: str,
    memory_mb: int = 256,
    vcpus: int = 1,
    maxmem_mb: int | None = None,
) -> str:
    """An xl domain config for the test guest.

    `virtio` holds entries like virtio_device(34); `extra` is the guest's kernel command line
    (plan_cmdline() words); console=hvc0 is put first unless `extra` names a console.
    """
    if "console=" not in extra:
        extra = f"console=hvc0 {extra}".strip()
    lines = [
        "# Written by tests/xen/rig/domu.py for one test case.",
        f"name = {_quote(name)}",
        # Arm has only one guest type (PV drivers on hardware virtualization); xl calls it pvh.
        'type = "pvh"',
        # The rig's kernel and DomU initramfs, as files in Dom0 (no bootloader, no root disk).
        f"kernel = {_quote(str(kernel))}",
        f"ramdisk = {_quote(str(initramfs))}",
        # The guest kernel command line: console plus the xvf.* test plan its /init reads.
        f"extra = {_quote(extra)}",
        f"memory = {int(memory_mb)}",
        # maxmem above memory: static-max in xenstore exceeds the RAM the guest really has.
        *([f"maxmem = {int(maxmem_mb)}"] if maxmem_mb else []),
        f"vcpus = {int(vcpus)}",
        # virtio-mmio devices: libxl picks a base and an SPI for each, puts a node in the
        # guest's device tree and records them in xenstore for the device model (xvf) to find.
        "virtio = [",
        *(f"    {_quote(v)}," for v in virtio),
        "]",
        # init ends with `poweroff -f`: the domain goes away, which tells the test it finished.
        'on_poweroff = "destroy"',
        # A reboot or a crash ends the case as well: nothing restarts behind the test's back.
        'on_reboot = "destroy"',
        'on_crash = "destroy"',
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- console output


@dataclass
class GuestReport:
    """What the guest printed. Result keys are those of each check (see tests/xen/domu)."""

    boot: dict[str, str] | None = None
    virtio: list[dict[str, str]] = field(default_factory=list)
    results: dict[str, tuple[bool, dict[str, str]]] = field(default_factory=dict)
    done: dict[str, str] | None = None
    dmesg: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)


_LINE = re.compile(r"XVF-GUEST: (\S+)(?: (PASS|FAIL))?((?: \S+=\S*)*)\s*$")


def _pairs(text: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in text.split())


def parse_console(text: str) -> GuestReport:
    """Parse a guest console log.

    Lines (each one "XVF-GUEST: " then space-separated words; values never hold spaces):
      boot kernel=... machine=... uptime=... checks=...
      virtio dev=virtioN id=N type=blk|fs|i2c|gpio|net|idN driver=NAME|none parent=...
             access_platform=0|1 grant_dma=0|1 backend_domid=N|- iommu_link=0|1
      <check> PASS|FAIL key=value ... [reason=...] secs=S.SS
      done pass=N fail=N secs=S.SS
    Other prefixes: "XVF-DMESG: " kernel messages, "XVF-LOG: <check>: " diagnostics.

    grant_dma=1 says the device tree routes the device through a xen,grant-dma node (libxl's
    grant_usage=1); under Xen, Linux then insists on VIRTIO_F_ACCESS_PLATFORM, so a bound
    driver with access_platform=1 and grant_dma=1 means the device's DMA goes through grants.
    """
    report = GuestReport()
    for raw in text.splitlines():
        line = raw.replace("\r", "")
        if (i := line.find("XVF-DMESG: ")) >= 0:
            report.dmesg.append(line[i + 11 :])
            continue
        if (i := line.find("XVF-LOG: ")) >= 0:
            report.logs.append(line[i + 9 :])
            continue
        if (i := line.find("XVF-GUEST: ")) < 0:
            continue
        m = _LINE.match(line[i:])
        if not m:
            continue
        what, verdict, rest = m[1], m[2], _pairs(m[3])
        if verdict:
            report.results[what] = (verdict == "PASS", rest)
        elif what == "boot":
            report.boot = rest
        elif what == "virtio":
            report.virtio.append(rest)
        elif what == "done":
            report.done = rest
    return report


# ---------------------------------------------------------------- bare QEMU smoke test


REPO = Path(__file__).resolve().parents[3]
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # QEMU 7.2's C daemon, in the host's qemu-system-common
FS_TAG = "xvf"


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on {path}")
        time.sleep(0.05)


# QEMU 7.2's vhost-user-gpio-device sets up 1024-entry rings, which the reference backend
# (like vhost-device-gpio) refuses above 256: the guest would then hang in virtio-gpio's probe,
# before /init runs. Only for this bare-QEMU run, the backend accepts 1024.
_BACKEND_MAIN = {
    "i2c": "import sys; from tests.backends import i2c; sys.exit(i2c.main())",
    "gpio": "import sys; from tests.backends import gpio; gpio.GpioDevice.queue_size = 1024; "
    "sys.exit(gpio.main())",
}


def _start_vhost_user(tmp: Path, procs: list[subprocess.Popen[bytes]]) -> list[str]:
    """The reference i2c and gpio backends (tests/backends) and virtiofsd, and the QEMU
    arguments that attach them as vhost-user virtio-mmio devices (QEMU is the front-end)."""
    share = tmp / "share"
    share.mkdir()
    (share / "hello.txt").write_bytes(pattern("fsread", 5000))
    args = [
        # vhost-user back-ends map guest RAM, so it must be a shareable memfd.
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-machine", "memory-backend=mem",
    ]  # fmt: skip
    for name, device in (("i2c", "vhost-user-i2c-device"), ("gpio", "vhost-user-gpio-device")):
        sock = tmp / f"{name}.sock"
        logf = (tmp / f"{name}.log").open("wb")
        backend = [sys.executable, "-c", _BACKEND_MAIN[name], "--socket-path", str(sock)]
        procs.append(subprocess.Popen(backend, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT))
        _wait_for_socket(sock, procs[-1], f"the reference {name} backend")
        args += ["-chardev", f"socket,id={name}0,path={sock}"]
        args += ["-device", f"{device},chardev={name}0"]
    sock = tmp / "fs.sock"
    daemon = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share}", "-o", "cache=none"]
    logf = (tmp / "fs.log").open("wb")
    procs.append(subprocess.Popen(daemon, stdout=logf, stderr=subprocess.STDOUT))
    _wait_for_socket(sock, procs[-1], "virtiofsd")
    args += ["-chardev", f"socket,id=fs0,path={sock}",
             "-device", f"vhost-user-fs-device,chardev=fs0,tag={FS_TAG}"]  # fmt: skip
    return args


@dataclass
class SmokeRun:
    report: GuestReport
    secs: float  # QEMU start to exit
    host: dict[str, str]  # blk_sha256 (the written disk region), fs_write_sha256


def smoke(
    kernel: Path,
    params: dict[str, str | int],
    vhost_user: bool = False,
    disk_mb: int = 16,
    timeout_s: float = 300,
    log_path: Path | None = None,
) -> SmokeRun:
    """Boot the DomU initramfs on bare QEMU (its own virtio-mmio, no Xen) with one raw disk.

    Returns the parsed console, the seconds from QEMU's start to its exit (the guest's
    poweroff) and what the host found afterwards (SmokeRun.host). The disk's first MiB is
    pattern("ref", 1 MiB), for xvf.blk.ref.*. With `vhost_user`, i2c, gpio and virtio-fs
    devices are attached too (see _start_vhost_user); without, those checks must FAIL.
    """
    initramfs = build_domu_initramfs()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        disk = tmp / "disk.img"
        with disk.open("wb") as f:
            f.write(pattern("ref", 1 << 20))
            f.truncate(disk_mb << 20)
        cmd = [
            "qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a57", "-m", "512",
            "-nographic", "-no-reboot", "-nic", "none",
            # Modern (version 2) virtio-mmio, as on Xen; QEMU's default is legacy, which
            # libvhost-user back-ends (virtiofsd) refuse.
            "-global", "virtio-mmio.force-legacy=false",
            "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", f"console=ttyAMA0 {plan_cmdline(params)}",
            "-drive", f"if=none,id=d0,format=raw,file={disk}",
            "-device", "virtio-blk-device,drive=d0",
        ]  # fmt: skip
        try:
            if vhost_user:
                cmd += _start_vhost_user(tmp, procs)
            t0 = time.monotonic()
            try:
                done = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s
                )
                out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"").decode(errors="replace") + "\n[smoke: QEMU timed out]\n"
            secs = time.monotonic() - t0
            host: dict[str, str] = {}
            if "blk.sector" in params and "blk.bytes" in params:
                with disk.open("rb") as f:
                    f.seek(int(params["blk.sector"]) * 512)
                    host["blk_sha256"] = sha256(f.read(int(params["blk.bytes"])))
            if vhost_user:
                for name in ("i2c", "gpio", "fs"):
                    out += f"\n[smoke: {name} backend log]\n" + (tmp / f"{name}.log").read_text()
                written = tmp / "share" / str(params.get("fs.write", ""))
                if written.is_file():
                    host["fs_write_sha256"] = sha256(written.read_bytes())
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if log_path:
        log_path.write_text(out)
    return SmokeRun(parse_console(out), secs, host)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.xen.rig.domu")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the DomU initramfs")
    sm = sub.add_parser("smoke", help="boot it on bare QEMU with a virtio-blk disk")
    sm.add_argument("--kernel", type=Path, default=cache_dir() / "kernel" / "Image")
    sm.add_argument("--checks", default="blk,i2c,gpio,fs")
    sm.add_argument("--timeout", type=int, default=10, help="per-check timeout in the guest")
    sm.add_argument("--log", type=Path, default=None)
    sm.add_argument(
        "--vhost-user", action="store_true", help="attach i2c, gpio and fs back-ends as well"
    )
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(build_domu_initramfs())
        return 0
    ref = pattern("ref", 1 << 20)
    params: dict[str, str | int] = {
        "checks": args.checks,
        "timeout": args.timeout,
        "blk.seed": "smoke1",
        "blk.sector": 4096,
        "blk.bytes": 65536,
        "blk.ref.sector": 8,
        "blk.ref.bytes": 4096,
        "blk.ref.sha256": sha256(ref[4096:8192]),
        "i2c.set": "2030-01-02T03:04:05",
        "gpio.line": 3,
        "fs.tag": FS_TAG,
        "fs.read": "hello.txt",
        "fs.read.sha256": sha256(pattern("fsread", 5000)),
        "fs.write": "written.bin",
        "fs.write.seed": "fswrite",
        "fs.write.bytes": 12345,
    }
    run = smoke(args.kernel, params, vhost_user=args.vhost_user, log_path=args.log)
    report = run.report
    for name, (ok, kv) in report.results.items():
        print(f"{name}: {'PASS' if ok else 'FAIL'} {kv}")
    print(f"boot={report.boot} done={report.done} qemu_secs={run.secs:.1f} host={run.host}")
    # What this run must show: blk always PASSes with the host's own pattern on the disk;
    # the other devices PASS when attached and FAIL at once (not by timeout) when absent.
    problems = [] if report.done else ["the guest never printed done"]
    for name in args.checks.split(","):
        ok, kv = report.results.get(name, (False, {"reason": "no result line"}))
        if name == "blk" or args.vhost_user:
            if not ok:
                problems.append(f"{name} failed: {kv.get('reason')}")
        elif ok or kv.get("reason") == "timeout":
            problems.append(f"{name} should have failed at once without its device")
    blk = report.results.get("blk", (False, {}))[1]
    if blk and not blk.get("read_sha256") == run.host.get("blk_sha256") == sha256(
        pattern("smoke1", 65536)
    ):
        problems.append("blk data differs between guest, disk image and host pattern")
    fs = report.results.get("fs", (False, {}))[1]
    if (
        args.vhost_user
        and fs.get("write_sha256")
        and not (
            fs["write_sha256"]
            == run.host.get("fs_write_sha256")
            == sha256(pattern("fswrite", 12345))
        )
    ):
        problems.append("fs data differs between guest, shared directory and host pattern")
    for problem in problems:
        print(f"smoke: {problem}")
    print("smoke: OK" if not problems else "smoke: FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_main(sys.argv[1:]))
