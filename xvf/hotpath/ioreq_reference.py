"""Pure-Python reference implementation of the ioreq hot path (`xvf.hotpath._ioreq`).

Not a fallback: xvf always runs the Cython module. This one is the specification
the Cython is checked against (tests/unit/test_ioreq_py.py runs the same access
sequences through both and compares every result) and the pure-Python side of the
benchmarks. Same classes, methods, counters and semantics as `_ioreq.pyx`:
`IrqLine`, `MmioState`, `IoreqServer`, `ServiceLoop`. Memory ordering against the
other side of the ioreq page relies on CPython executing each statement in program
order and on the flags byte being one single-byte store; that is enough on x86 (TSO)
and what the benchmarks measure, but only the Cython module has explicit fences.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import struct
import time
from collections.abc import Callable
from typing import Any

from xvf.errors import HypercallError, XvfError
from xvf.ratelimit import RateLimitedLog

log = logging.getLogger("xvf.ioreq")

MAX_QUEUES = 64
MAX_EVENTS = 64
KIND_EVTCHN, KIND_CALL, KIND_PYTHON = 1, 2, 3

# include/xvf/xen_ioreq.h
IOREQ_SIZE = 32
FLAGS_OFFSET = 30
TYPE_OFFSET = 31
STATE_MASK = 0x0F
DATA_IS_PTR_BIT = 0x10
DIR_BIT = 0x20  # dir=1: IOREQ_READ
STATE_IOREQ_READY = 1
STATE_IOREQ_INPROCESS = 2
STATE_IORESP_READY = 3
TYPE_COPY = 1
TYPE_INVALIDATE = 8  # broadcast when the guest's p2m drops a RAM page
# include/xvf/virtio_mmio.h
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
INT_VRING = 1
STATUS_DRIVER_OK = 4
STATUS_DEVICE_NEEDS_RESET = 64
# Xen public/hvm/dm_op.h, Linux uapi xen/privcmd.h
DMOP_SET_IRQ_LEVEL = 19
DM_OP_SIZE = 32
IOCTL_PRIVCMD_DM_OP = (ord("P") << 8) | 5 | (16 << 16)  # _IOC(_IOC_NONE, 'P', 5, 16)

_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1
_ONE = struct.pack("=Q", 1)
_HEAD = struct.Struct("<QQII")  # addr, data, count, size
_DATA = struct.Struct("<Q")
_EVENT_MASK = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP


def _width_mask(size: int) -> int:
    return _U64_MAX if size >= 8 else (1 << (size * 8)) - 1


class IrqLine:
    """A guest interrupt line driven with XEN_DMOP_set_irq_level through
    IOCTL_PRIVCMD_DM_OP (the simulator's subclass, in
    xvf.platform.sim.hotpath_reference, sends the dm_op over its control socket)."""

    def __init__(self, fd: int, domid: int, irq: int) -> None:
        self.fd = fd
        self.domid = domid
        self.irq = irq
        self.level = 0
        self.changes = 0

    def c_set(self, level: int) -> int:
        """0 or -errno, like the Cython `c_set`."""
        op = struct.pack("<II", DMOP_SET_IRQ_LEVEL, 0) + struct.pack(
            "<IB", self.irq, 1 if level else 0
        ).ljust(DM_OP_SIZE - 8, b"\0")
        rc = self.c_issue(op)
        if rc < 0:
            return rc
        self.level = level
        self.changes += 1
        return 0

    def c_issue(self, op: bytes) -> int:
        """Issue one xen_dm_op; 0 or -errno, like the Cython `c_issue`."""
        buf = ctypes.create_string_buffer(op, len(op))
        bufs = ctypes.create_string_buffer(struct.pack("=QQ", ctypes.addressof(buf), len(op)))
        arg = bytearray(struct.pack("=HH4xQ", self.domid, 1, ctypes.addressof(bufs)))
        try:
            fcntl.ioctl(self.fd, IOCTL_PRIVCMD_DM_OP, arg)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    def set(self, level: int) -> None:
        rc = self.c_set(level)
        if rc < 0:
            raise HypercallError(
                f"set_irq_level(irq {self.irq}, {level}) for domain {self.domid}", -rc
            )


class MmioState:
    """Register state shared by the hot path and the Python register file."""

    def __init__(self) -> None:
        self.status = 0
        self.int_status = 0
        self.handler: Any = None
        self.irq: IrqLine | None = None
        self.num_queues = 0
        self._kick_fds = [-1] * MAX_QUEUES
        self.notifies = 0
        self.ignored_notifies = 0
        self.hot_accesses = 0
        self.slow_accesses = 0
        self.interrupts = 0
        # token -> (server, vcpu, is_read) of accesses waiting for a backend (see _ioreq.pyx)
        self._defer_next = 0
        self._deferring: int | None = None  # None: not inside an access
        self._deferred: dict[int, tuple[Any, int, bool]] = {}
        self._handler_errors = RateLimitedLog(log)

    def defer_access(self) -> int:
        if self._deferring is None:
            return 0
        self._defer_next += 1
        self._deferring = self._defer_next
        return self._deferring

    def answer(self, token: int, value: int = 0) -> bool:
        entry = self._deferred.pop(token, None)
        if entry is None:
            if token and token == self._deferring:  # answered before its handler returned
                self._deferring = 0
                return True
            return False
        if entry[0] is None:
            return True
        return entry[0].c_answer(entry[1], value, entry[2])

    def answer_all(self) -> int:
        n = 0
        for token in list(self._deferred):
            try:
                n += self.answer(token)
            except Exception:
                log.exception("answering a deferred access failed")
        return n

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def c_begin(self) -> None:
        self._deferring = 0

    def c_end(self) -> int:
        token, self._deferring = self._deferring or 0, None
        return token

    @property
    def max_queues(self) -> int:
        return MAX_QUEUES

    def set_kick_fd(self, queue: int, fd: int) -> None:
        if queue >= MAX_QUEUES:
            raise XvfError(f"queue {queue} beyond the {MAX_QUEUES} queues xvf supports")
        self._kick_fds[queue] = fd

    def kick_fd(self, queue: int) -> int:
        return self._kick_fds[queue] if queue < MAX_QUEUES else -1

    def raise_interrupt(self, bits: int) -> None:
        old = self.int_status
        self.int_status = (old | bits) & _U32_MAX
        self.interrupts += 1
        if old == 0 and self.irq is not None and self.irq.c_set(1) < 0:
            log.error("raising irq %d failed", self.irq.irq)

    def ack_interrupt(self, bits: int) -> None:
        self.int_status &= ~bits & _U32_MAX
        if (
            self.int_status == 0
            and self.irq is not None
            and self.irq.level
            and self.irq.c_set(0) < 0
        ):
            log.error("lowering irq %d failed", self.irq.irq)

    def c_read(self, offset: int, size: int) -> int:
        if offset == INTERRUPT_STATUS and size == 4:
            self.hot_accesses += 1
            return self.int_status
        self.slow_accesses += 1
        try:
            value = int(self.handler.mmio_read(offset, size))
            if not 0 <= value <= _U64_MAX:
                raise OverflowError(f"register value {value} is not a u64")
            return value
        except Exception:
            self._handler_errors(
                logging.ERROR, "register read at %#x (size %d) failed", offset, size, exc_info=True
            )
            return 0

    def c_write(self, offset: int, size: int, value: int) -> None:
        if size == 4 and offset == QUEUE_NOTIFY:
            self.hot_accesses += 1
            queue = value & 0xFFFF  # upper bits: VIRTIO_F_NOTIFICATION_DATA
            fd = self._kick_fds[queue] if queue < MAX_QUEUES else -1
            # Notifies before DRIVER_OK or after NEEDS_RESET never reach a backend.
            if (
                fd < 0
                or not self.status & STATUS_DRIVER_OK
                or self.status & STATUS_DEVICE_NEEDS_RESET
            ):
                self.ignored_notifies += 1
                return
            self.notifies += 1
            try:
                if os.write(fd, _ONE) != 8:
                    self.ignored_notifies += 1
            except OSError:
                self.ignored_notifies += 1
            return
        if size == 4 and offset == INTERRUPT_ACK:
            self.hot_accesses += 1
            self.ack_interrupt(value & _U32_MAX)
            return
        self.slow_accesses += 1
        try:
            self.handler.mmio_write(offset, size, value)
        except Exception:
            self._handler_errors(
                logging.ERROR, "register write at %#x (size %d) failed", offset, size, exc_info=True
            )

    def access(self, offset: int, size: int, is_write: bool, value: int = 0) -> int:
        """One register access, as the ioreq path performs it (for tests and benchmarks)."""
        result = 0
        self.c_begin()
        if is_write:
            self.c_write(offset, size, value)
        else:
            result = self.c_read(offset, size)
        token = self.c_end()
        if token:
            self._deferred[token] = (None, 0, not is_write)
        return result


MAX_WINDOWS = 32  # devices per IOREQ server (libxl gives a guest at most 11)


class IoreqServer:
    """A guest's mapped synchronous ioreq page and the MMIO windows served through it."""

    def __init__(
        self,
        page: Any,
        nr_vcpus: int,
        base: int = 0,
        size: int = 0,
        device: MmioState | None = None,
    ) -> None:
        view = memoryview(page)
        if view.readonly:
            view.release()
            raise BufferError("the ioreq page must be writable")
        view = view.cast("B")
        if view.nbytes < nr_vcpus * IOREQ_SIZE:
            n = view.nbytes
            view.release()
            raise XvfError(f"ioreq page of {n} bytes cannot hold {nr_vcpus} vCPU slots")
        self._page: memoryview | None = view
        self.nr_vcpus = nr_vcpus
        self._windows: list[tuple[int, int, MmioState]] = []
        self.requests = 0
        self.bad_requests = 0
        self.invalidates = 0
        self.notify_vcpu: Callable[[int], object] | None = None
        if device is not None:
            self.add_window(base, size, device)

    def add_window(self, base: int, size: int, device: MmioState) -> None:
        if size <= 0 or base + size > 1 << 64:
            raise XvfError(f"MMIO window {base:#x}+{size:#x} is empty or wraps")
        for b, s, _ in self._windows:
            if base < b + s and b < base + size:
                raise XvfError(f"MMIO window {base:#x}+{size:#x} overlaps {b:#x}")
        if len(self._windows) >= MAX_WINDOWS:
            raise XvfError(f"one IOREQ server serves at most {MAX_WINDOWS} devices")
        self._windows.append((base, size, device))

    def remove_window(self, base: int) -> None:
        for i, (b, _, _) in enumerate(self._windows):
            if b == base:
                del self._windows[i]
                return
        raise XvfError(f"no MMIO window at {base:#x}")

    @property
    def windows(self) -> list[tuple[int, int, MmioState]]:
        return list(self._windows)

    def _window(self, addr: int) -> tuple[int, int, MmioState] | None:
        for w in self._windows:
            if 0 <= addr - w[0] < w[1]:
                return w
        return None

    def release(self) -> None:
        """Drop the reference to the page so the caller can unmap it."""
        if self._page is not None:
            self._page.release()
            self._page = None

    def vp_eport(self, vcpu: int) -> int:
        if self._page is None or vcpu >= self.nr_vcpus:
            raise XvfError(f"no vCPU {vcpu}")
        return struct.unpack_from("<I", self._page, vcpu * IOREQ_SIZE + 24)[0]

    def c_answer(self, vcpu: int, value: int, is_read: bool) -> bool:
        """Post the response of a deferred access of `vcpu`, then notify it."""
        page = self._page
        if page is None or vcpu >= self.nr_vcpus:
            return False
        base = vcpu * IOREQ_SIZE
        flags = page[base + FLAGS_OFFSET]
        if flags & STATE_MASK != STATE_IOREQ_INPROCESS:
            return False
        if is_read:
            size = _HEAD.unpack_from(page, base)[3]
            _DATA.pack_into(page, base + 8, value & _width_mask(size))
        page[base + FLAGS_OFFSET] = (flags & ~STATE_MASK) | STATE_IORESP_READY
        if self.notify_vcpu is not None:
            self.notify_vcpu(vcpu)
        return True

    def slot_state(self, vcpu: int) -> int:
        """The state of `vcpu`'s slot (-1: no such slot, or the page is released)."""
        page = self._page
        if page is None or vcpu >= self.nr_vcpus:
            return -1
        return page[vcpu * IOREQ_SIZE + FLAGS_OFFSET] & STATE_MASK

    def service(self, vcpu: int) -> bool:
        """Serve the slot of `vcpu` if it holds a request; True if a response was posted."""
        page = self._page
        if page is None or vcpu >= self.nr_vcpus:
            return False
        base = vcpu * IOREQ_SIZE
        flags = page[base + FLAGS_OFFSET]
        if flags & STATE_MASK != STATE_IOREQ_READY:
            return False
        page[base + FLAGS_OFFSET] = (flags & ~STATE_MASK) | STATE_IOREQ_INPROCESS
        self.requests += 1
        is_read = bool(flags & DIR_BIT)
        addr, data, count, size = _HEAD.unpack_from(page, base)
        if page[base + TYPE_OFFSET] == TYPE_INVALIDATE:
            self.invalidates += 1  # only an answer is wanted (see _ioreq.pyx)
            if is_read:  # never from Xen; answered like any read that is no MMIO access
                _DATA.pack_into(page, base + 8, _U64_MAX)
        elif (
            page[base + TYPE_OFFSET] != TYPE_COPY
            or flags & DATA_IS_PTR_BIT
            or count != 1
            or size == 0
            or size > 8
            or (window := self._window(addr)) is None
        ):
            # Not an access virtio-mmio can be asked for on Arm: answer, never hang the vCPU.
            self.bad_requests += 1
            if is_read:
                _DATA.pack_into(page, base + 8, _U64_MAX)
        else:
            device = window[2]
            device.c_begin()
            if is_read:
                value = device.c_read(addr - window[0], size) & _width_mask(size)
                _DATA.pack_into(page, base + 8, value)
            else:
                device.c_write(addr - window[0], size, data & _width_mask(size))
            token = device.c_end()
            if token:  # answered later by MmioState.answer()
                device._deferred[token] = (self, vcpu, is_read)
                return False
        # The flags byte is the publication point: one single-byte store, last.
        page[base + FLAGS_OFFSET] = (flags & ~STATE_MASK) | STATE_IORESP_READY
        return True

    c_service = service


class ServiceLoop:
    """epoll over the event channel, backends' call fds and Python callbacks."""

    def __init__(self, evtchn: Any) -> None:
        self._ep = select.epoll()
        self.evtchn = evtchn
        self._routes: dict[int, tuple[IoreqServer, int]] = {}
        self._fds: dict[int, tuple[int, Any]] = {}
        self.wakeups = 0
        self.evtchn_errors = 0
        self.evtchn_lost = False  # its other end went away (see _ioreq.pyx)
        self.poll_ns = 0
        self._masked: list[int] = []  # read while polling, unmasked before sleeping
        self._poll_next = 0
        self.polled = 0
        self.idle_spins = 0
        self._add(evtchn.fileno(), KIND_EVTCHN, None)

    def __del__(self) -> None:
        ep = getattr(self, "_ep", None)
        if ep is not None:
            ep.close()

    def _add(self, fd: int, kind: int, obj: Any) -> None:
        self._ep.register(fd, select.EPOLLIN)
        self._fds[fd] = (kind, obj)

    def remove_fd(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except OSError:
                pass

    def add_call_fd(self, fd: int, device: MmioState) -> None:
        """A backend's call eventfd: each signal sets the used-buffer interrupt."""
        self._add(fd, KIND_CALL, device)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self._add(fd, KIND_PYTHON, callback)

    def add_route(self, port: int, server: IoreqServer, vcpu: int) -> None:
        if server.slot_state(vcpu) < 0:
            raise XvfError(f"vCPU {vcpu} has no slot in this ioreq page")
        self._routes[port] = (server, vcpu)

    def remove_route(self, port: int) -> None:
        self._unmask_deferred()
        self._routes.pop(port, None)

    def set_polling(self, poll_us: float) -> None:
        if not 0 <= poll_us <= 1e6:
            raise XvfError(f"poll time {poll_us} µs is outside 0..1000000")
        self._unmask_deferred()
        self.poll_ns = int(poll_us * 1000)

    def _unmask_deferred(self) -> None:
        for port in self._masked:
            try:
                self.evtchn.unmask(port)
            except Exception:
                pass
        self._masked.clear()

    def _spin(self) -> int:
        """The port of a routed slot holding a READY request, within poll_ns; else -1."""
        deadline = time.monotonic_ns() + self.poll_ns
        ports = list(self._routes)
        while True:
            # From the slot after the last one served (round robin, as _ioreq.pyx).
            for k in range(len(ports)):
                i = (self._poll_next + k) % len(ports)
                server, vcpu = self._routes[ports[i]]
                if server.slot_state(vcpu) == STATE_IOREQ_READY:
                    self._poll_next = i + 1
                    return ports[i]
            if time.monotonic_ns() >= deadline:
                return -1
            time.sleep(0)  # the GIL: the Cython spin runs without it

    def _on_evtchn(self) -> None:
        evtchn = self.evtchn
        while True:
            try:
                ports = evtchn.read_pending(64)
            except Exception as exc:
                self.evtchn_errors += 1
                log.error("reading the event channel failed: %s", exc)
                return
            if not ports:
                return
            for port in ports:
                if self.poll_ns and port in self._routes:
                    self._masked.append(port)  # unmasked before the loop sleeps
                else:
                    # Unmask first: a notification racing with our response is kept pending.
                    try:
                        evtchn.unmask(port)
                    except Exception:
                        pass
                route = self._routes.get(port)
                if route is None:
                    continue
                if route[0].service(route[1]):
                    try:
                        evtchn.notify(port)
                    except Exception:
                        pass
            if len(ports) < 64:
                return

    def _on_call(self, fd: int, device: MmioState) -> None:
        try:
            data = os.read(fd, 8)
        except OSError:
            return
        if len(data) == 8:
            device.raise_interrupt(INT_VRING)

    def run_once(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for events and handle them; returns the number handled."""
        timeout = timeout_ms / 1000 if timeout_ms >= 0 else -1
        if self.poll_ns and self._routes and timeout_ms != 0:
            events = self._ep.poll(0, MAX_EVENTS)
            if events:
                self._unmask_deferred()  # no spin this time (see _ioreq.pyx)
            else:
                port = self._spin()
                if port >= 0:
                    server, vcpu = self._routes[port]
                    if server.service(vcpu):
                        self.polled += 1
                        try:
                            self.evtchn.notify(port)
                        except Exception:
                            pass
                    return 1
                self.idle_spins += 1
                self._unmask_deferred()
                events = self._ep.poll(timeout, MAX_EVENTS)
        else:
            self._unmask_deferred()
            events = self._ep.poll(timeout, MAX_EVENTS)
        self.wakeups += 1
        for fd, mask in events:
            entry = self._fds.get(fd)
            if entry is None:
                continue
            kind = entry[0]
            if kind == KIND_EVTCHN:
                if mask & (select.EPOLLHUP | select.EPOLLERR):
                    self.evtchn_lost = True
                    continue
                self._on_evtchn()
            elif kind == KIND_CALL:
                self._on_call(fd, entry[1])
            else:
                try:
                    entry[1]()
                except Exception:
                    log.exception("handler for fd %d failed", fd)
        return len(events)
