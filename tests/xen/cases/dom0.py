"""What a test on the rig's Dom0 drives: xvf, the backends, and guests made with `xl create`.

Everything here runs inside the real Dom0 (Debian 13 arm64 on Xen 4.20): `xl`, xenstored and
the kernel's /dev/xen devices are the real ones. xvf is the aarch64 wheel the rig installed;
backends are Debian's (qemu-storage-daemon, virtiofsd) or the in-tree reference backends run
from this source tree (`python3 -m tests.backends.i2c`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.xen.rig.domu import GuestReport, parse_console, plan_cmdline, xl_config
from xvf.protocols.xenstore import XenStore

WORK = Path(os.environ.get("XVF_RIG_WORK", "/xvf"))
RESULTS = WORK / "results"
SRC = WORK / "src"
DOMU_KERNEL = WORK / "domu" / "Image"
DOMU_INITRAMFS = WORK / "domu" / "initramfs.cpio.gz"
CONSOLE_DIR = Path("/var/log/xen/console")
XENBUS_CONNECTED, XENBUS_CLOSED = "4", "6"


def run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def wait_until(what: str, predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Process:
    """A daemon of the test (xvf or a backend), its output in the test's results dir."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self._log.write(f"$ {' '.join(argv)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 60, count: int = 1) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and self.log().count(text) < count:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            return self.log().count(text) >= count

        wait_until(f"{self.name} to log {text!r}", seen, timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def wait_socket(path: Path, proc: Process, timeout: float = 60) -> None:
    def there() -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited before {path} appeared:\n{proc.log()}")
        return path.exists()

    wait_until(f"{path}", there, timeout)


def start_xvf(
    log_dir: Path,
    sockets: Path,
    foreign: bool = False,
    ioreq_only: bool = False,
    name: str = "xvf",
    extra: tuple[str, ...] = (),
) -> Process:
    argv = ["xen-vhost-frontend", "--socket-path", str(sockets), "--log-level", "debug"]
    if foreign:
        argv.append("--foreign-mapping")
    if ioreq_only:
        argv.append("--ioreq-only")
    argv += extra
    xvf = Process(name, argv, log_dir)
    xvf.wait_log("xvf serving", timeout=60)
    return xvf


def start_qsd(log_dir: Path, socket: Path, image: Path, name: str = "qsd") -> Process:
    qsd = Process(
        name,
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={image},cache.direct=off,aio=threads",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={socket},"
            "writable=on,num-queues=1",
        ],
        log_dir,
    )
    wait_socket(socket, qsd)
    return qsd


def start_ref_backend(log_dir: Path, kind: str, socket: Path, *args: str) -> Process:
    """An in-tree reference backend (tests/backends), mapping the guest's real Xen memory."""
    proc = Process(
        f"{kind}-{socket.name}",
        [sys.executable, "-m", f"tests.backends.{kind}", "--socket-path", str(socket), "-v", *args],
        log_dir,
        cwd=SRC,
    )
    wait_socket(socket, proc)
    return proc


class Guest:
    """A DomU made with `xl create -p`, unpaused once xvf serves its devices."""

    def __init__(
        self,
        name: str,
        virtio: list[str],
        plan: dict[str, str | int],
        log_dir: Path,
        memory_mb: int = 256,
        maxmem_mb: int | None = None,
    ):
        self.name = name
        self.log_dir = log_dir
        self.cfg = log_dir / f"{name}.cfg"
        self.cfg.write_text(
            xl_config(
                name,
                DOMU_KERNEL,
                DOMU_INITRAMFS,
                virtio,
                plan_cmdline(plan),
                memory_mb=memory_mb,
                maxmem_mb=maxmem_mb,
            )
        )
        self.console = CONSOLE_DIR / f"guest-{name}.log"
        if self.console.exists():
            self.console.unlink()
        # Paused: the guest probes its virtio-mmio windows ~0.5 s after boot, and a window
        # no IOREQ server claims yet is a data abort (a panic in virtio_mmio_probe).
        created = run("xl", "create", "-p", str(self.cfg), timeout=120, check=False)
        if created.returncode != 0:
            free = run("xl", "info", check=False).stdout
            free = next((ln for ln in free.splitlines() if "free_memory" in ln), "?")
            raise AssertionError(f"xl create -p {self.cfg} failed ({free}): {created.stderr}")
        self.domid = int(run("xl", "domid", name).stdout.strip())
        self.destroyed = False

    def backend_states(self) -> dict[int, str | None]:
        base = f"/local/domain/0/backend/virtio/{self.domid}"
        with XenStore() as xs:
            return {int(d): xs.read(f"{base}/{d}/state") for d in xs.directory(base)}

    def wait_served(self, timeout: float = 90, allow_refused: bool = False) -> dict[int, str]:
        """Wait until xvf published a state for every device: 4 served (6 refused)."""
        final = (XENBUS_CONNECTED, XENBUS_CLOSED) if allow_refused else (XENBUS_CONNECTED,)

        def settled() -> dict[int, str] | None:
            states = self.backend_states()
            if not allow_refused and XENBUS_CLOSED in states.values():
                raise AssertionError(f"xvf refused a device of {self.name}: {states}")
            return states if states and all(s in final for s in states.values()) else None

        return wait_until(f"xvf to serve {self.name}'s devices", settled, timeout)

    def unpause(self) -> None:
        run("xl", "unpause", self.name)

    def run_when_served(self) -> None:
        """What a user's script does: wait for xvf to serve every device, then unpause."""
        self.wait_served()
        self.unpause()

    def exists(self) -> bool:
        return run("xl", "domid", self.name, check=False).returncode == 0

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_done(self, timeout: float = 240) -> GuestReport:
        """The guest's report once its init printed `done` (it then powers off)."""

        def finished() -> bool:
            text = self.console_text()
            return "XVF-GUEST: done" in text or (not self.exists() and bool(text))

        try:
            wait_until(f"{self.name} to finish its checks", finished, timeout, interval=1)
        finally:
            self.save_console()
        return parse_console(self.console_text())

    def save_console(self) -> None:
        (self.log_dir / f"{self.name}.console.log").write_text(self.console_text())

    def destroy(self) -> None:
        if not self.destroyed and self.exists():
            run("xl", "destroy", self.name, timeout=120, check=False)
        self.destroyed = True
        self.save_console()


def result(report: GuestReport, check: str) -> dict[str, str]:
    """The key=values of a check that PASSed; a clear failure otherwise."""
    if check not in report.results:
        raise AssertionError(f"the guest never reported {check}: {report}")
    ok, values = report.results[check]
    assert ok, f"guest check {check} FAILED: {values} (logs: {report.logs[-10:]})"
    return values
