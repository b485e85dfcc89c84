"""Starting real third-party vhost-user backends for simulated guests.

qemu-storage-daemon (Debian 12: qemu-system-common; Debian 13: qemu-utils) serves virtio-blk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from xvf.errors import SimulatorError

QSD = "qemu-storage-daemon"


class BackendProcess:
    """A backend process serving one vhost-user socket; stopped by `stop()`."""

    def __init__(self, argv: list[str], socket_path: str, log_path: str) -> None:
        self.argv = argv
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> BackendProcess:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                raise SimulatorError(
                    f"{self.argv[0]} exited with {self.proc.returncode} before listening; "
                    f"see {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise SimulatorError(f"{self.argv[0]} did not create {self.socket_path}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def kill(self) -> None:
        """Crash the backend (SIGKILL), for fault-injection tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)


def make_disk_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def qemu_storage_daemon(
    image: str, socket_path: str, num_queues: int = 1, aio: str = "io_uring"
) -> BackendProcess:
    """qemu-storage-daemon exporting `image` (raw) as vhost-user-blk on `socket_path`."""
    exe = shutil.which(QSD)
    if exe is None:
        raise SimulatorError(
            "qemu-storage-daemon not found; install it: apt-get install qemu-system-common"
            " (Debian 12) or qemu-utils (Debian 13)"
        )
    argv = [
        exe,
        "--blockdev",
        f"driver=file,node-name=file0,filename={image},cache.direct=off,aio={aio}",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={socket_path},"
        f"writable=on,num-queues={num_queues}",
    ]
    return BackendProcess(argv, socket_path, socket_path + ".log")


def start_qsd(image: str, socket_path: str, num_queues: int = 1) -> BackendProcess:
    """Start QSD, falling back from io_uring to thread-pool AIO where io_uring is unavailable."""
    try:
        return qemu_storage_daemon(image, socket_path, num_queues, "io_uring").start()
    except SimulatorError:
        return qemu_storage_daemon(image, socket_path, num_queues, "threads").start()


def xvf_command(
    sim_dir: str,
    socket_path: str,
    foreign: bool,
    log_level: str = "info",
    socket_timeout: float = 20.0,
    extra: list[str] | tuple = (),
) -> list[str]:
    """The command line of xvf serving the software Xen in `sim_dir`, as a user runs it."""
    argv = [
        sys.executable,
        "-m",
        "xvf",
        "--log-level",
        log_level,
        "--sim",
        sim_dir,
        "--socket-path",
        socket_path,
        "--socket-timeout",
        str(socket_timeout),
    ]
    if foreign:
        argv.append("--foreign-mapping")
    if "--status-socket" not in extra:
        # Its own per simulated Xen, so parallel runs never share /run/xvf/status.sock.
        argv += ["--status-socket", status_socket_of(sim_dir)]
    return [*argv, *extra]


def status_socket_of(sim_dir: str) -> str:
    """The --status-socket xvf_command gives xvf serving the software Xen in `sim_dir`."""
    return os.path.join(sim_dir, "xvf-status.sock")
