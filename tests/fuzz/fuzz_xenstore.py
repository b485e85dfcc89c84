"""Fuzz target: hostile xenstore peers, on both sides of the wire, and hostile node values.

Three harnesses, one oracle each:

- `DaemonHarness`: a client sends the simulator's xenstored any byte stream
  (then maybe hangs up mid-message). The daemon thread keeps running, records
  no internal error, and a second, well-behaved client still gets correct
  answers (write/read/directory/watch) afterwards.
- `ClientHarness`: a scripted "xenstored" answers with any bytes, then
  hangs up. Every `xvf.protocols.xenstore.XenStore` call returns a well-typed value or
  raises XenStoreError; nothing else escapes, nothing waits for the timeout.
- `check_discovery`: any values in a device's nodes give either a
  VirtioDeviceNode inside the virtio MMIO window and SPI range, or ConfigError.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import tempfile

from tests.fuzz._common import Bytes, run_atheris, tmp_root
from xvf.daemon import discovery as D
from xvf.errors import ConfigError, XenStoreError
from xvf.platform.sim.xenstored import XenStored
from xvf.protocols.xenbus import COMPATIBLE_PREFIX
from xvf.protocols.xenstore import XenStore

HEADER = struct.Struct("=IIII")


class DaemonHarness:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xvf-fzxs-", dir=tmp_root())
        self.path = os.path.join(self.dir, "xs.sock")
        self.daemon = XenStored(self.path).start()
        self.good = XenStore(self.path, timeout=5.0)
        self.rounds = 0

    def close(self) -> None:
        self.good.close()
        self.daemon.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def check(self, stream: bytes, hang_up_early: bool) -> None:
        hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hostile.connect(self.path)
        hostile.settimeout(5.0)
        try:
            hostile.sendall(stream)
            if hang_up_early:
                hostile.close()
            else:
                # A round trip on the hostile connection proves the daemon read
                # (and answered, or dropped) everything before it; if it was
                # dropped, the read just ends.
                hostile.shutdown(socket.SHUT_WR)
                while hostile.recv(65536):
                    pass
        except OSError:
            pass  # the daemon dropped us (oversized header, unread output): allowed
        finally:
            hostile.close()
        self.assert_healthy()

    def assert_healthy(self) -> None:
        d = self.daemon
        assert d._thread is not None and d._thread.is_alive(), "xenstored thread died"
        assert not d.internal_errors, d.internal_errors[0]
        self.rounds += 1
        key = f"/fuzz/check{self.rounds % 4}"
        value = f"v{self.rounds}"
        self.good.write(key, value)
        assert self.good.read(key) == value
        assert f"check{self.rounds % 4}" in self.good.directory("/fuzz")
        token = f"t{self.rounds}"
        self.good.watch(key, token)
        assert (key, token) in self.good.wait_events(5.0)
        self.good.unwatch(key, token)
        self.good.pending_events()


# -- the client against a hostile daemon ------------------------------------------------

N_CLIENT_CALLS = 12


def client_call(xs: XenStore, which: int) -> None:
    which %= N_CLIENT_CALLS
    if which == 0:
        v = xs.read("/a")
        assert v is None or isinstance(v, str)
    elif which == 1:
        assert all(isinstance(n, str) for n in xs.directory("/a"))
    elif which == 2:
        assert xs.write("/a", "x") is None
    elif which == 3:
        assert isinstance(xs.transaction_start(), int)
    elif which == 4:
        assert isinstance(xs.transaction_end(1), bool)
    elif which == 5:
        assert isinstance(xs.get_domain_path(1), str)
    elif which == 6:
        assert isinstance(xs.is_domain_introduced(1), bool)
    elif which == 7:
        assert all(isinstance(p, str) for p in xs.get_perms("/a"))
    elif which == 8:
        xs.watch("/a", "t")
    elif which == 9:
        events = xs.pending_events()
        assert all(isinstance(p, str) and isinstance(t, str) for p, t in events)
    elif which == 10:
        assert all(isinstance(n, str) for n in xs._directory_part("/a", 0))
    else:
        devices, errors = D.read_virtio_devices(xs, 0)
        for dev in devices:
            assert_valid_device(dev)
        assert all(isinstance(e, ConfigError) for e in errors)


class ClientHarness:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xvf-fzxc-", dir=tmp_root())
        self.path = os.path.join(self.dir, "xs.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(4)

    def close(self) -> None:
        self.srv.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def check(self, reply: bytes, calls: list[int]) -> None:
        xs = XenStore(self.path, timeout=5.0)
        conn, _ = self.srv.accept()
        try:
            if reply:
                conn.sendall(reply)
            conn.shutdown(socket.SHUT_WR)
            for which in calls:
                try:
                    client_call(xs, which)
                except XenStoreError:
                    pass
        finally:
            xs.close()
            conn.close()


# -- device nodes ----------------------------------------------------------------------

KEYS = ("type", "transport", "base", "irq", "grant_usage")


def assert_valid_device(dev: D.VirtioDeviceNode) -> None:
    assert D.GUEST_VIRTIO_MMIO_BASE <= dev.base
    assert dev.base + D.VIRTIO_MMIO_DEV_SIZE <= D.GUEST_VIRTIO_MMIO_BASE + D.GUEST_VIRTIO_MMIO_SIZE
    assert dev.base % D.VIRTIO_MMIO_DEV_SIZE == 0
    assert D.GUEST_VIRTIO_MMIO_SPI_FIRST <= dev.irq <= D.GUEST_VIRTIO_MMIO_SPI_LAST
    assert 0 <= dev.device_id < 2**32
    assert int(dev.compatible.removeprefix(COMPATIBLE_PREFIX), 16) == dev.device_id
    assert dev.transport == "mmio"


# What libxl writes and strtoul(3) reads: ASCII decimal, octal or 0x-hex.
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+", re.ASCII)


def check_discovery(values: dict[str, str | None], backend_domid: int = 0) -> None:
    try:
        dev = D.parse_device("/p", 1, 0, values, backend_domid)
    except ConfigError:
        return
    assert_valid_device(dev)
    for key in ("base", "irq"):
        raw = (values[key] or "").strip()
        assert _NUMBER.fullmatch(raw), f"{key} {raw!r} accepted as a number"


_daemon: DaemonHarness | None = None
_client: ClientHarness | None = None


def one_input(data: bytes) -> None:
    """Byte 0 picks the harness: daemon stream, client reply (+ calls), or node values."""
    global _daemon, _client
    b = Bytes(data)
    mode = b.u8() % 3
    if mode == 0:
        if _daemon is None:
            _daemon = DaemonHarness()
        early = bool(b.u8() & 1)
        _daemon.check(b.rest(), early)
    elif mode == 1:
        if _client is None:
            _client = ClientHarness()
        calls = list(b.take(3))
        _client.check(b.rest(), calls)
    else:
        parts = b.rest().split(b"\xff")
        values = {
            k: (parts[i].decode("utf-8", "surrogateescape") if i < len(parts) else None)
            for i, k in enumerate(KEYS)
        }
        check_discovery(values, backend_domid=len(parts) % 2)


if __name__ == "__main__":
    run_atheris(one_input)
