"""Shared fixtures: a software Xen, xvf as a separate process, real backends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from xvf.platform.sim.backends import BackendProcess, make_disk_image, start_qsd, xvf_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_qsd = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None,
    reason="qemu-storage-daemon missing (apt-get install qemu-system-common on Debian 12, "
    "qemu-utils on 13)",
)


@pytest.fixture
def run_dir(tmp_path) -> str:
    # unix socket paths are limited to 108 bytes; tmp_path can be long
    short = f"/tmp/xvf-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    os.makedirs(short)
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def hypervisor(run_dir, request) -> Iterator:
    """A software Xen; `@pytest.mark.kernel_eventfds` gives its Dom0 kernel privcmd
    ioeventfd/irqfd (Linux 6.7+), otherwise it is a 6.1 kernel without them."""
    from xvf.platform.sim.hypervisor import Hypervisor

    offload = request.node.get_closest_marker("kernel_eventfds") is not None
    # destroy waits for backends to close like libxl, but 3 s, not libxl's 10 s, so tests
    # that destroy a guest nobody serves stay quick (those that check xvf closes in
    # time read hv.backends_closed, not the clock).
    hv = Hypervisor(
        os.path.join(run_dir, "xen"), kernel_eventfds=offload, destroy_timeout=3.0
    ).start()
    yield hv
    hv.close()


class FrontendProcess:
    """xen-vhost-frontend running against the software Xen, as a user would run it."""

    def __init__(
        self, hv, socket_dir: str, foreign: bool, log_path: str, extra: list[str] | None = None
    ) -> None:
        argv = xvf_command(hv.run_dir, socket_dir, foreign, "debug", 20, extra or [])
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_log(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        """Wait until xvf has logged `text` at least `count` times."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"xvf exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"xvf never logged {text!r}:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_frontend(hypervisor, run_dir):
    started: list[FrontendProcess] = []

    def start(socket_dir: str, foreign: bool = True, extra: list[str] | None = None):
        fe = FrontendProcess(
            hypervisor, socket_dir, foreign, os.path.join(run_dir, f"xvf{len(started)}.log"), extra
        )
        started.append(fe)
        return fe

    yield start
    for fe in started:
        fe.stop()


@pytest.fixture
def sockets(run_dir) -> str:
    """The directory xvf is pointed at with --socket-path."""
    path = os.path.join(run_dir, "sockets")
    os.makedirs(path)
    return path


def wait_for_socket(path: str, proc: subprocess.Popen, what: str, timeout: float = 10) -> None:
    """Until a backend process listens on `path`; fails at once if it exited."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} never listened on {path}"
        time.sleep(0.02)


@pytest.fixture
def start_ref_backend():
    """start(kind, socket_path, *args): an in-tree reference backend (tests/backends)
    as its own process, like the daemons it stands in for; stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(kind: str, socket_path: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"tests.backends.{kind}", "--socket-path", socket_path, *args],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        wait_for_socket(socket_path, proc, f"{kind} backend")
        return proc

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


@pytest.fixture
def start_blk_backend(run_dir):
    """start(name, size) -> (BackendProcess, image path); the socket is <dir>/<name>."""
    procs: list[BackendProcess] = []

    def start(socket_dir: str, sock_name: str, size: int = 64 << 20):
        image = os.path.join(run_dir, sock_name + ".img")
        make_disk_image(image, size)
        proc = start_qsd(image, os.path.join(socket_dir, sock_name))
        procs.append(proc)
        return proc, image

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def xsd():
    """The simulator's xenstored on a short socket path (unix paths max 108 bytes)."""
    import tempfile

    from xvf.platform.sim.xenstored import XenStored

    d = tempfile.mkdtemp(prefix="xvf-xsd-")
    daemon = XenStored(os.path.join(d, "xs.sock")).start()
    yield daemon
    daemon.stop()
    shutil.rmtree(d, ignore_errors=True)
    assert daemon.internal_errors == []


@pytest.fixture
def xs(xsd):
    """A client connected to `xsd`."""
    from xvf.protocols.xenstore import XenStore

    c = XenStore(xsd.path, timeout=5)
    yield c
    c.close()
