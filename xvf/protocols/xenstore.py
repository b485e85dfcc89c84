"""Xenstore client speaking the xenstored wire protocol, plus the wire codec.

Wire format (Xen `xen/include/public/io/xs_wire.h`): every message is a
16-byte header `struct xsd_sockmsg {u32 type, req_id, tx_id, len}` in host
byte order, followed by `len` (<= XENSTORE_PAYLOAD_MAX = 4096) payload bytes,
usually NUL-terminated strings. Errors come back as type XS_ERROR with the
errno *name* as payload ("ENOENT\\0"). Watch events arrive unsolicited as
XS_WATCH_EVENT with payload "path\\0token\\0".

The client is synchronous: a request blocks until its reply; watch events
that arrive in between are buffered and handed out by `pending_events()`.
It works over a unix socket (xenstored, or `xvf.platform.sim.xenstored`) or a
/dev/xen/xenbus-like character device (one message per read/write).
"""

from __future__ import annotations

import enum
import errno as _errno
import os
import select
import socket
import stat
import struct
import threading
import time
from typing import NamedTuple

from xvf.errors import PlatformUnavailable, XenStoreError

HEADER = struct.Struct("=IIII")
HEADER_SIZE = HEADER.size  # 16
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX


class XsType(enum.IntEnum):
    """enum xsd_sockmsg_type."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


XS_TYPE_COUNT = 23
XS_INVALID = 0xFFFF

# struct xsd_errors, in the header's order: the names travel on the wire.
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

DEFAULT_PATHS = (
    "/run/xenstored/socket",
    "/var/run/xenstored/socket",
    "/dev/xen/xenbus",
)


class XsMessage(NamedTuple):
    type: int
    req_id: int
    tx_id: int
    payload: bytes


def encode(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """One wire message. Refuses payloads xenstored would reject (E2BIG)."""
    if len(payload) > PAYLOAD_MAX:
        raise XenStoreError(f"payload of {len(payload)} bytes exceeds {PAYLOAD_MAX} (E2BIG)")
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


def decode(buf: bytes | bytearray) -> tuple[list[XsMessage], bytes]:
    """Split a byte stream into complete messages; returns (messages, leftover).

    Raises XenStoreError if a header announces more than PAYLOAD_MAX bytes:
    the stream cannot be trusted after that.
    """
    msgs: list[XsMessage] = []
    view = bytes(buf)
    pos = 0
    while len(view) - pos >= HEADER_SIZE:
        type_, req_id, tx_id, length = HEADER.unpack_from(view, pos)
        if length > PAYLOAD_MAX:
            raise XenStoreError(f"message announces {length} payload bytes (max {PAYLOAD_MAX})")
        end = pos + HEADER_SIZE + length
        if end > len(view):
            break
        msgs.append(XsMessage(type_, req_id, tx_id, view[pos + HEADER_SIZE : end]))
        pos = end
    return msgs, view[pos:]


def join_strings(*parts: str | bytes) -> bytes:
    """Payload of NUL-terminated strings, as xs.c sends them."""
    out = bytearray()
    for p in parts:
        out += p.encode() if isinstance(p, str) else p
        out += b"\0"
    return bytes(out)


def split_strings(payload: bytes) -> list[str]:
    """The NUL-terminated strings of a payload (a trailing unterminated tail is kept)."""
    if not payload:
        return []
    items = payload.split(b"\0")
    if items and items[-1] == b"":
        items.pop()
    return [i.decode("utf-8", "surrogateescape") for i in items]


def error_name(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode("ascii", "replace") or "EIO"


def _errno_of(name: str) -> int:
    return getattr(_errno, name, _errno.EIO)


class XenStoreRequestError(XenStoreError):
    """xenstored answered a request with XS_ERROR; `.name` is the errno name."""

    def __init__(self, op: str, path: str, name: str) -> None:
        self.name = name
        self.errno = _errno_of(name)
        super().__init__(f"xenstore {op} {path!r} failed: {name} ({os.strerror(self.errno)})")


class XenStore:
    """A synchronous xenstore connection with buffered watch events."""

    def __init__(self, path: str | None = None, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._buf = b""
        self._events: list[tuple[str, str]] = []
        self._req_id = 0
        self._lock = threading.RLock()
        self._broken: str | None = None
        self._sock: socket.socket | None = None
        self._fd = -1
        candidates = [path] if path is not None else self._default_candidates()
        errors: list[str] = []
        for cand in candidates:
            try:
                self._connect(cand)
                self.path = cand
                return
            except OSError as e:
                errors.append(f"{cand}: {e.strerror or e}")
        raise PlatformUnavailable(
            "cannot connect to xenstored ("
            + "; ".join(errors)
            + "); is xenstored (or the simulator's XenStored) running? Set $XENSTORED_PATH."
        )

    @staticmethod
    def _default_candidates() -> list[str]:
        env = os.environ.get("XENSTORED_PATH")
        return ([env] if env else []) + list(DEFAULT_PATHS)

    def _connect(self, path: str) -> None:
        st = os.stat(path)
        if stat.S_ISSOCK(st.st_mode):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(self.timeout)
                s.connect(path)
                s.setblocking(False)
            except OSError:
                s.close()
                raise
            self._sock = s
            self._fd = s.fileno()
        else:
            # The kernel's xenbus device takes one whole message per write.
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)

    # -- plumbing ---------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise XenStoreError("xenstore connection is closed")
        return self._fd

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._sock = None
        self._fd = -1
        self._broken = "closed"

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, why: str) -> XenStoreError:
        # After a timeout or EOF the stream position is unknown: never reuse it.
        self._broken = why
        return XenStoreError(f"xenstore connection broken: {why}")

    def _check_usable(self) -> None:
        if self._fd < 0:
            raise XenStoreError("xenstore connection is closed")
        if self._broken:
            raise XenStoreError(f"xenstore connection broken: {self._broken}")

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                n = 0
            except OSError as e:
                raise self._fail(f"write: {e.strerror}") from e
            view = view[n:]
            if view:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._fail(f"write timed out after {self.timeout}s")
                select.select([], [self._fd], [], left)

    def _fill(self, wait: float | None) -> bool:
        """Read what the fd has. `wait`: seconds to block for data (0 = poll).

        Returns False if nothing arrived within `wait`.
        """
        r, _, _ = select.select([self._fd], [], [], wait)
        if not r:
            return False
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return False
        except OSError as e:
            raise self._fail(f"read: {e.strerror}") from e
        if not chunk:
            raise self._fail("xenstored closed the connection")
        self._buf += chunk
        return True

    def _pop_message(self) -> XsMessage | None:
        """The next complete message in the buffer, or None."""
        if len(self._buf) < HEADER_SIZE:
            return None
        length = HEADER.unpack_from(self._buf, 0)[3]
        if length > PAYLOAD_MAX:
            raise self._fail(f"message announces {length} payload bytes (max {PAYLOAD_MAX})")
        if len(self._buf) < HEADER_SIZE + length:
            return None
        type_, req_id, tx_id, _ = HEADER.unpack_from(self._buf, 0)
        payload = self._buf[HEADER_SIZE : HEADER_SIZE + length]
        self._buf = self._buf[HEADER_SIZE + length :]
        return XsMessage(type_, req_id, tx_id, payload)

    def _stash_event(self, msg: XsMessage) -> None:
        parts = split_strings(msg.payload)
        if len(parts) >= 2:
            self._events.append((parts[0], parts[1]))

    def _request(self, type_: XsType, payload: bytes, tx: int = 0, what: str = "") -> bytes:
        with self._lock:
            self._check_usable()
            self._req_id = (self._req_id + 1) & 0xFFFFFFFF
            req_id = self._req_id
            deadline = time.monotonic() + self.timeout
            self._send(encode(type_, req_id, tx, payload), deadline)
            while True:
                msg = self._pop_message()
                if msg is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        why = f"no reply to {type_.name} {what!r} within {self.timeout}s"
                        raise self._fail(why)
                    self._fill(left)
                    continue
                if msg.type == XsType.WATCH_EVENT:
                    self._stash_event(msg)
                    continue
                if msg.req_id != req_id:
                    continue  # stale reply of an abandoned request: drop
                if msg.type == XsType.ERROR:
                    raise XenStoreRequestError(type_.name, what, error_name(msg.payload))
                if msg.type != type_:
                    raise self._fail(f"reply type {msg.type} to request {type_.name}")
                return msg.payload

    # -- requests ---------------------------------------------------------------

    def read_bytes(self, path: str, tx: int = 0) -> bytes | None:
        try:
            return self._request(XsType.READ, join_strings(path), tx, path)
        except XenStoreRequestError as e:
            if e.name == "ENOENT":
                return None
            raise

    def read(self, path: str, tx: int = 0) -> str | None:
        data = self.read_bytes(path, tx)
        return None if data is None else data.decode("utf-8", "surrogateescape")

    def write(self, path: str, value: str | bytes, tx: int = 0) -> None:
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        self._request(XsType.WRITE, path.encode() + b"\0" + data, tx, path)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self._request(XsType.MKDIR, join_strings(path), tx, path)

    def rm(self, path: str, tx: int = 0) -> None:
        self._request(XsType.RM, join_strings(path), tx, path)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        try:
            return split_strings(self._request(XsType.DIRECTORY, join_strings(path), tx, path))
        except XenStoreRequestError as e:
            if e.name == "ENOENT":
                return []
            if e.name == "E2BIG":
                return self._directory_part(path, tx)
            raise

    def _directory_part(self, path: str, tx: int) -> list[str]:
        """Large directories in chunks; restart if the node changed meanwhile."""
        for _ in range(16):
            names: list[str] = []
            offset = 0
            gen: str | None = None
            while True:
                reply = self._request(
                    XsType.DIRECTORY_PART, join_strings(path, str(offset)), tx, path
                )
                head, _, body = reply.partition(b"\0")
                if gen is None:
                    gen = head.decode("utf-8", "surrogateescape")
                elif head.decode("utf-8", "surrogateescape") != gen:
                    break  # changed under us
                done = body.endswith(b"\0\0") or body == b"\0"
                chunk = body[:-1] if done else body
                if not chunk and not done:
                    # A reply that neither advances nor ends would loop forever.
                    raise XenStoreError(f"DIRECTORY_PART of {path!r} made no progress")
                names += split_strings(chunk)
                offset += len(chunk)
                if done:
                    return names
        raise XenStoreError(f"directory {path!r} kept changing while listed")

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return split_strings(self._request(XsType.GET_PERMS, join_strings(path), tx, path))

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        self._request(XsType.SET_PERMS, join_strings(path, *perms), tx, path)

    def get_domain_path(self, domid: int) -> str:
        reply = self._request(XsType.GET_DOMAIN_PATH, join_strings(str(domid)), 0, str(domid))
        parts = split_strings(reply)
        if not parts:
            raise XenStoreError(f"empty GET_DOMAIN_PATH reply for domain {domid}")
        return parts[0]

    def watch(self, path: str, token: str) -> None:
        self._request(XsType.WATCH, join_strings(path, token), 0, path)

    def unwatch(self, path: str, token: str) -> None:
        self._request(XsType.UNWATCH, join_strings(path, token), 0, path)

    def reset_watches(self) -> None:
        self._request(XsType.RESET_WATCHES, b"", 0, "")

    def transaction_start(self) -> int:
        reply = self._request(XsType.TRANSACTION_START, b"\0", 0, "")
        try:
            return int(split_strings(reply)[0])
        except (IndexError, ValueError) as e:
            raise XenStoreError(f"bad transaction id reply {reply!r}") from e

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        """True if committed (or aborted as asked); False on EAGAIN: retry."""
        try:
            self._request(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx, f"tx {tx}")
        except XenStoreRequestError as e:
            if e.name == "EAGAIN":
                return False
            raise
        return True

    def introduce(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        payload = join_strings(str(domid), str(mfn), str(port))
        self._request(XsType.INTRODUCE, payload, 0, str(domid))

    def release(self, domid: int) -> None:
        self._request(XsType.RELEASE, join_strings(str(domid)), 0, str(domid))

    def is_domain_introduced(self, domid: int) -> bool:
        reply = self._request(XsType.IS_DOMAIN_INTRODUCED, join_strings(str(domid)), 0, "")
        return reply.startswith(b"T")

    # -- events -----------------------------------------------------------------

    def pending_events(self) -> list[tuple[str, str]]:
        """Watch events received so far, without blocking."""
        with self._lock:
            self._check_usable()
            while self._fill(0):
                pass
            while (msg := self._pop_message()) is not None:
                if msg.type == XsType.WATCH_EVENT:
                    self._stash_event(msg)
            events, self._events = self._events, []
            return events

    def has_pending_events(self) -> bool:
        """True if events were already read off the fd (while waiting for a reply).

        Those no longer make fileno() readable: an event loop polling fileno()
        must check this after issuing requests, or it may sleep on them.
        """
        if self._events:
            return True
        return len(self._buf) >= HEADER_SIZE and HEADER.unpack_from(self._buf, 0)[0] == int(
            XsType.WATCH_EVENT
        )

    def wait_events(self, timeout: float) -> list[tuple[str, str]]:
        """Block up to `timeout` seconds for at least one watch event."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.pending_events()
            left = deadline - time.monotonic()
            if events or left <= 0:
                return events
            with self._lock:
                self._fill(left)
