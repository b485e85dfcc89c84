"""Event channels of the software Xen, with Linux /dev/xen/evtchn handle semantics.

Ports are per domain. A Dom0 process holds handles (one end of a SOCK_SEQPACKET
socketpair, so that each write() stays one message as on the real device): a
port that fires is written to the handle as a u32 and masked until the process
writes the number back. IOCTL_EVTCHN_NOTIFY, which a socket cannot take, is a
written port number with NOTIFY_BIT set (xvf.platform.sim._hotpath.SimEventChannel). Guest-side
ports wake a callback (a vCPU waiting for its ioreq to complete).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xvf.errors import SimulatorError
from xvf.hotpath._evtchn import DOMID_SELF

log = logging.getLogger("xvf.platform.sim.evtchn")

NOTIFY_BIT = 0x80000000
_U32 = struct.Struct("<I")


@dataclass
class Port:
    domid: int
    number: int
    remote_domid: int  # who may bind (unbound) or is bound (interdomain)
    remote_port: int = 0
    bound: bool = False
    handle: Handle | None = None  # set for ports owned by a Dom0 process
    on_event: Callable[[], None] | None = None  # set for guest-side ports
    masked: bool = False
    pending: bool = False


@dataclass
class Handle:
    id: int
    sock: socket.socket
    ports: set[int] = field(default_factory=set)


class EventChannels:
    """All ports of all domains, and the I/O thread serving Dom0 handles."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._ports: dict[int, dict[int, Port]] = {}
        self._handles: dict[int, Handle] = {}
        self._next_handle = 1
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="sim-evtchn", daemon=True)
        self._thread.start()

    # -- domains and ports ---------------------------------------------
    def add_domain(self, domid: int) -> None:
        with self._lock:
            self._ports.setdefault(domid, {})

    def remove_domain(self, domid: int) -> None:
        with self._lock:
            for port in list(self._ports.get(domid, {}).values()):
                self._close_port(port)
            self._ports.pop(domid, None)

    def _alloc(self, domid: int, remote_domid: int) -> Port:
        ports = self._ports.get(domid)
        if ports is None:
            raise SimulatorError(f"no domain {domid}")
        number = 1  # port 0 is never valid in Xen
        while number in ports:
            number += 1
        port = Port(domid=domid, number=number, remote_domid=remote_domid)
        ports[number] = port
        return port

    def alloc_unbound(self, domid: int, remote_domid: int, on_event: Callable[[], None]) -> int:
        """EVTCHNOP_alloc_unbound in a guest: the port a vCPU's ioreqs are signalled on."""
        with self._lock:
            port = self._alloc(domid, remote_domid)
            port.on_event = on_event
            return port.number

    def _close_port(self, port: Port) -> None:
        if port.bound:
            peer = self._ports.get(port.remote_domid, {}).get(port.remote_port)
            if peer is not None and peer.bound:
                peer.bound = False  # the peer goes back to unbound, as in Xen
        if port.handle is not None:
            port.handle.ports.discard(port.number)
        self._ports.get(port.domid, {}).pop(port.number, None)

    def close_port(self, domid: int, number: int) -> None:
        with self._lock:
            port = self._ports.get(domid, {}).get(number)
            if port is not None:
                self._close_port(port)

    # -- Dom0 handles ----------------------------------------------------
    def open_handle(self) -> tuple[int, socket.socket]:
        """A new /dev/xen/evtchn open; returns the handle id and the process's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        with self._lock:
            handle = Handle(id=self._next_handle, sock=ours)
            self._next_handle += 1
            self._handles[handle.id] = handle
            self._selector.register(ours, selectors.EVENT_READ, handle)
        os.write(self._wake_w, b"x")
        return handle.id, theirs

    def bind_unbound(self, handle_id: int, remote_domid: int) -> int:
        """IOCTL_EVTCHN_BIND_UNBOUND_PORT from Dom0: a port of Dom0's that `remote_domid`
        (DOMID_SELF: Dom0 itself, a loopback channel) may bind, owned by the handle."""
        with self._lock:
            handle = self._handle(handle_id)
            port = self._alloc(0, 0 if remote_domid == DOMID_SELF else remote_domid)
            port.handle = handle
            handle.ports.add(port.number)
            return port.number

    def bind_interdomain(self, handle_id: int, remote_domid: int, remote_port: int) -> int:
        """IOCTL_EVTCHN_BIND_INTERDOMAIN from Dom0 (domain 0); DOMID_SELF is Dom0."""
        if remote_domid == DOMID_SELF:
            remote_domid = 0
        with self._lock:
            handle = self._handle(handle_id)
            remote = self._ports.get(remote_domid, {}).get(remote_port)
            if remote is None or remote.bound or remote.remote_domid != 0:
                raise OSError(22, f"port {remote_port} of domain {remote_domid} is not bindable")
            local = self._alloc(0, remote_domid)
            local.remote_port = remote_port
            local.bound = True
            local.handle = handle
            remote.remote_port = local.number
            remote.bound = True
            handle.ports.add(local.number)
            # As Xen's evtchn_bind_interdomain: "we may have lost notifications on the
            # remote unbound port", so the new local port is always made pending once.
            self._deliver(local)
            return local.number

    def _handle(self, handle_id: int) -> Handle:
        handle = self._handles.get(handle_id)
        if handle is None:
            raise OSError(9, "bad event channel handle")  # EBADF
        return handle

    def unbind(self, handle_id: int, number: int) -> None:
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is None or number not in handle.ports:
                raise OSError(22, f"port {number} is not bound by this handle")
            self._close_port(self._ports[0][number])

    def _close_handle(self, handle: Handle) -> None:
        with self._lock:
            for number in list(handle.ports):
                port = self._ports.get(0, {}).get(number)
                if port is not None:
                    self._close_port(port)
            self._handles.pop(handle.id, None)
        try:
            self._selector.unregister(handle.sock)
        except (KeyError, ValueError):
            pass
        handle.sock.close()

    # -- lending a handle to a process outside the simulator ------------------
    def lend_handle(
        self, domid: int, timeout: float = 2.0
    ) -> tuple[Handle, dict[int, int], dict[int, int]]:
        """Stop serving the Dom0 handle bound to `domid`'s ports, so that another
        process (the benchmarks' C guest) can play this side of it; returns the handle,
        {guest port: Dom0 port} and the handle's loopback channels {port: its peer} (a
        notify of one is delivered as the other: the device model's own wake-up). Every
        port of the handle must be `domid`'s or such a loopback, and idle (unmasked,
        nothing pending): what the other process starts from; the device model's last
        unmask may still be on its way, so this waits up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._lend_idle_handle(domid)
            except SimulatorError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _lend_idle_handle(self, domid: int) -> tuple[Handle, dict[int, int], dict[int, int]]:
        with self._lock:
            owners = [
                h
                for h in self._handles.values()
                if any(self._ports[0][n].remote_domid == domid for n in h.ports)
            ]
            if len(owners) != 1:
                raise SimulatorError(f"{len(owners)} handles hold ports of domain {domid}")
            (handle,) = owners
            ports = [self._ports[0][n] for n in handle.ports]
            guest = [p for p in ports if p.remote_domid == domid]
            loop = [
                p
                for p in ports
                if p.remote_domid == 0 and p.bound and p.remote_port in handle.ports
            ]
            if len(guest) + len(loop) != len(ports) or any(p.masked or p.pending for p in ports):
                raise SimulatorError(f"the handle of domain {domid} is shared or busy")
            self._selector.unregister(handle.sock)
        os.write(self._wake_w, b"x")
        return (
            handle,
            {p.remote_port: p.number for p in guest},
            {p.number: p.remote_port for p in loop},
        )

    def take_back(self, handle: Handle) -> None:
        """Serve a lent handle again (the borrower left its ports unmasked)."""
        with self._lock:
            if handle.id in self._handles:
                self._selector.register(handle.sock, selectors.EVENT_READ, handle)
        os.write(self._wake_w, b"x")

    # -- signalling ------------------------------------------------------
    def notify(self, domid: int, number: int) -> None:
        """EVTCHNOP_send from `domid`'s port `number` to its peer."""
        with self._lock:
            port = self._ports.get(domid, {}).get(number)
            if port is None or not port.bound:
                return  # Xen silently drops sends on unbound ports
            peer = self._ports.get(port.remote_domid, {}).get(port.remote_port)
            if peer is None:
                return
            self._deliver(peer)

    def _deliver(self, port: Port) -> None:
        if port.on_event is not None:
            port.on_event()
            return
        if port.handle is None:
            return
        if port.masked:
            port.pending = True
            return
        port.masked = True
        try:
            port.handle.sock.send(_U32.pack(port.number))
        except OSError:
            port.pending = True  # the process is gone or not reading; keep it pending

    def _on_handle_data(self, handle: Handle) -> None:
        while True:
            try:
                data = handle.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_handle(handle)
                return
            # Like evtchn_write(): a write is cut down to whole 4-byte words.
            self._on_words(handle, data[: len(data) - len(data) % 4])

    def _on_words(self, handle: Handle, data: bytes) -> None:
        for (word,) in _U32.iter_unpack(data):
            number = word & ~NOTIFY_BIT
            with self._lock:
                if number not in handle.ports:
                    continue  # not ours: Linux returns EINVAL, we ignore
                if word & NOTIFY_BIT:
                    self.notify(0, number)
                    continue
                port = self._ports[0][number]
                port.masked = False
                if port.pending:
                    port.pending = False
                    self._deliver(port)

    def _serve(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=0.5):
                if key.data is None:
                    os.read(self._wake_r, 64)
                    continue
                self._on_handle_data(key.data)

    def close(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        for handle in list(self._handles.values()):
            self._close_handle(handle)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
