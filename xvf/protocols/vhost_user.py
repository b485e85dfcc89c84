"""vhost-user front-end: one synchronous connection to a backend's unix socket.

The daemon is single-threaded and calls these methods from its event loop, so
every call either completes or raises `VhostUserError` within `timeout`
seconds; nothing here blocks for longer. Replies are checked strictly (request
echo, flags, exact size, no stray fds). After a protocol violation the socket is
shut down (the backend sees a disconnect, the event loop sees EOF on `fileno()`)
and every later call raises. Layouts live in `xvf.protocols.vhost_user_wire`.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from typing import NoReturn

from xvf.errors import VhostUserError
from xvf.protocols.vhost_user_wire import (
    CONFIG_HDR,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_MEM_REGIONS,
    VERSION,
    VERSION_MASK,
    VRING_IDX_MASK,
    ProtocolFeature,
    Request,
    VhostUserRegion,
    check_config_range,
    decode_config,
    decode_header,
    decode_u64,
    decode_vring_state,
    encode_config,
    encode_header,
    encode_mem_table,
    encode_single_region,
    encode_u64,
    encode_vring_addr,
    encode_vring_fd,
    encode_vring_state,
    request_name,
)

__all__ = ["VhostUserError", "VhostUserFrontend", "VhostUserRegion"]

log = logging.getLogger("xvf.protocols.vhost_user")

# Room for this many fds in the ancillary buffer of a reply: none is ever
# expected, but a hostile backend's fds must be received (then closed) rather
# than silently dropped by a too-small buffer.
_ANC_FDS = 16
_ANC_SIZE = socket.CMSG_SPACE(_ANC_FDS * array.array("i").itemsize)


def _region_key(r: VhostUserRegion) -> tuple[int, ...]:
    """What identifies a region to the backend (the fd number is only the carrier)."""
    return (r.gpa, r.size, r.uva, r.fd_offset, r.xen_mmap_flags, r.domid)


class VhostUserFrontend:
    """Front-end side of the vhost-user protocol (QEMU docs/interop/vhost-user.rst)."""

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = 5.0,
        mem_timeout: float | None = None,
        label: str = "",
    ) -> None:
        """`timeout` bounds each message; `mem_timeout` (never less) the replies to the
        memory-table messages, for which a backend maps the guest's memory: seconds
        for a big guest, or for a small one on a loaded emulated host."""
        self.socket_path = socket_path
        # What log lines say first: the guest and device (domN/typeM) when known.
        self.who = f"{label} ({socket_path})" if label else socket_path
        self.timeout = timeout
        self.mem_timeout = max(timeout, mem_timeout if mem_timeout is not None else timeout)
        self.backend_features = 0  # from the last GET_FEATURES
        self.offered_protocol_features = 0  # from GET_PROTOCOL_FEATURES
        self.protocol_features = 0  # acked by SET_PROTOCOL_FEATURES
        self.acked_features = 0  # sent by SET_FEATURES
        self.queue_num: int | None = None  # GET_QUEUE_NUM, when MQ is negotiated
        self.max_mem_slots: int | None = None  # GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS)
        self.mem_regions: list[VhostUserRegion] = []  # what the backend holds now
        # ADD_MEM_REG: our dup of each region's fd, sent again with its REM_MEM_REG (the
        # caller's copy may be closed by then; a stale fd number could be another file).
        self._region_fds: dict[tuple[int, ...], int] = {}
        self._broken: str | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            raise VhostUserError(
                f"cannot connect to vhost-user backend at {socket_path}: {reason}"
            ) from exc
        self._sock: socket.socket | None = sock

    # -- lifecycle ------------------------------------------------------------------
    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def shutdown(self) -> None:
        """Wake any thread waiting on this connection (it then sees EOF); safe from
        any thread, unlike close()."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        for fd in self._region_fds.values():
            os.close(fd)
        self._region_fds.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VhostUserFrontend({self.socket_path!r})"

    # -- handshake (the order is the device's: xvf.device) ---------------------------
    def set_owner(self) -> None:
        self._set(Request.SET_OWNER)

    def get_features(self) -> int:
        self.backend_features = self._get_u64(Request.GET_FEATURES)
        return self.backend_features

    def set_features(self, features: int) -> None:
        self._set(Request.SET_FEATURES, encode_u64(features))
        self.acked_features = features

    def get_protocol_features(self) -> int:
        self._require_protocol_features_bit(Request.GET_PROTOCOL_FEATURES)
        self.offered_protocol_features = self._get_u64(Request.GET_PROTOCOL_FEATURES)
        return self.offered_protocol_features

    def set_protocol_features(self, features: int) -> None:
        self._require_protocol_features_bit(Request.SET_PROTOCOL_FEATURES)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise VhostUserError(
                f"{self.socket_path}: acking protocol features {extra:#x} the backend "
                f"did not offer (offered {self.offered_protocol_features:#x})"
            )
        # Never with NEED_REPLY, like QEMU: REPLY_ACK is only being negotiated here
        # and rust-vmm acks this message only if the new set contains REPLY_ACK.
        self._send(Request.SET_PROTOCOL_FEATURES, 0, encode_u64(int(features)))
        self.protocol_features = int(features)

    def get_max_mem_slots(self) -> int:
        self._require(ProtocolFeature.CONFIGURE_MEM_SLOTS, Request.GET_MAX_MEM_SLOTS)
        self.max_mem_slots = self._get_u64(Request.GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    def get_queue_num(self) -> int:
        self._require(ProtocolFeature.MQ, Request.GET_QUEUE_NUM)
        self.queue_num = self._get_u64(Request.GET_QUEUE_NUM)
        return self.queue_num

    # -- config space -----------------------------------------------------------------
    def get_config(self, offset: int, size: int) -> bytes:
        self._require(ProtocolFeature.CONFIG, Request.GET_CONFIG)
        check_config_range(offset, size)
        req = Request.GET_CONFIG
        self._send(req, 0, encode_config(offset, size))
        payload = self._recv_reply(req, (CONFIG_HDR.size + size, 0))
        if not payload:  # the spec's way of saying "error"
            raise VhostUserError(
                f"{self.socket_path}: backend refused GET_CONFIG at {offset} of {size} bytes"
            )
        r_offset, r_size, _, data = decode_config(payload)
        if (r_offset, r_size) != (offset, size):
            self._violation(
                f"answered GET_CONFIG at {offset} of {size} bytes with {r_size} bytes at {r_offset}"
            )
        return data

    def set_config(self, offset: int, data: bytes) -> None:
        self._require(ProtocolFeature.CONFIG, Request.SET_CONFIG)
        self._set(Request.SET_CONFIG, encode_config(offset, len(data), bytes(data)))

    # -- memory and rings -------------------------------------------------------------
    def set_mem_table(self, regions: list[VhostUserRegion]) -> None:
        """Regions carry Xen mmap descriptions iff XEN_MMAP was negotiated; a region
        that needs one (xen_mmap_flags != 0) on a backend without it is refused."""
        xen = bool(self.protocol_features & ProtocolFeature.XEN_MMAP)
        for r in regions:
            if r.fd < 0:
                raise VhostUserError(f"memory region at {r.gpa:#x} has no fd")
        payload = encode_mem_table(regions, xen)
        self._set(Request.SET_MEM_TABLE, payload, [r.fd for r in regions], self.mem_timeout)
        self.mem_regions = list(regions)

    def set_memory(self, regions: list[VhostUserRegion]) -> None:
        """Give the backend exactly `regions`: with CONFIGURE_MEM_SLOTS (as QEMU does)
        by removing the regions it holds that are not wanted any more and adding the
        new ones, which lifts SET_MEM_TABLE's limit of 8; without it, SET_MEM_TABLE."""
        if not self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            if len(regions) > MAX_MEM_REGIONS:
                raise VhostUserError(
                    f"{self.socket_path}: {len(regions)} memory regions needed but the "
                    f"backend takes {MAX_MEM_REGIONS} (no CONFIGURE_MEM_SLOTS)"
                )
            self.set_mem_table(regions)
            return
        if self.max_mem_slots is None:
            self.max_mem_slots = self._get_u64(Request.GET_MAX_MEM_SLOTS)
        if len(regions) > self.max_mem_slots:
            raise VhostUserError(
                f"{self.socket_path}: {len(regions)} memory regions needed but the backend "
                f"has {self.max_mem_slots} slots (GET_MAX_MEM_SLOTS)"
            )
        wanted = {_region_key(r): r for r in regions}
        held = {_region_key(r): r for r in self.mem_regions}
        xen = bool(self.protocol_features & ProtocolFeature.XEN_MMAP)
        for key, r in held.items():
            if key not in wanted:  # QEMU sends the region's fd along, and backends expect it
                fd = self._region_fds.pop(key)
                try:
                    self._set(
                        Request.REM_MEM_REG, encode_single_region(r, xen), [fd], self.mem_timeout
                    )
                finally:
                    os.close(fd)
                self.mem_regions.remove(r)
        for key, r in wanted.items():
            if key not in held:
                if r.fd < 0:
                    raise VhostUserError(f"memory region at {r.gpa:#x} has no fd")
                self._region_fds[key] = os.dup(r.fd)
                self.mem_regions.append(r)
                self._set(
                    Request.ADD_MEM_REG, encode_single_region(r, xen), [r.fd], self.mem_timeout
                )

    def set_vring_num(self, q: int, num: int) -> None:
        if not 0 < num <= 32768:
            raise VhostUserError(f"queue {q}: size {num} is not in 1..32768")
        self._set(Request.SET_VRING_NUM, encode_vring_state(self._q(q), num))

    def set_vring_base(self, q: int, base: int) -> None:
        if not 0 <= base <= 0xFFFF:
            raise VhostUserError(f"queue {q}: base {base} does not fit a split ring index")
        self._set(Request.SET_VRING_BASE, encode_vring_state(self._q(q), base))

    def get_vring_base(self, q: int) -> int:
        """Stops the ring; returns the next avail index the backend would process."""
        req = Request.GET_VRING_BASE
        self._send(req, 0, encode_vring_state(self._q(q), 0))
        index, num = decode_vring_state(self._recv_reply(req, (8,)))
        if index != q:
            self._violation(f"answered GET_VRING_BASE for queue {q} with queue {index}")
        return num

    def set_vring_addr(
        self, q: int, desc_uva: int, avail_uva: int, used_uva: int, flags: int = 0
    ) -> None:
        # virtio alignment rules; rust-vmm backends drop the connection otherwise.
        for name, addr, align in (
            ("desc", desc_uva, 16),
            ("avail", avail_uva, 2),
            ("used", used_uva, 4),
        ):
            if addr % align:
                raise VhostUserError(
                    f"queue {q}: {name} ring at {addr:#x} is not {align}-byte aligned"
                )
        payload = encode_vring_addr(self._q(q), flags, desc_uva, used_uva, avail_uva)
        self._set(Request.SET_VRING_ADDR, payload)

    def set_vring_kick(self, q: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_KICK, q, fd)

    def set_vring_call(self, q: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_CALL, q, fd)

    def set_vring_err(self, q: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_ERR, q, fd)

    def set_vring_enable(self, q: int, enabled: bool) -> None:
        # Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled and the message
        # is not allowed; with it they start disabled and DPDK waits for it.
        if not self.backend_features & F_PROTOCOL_FEATURES:
            return
        self._set(Request.SET_VRING_ENABLE, encode_vring_state(self._q(q), int(enabled)))

    # -- messages ---------------------------------------------------------------------
    def _q(self, q: int) -> int:
        if not 0 <= q <= VRING_IDX_MASK:
            raise VhostUserError(f"queue index {q} is outside 0..{VRING_IDX_MASK}")
        return q

    def _require(self, feature: ProtocolFeature, req: Request) -> None:
        if not self.protocol_features & feature:
            raise VhostUserError(
                f"{self.socket_path}: {req.name} needs protocol feature "
                f"{feature.name}, which was not negotiated"
            )

    def _require_protocol_features_bit(self, req: Request) -> None:
        if not self.backend_features & F_PROTOCOL_FEATURES:
            raise VhostUserError(
                f"{self.socket_path}: {req.name} needs "
                "VHOST_USER_F_PROTOCOL_FEATURES, which GET_FEATURES "
                "did not offer"
            )

    def _set_vring_fd(self, req: Request, q: int, fd: int | None) -> None:
        if fd is not None and fd < 0:
            raise VhostUserError(f"{req.name} for queue {q}: invalid fd {fd}")
        fds = [] if fd is None else [fd]
        self._set(req, encode_vring_fd(self._q(q), fd is not None), fds)

    def _get_u64(self, req: Request) -> int:
        self._send(req, 0, b"")
        return decode_u64(self._recv_reply(req, (8,)))

    def _set(
        self,
        req: Request,
        payload: bytes = b"",
        fds: list[int] | None = None,
        reply_timeout: float | None = None,
    ) -> None:
        """A message without a reply body; acked (and the ack checked) under REPLY_ACK,
        the ack awaited for `reply_timeout` (default: the connection's timeout)."""
        if not self.protocol_features & ProtocolFeature.REPLY_ACK:
            self._send(req, 0, payload, fds)
            return
        self._send(req, FLAG_NEED_REPLY, payload, fds)
        status = decode_u64(self._recv_reply(req, (8,), reply_timeout))
        if status != 0:
            raise VhostUserError(
                f"{self.socket_path}: backend failed {req.name} (reply-ack status {status:#x})"
            )

    def _live_socket(self) -> socket.socket:
        if self._sock is None:
            raise VhostUserError(f"connection to vhost-user backend {self.socket_path} is closed")
        if self._broken is not None:
            raise VhostUserError(f"{self._broken}; the connection is unusable")
        return self._sock

    def _send(self, req: Request, flags: int, payload: bytes, fds: list[int] | None = None) -> None:
        sock = self._live_socket()
        msg = encode_header(req, VERSION | flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s <- %s flags=%#x size=%d fds=%s",
                self.who,
                req.name,
                flags,
                len(payload),
                fds or [],
            )
        sent = 0
        try:
            sock.settimeout(self.timeout)
            sent = sock.sendmsg([msg], anc)
            while sent < len(msg):  # the fds went with the first chunk
                sent += sock.send(msg[sent:])
        except TimeoutError:
            self._fail(f"did not take {req.name} within {self.timeout} s")
        except (BrokenPipeError, ConnectionResetError):
            self._closed(req)
        except OSError as exc:
            if sent:  # part of a message went out: the stream is out of step
                self._fail(f"half-sent {req.name}: {exc.strerror or exc}")
            # Typically EBADF for one of our fds: nothing went out, the link is fine.
            raise VhostUserError(
                f"{self.socket_path}: sending {req.name} failed: {exc.strerror or exc}"
            ) from exc

    def _recv_reply(
        self, req: Request, sizes: tuple[int, ...], timeout: float | None = None
    ) -> bytes:
        """Read one reply to `req` whose payload size must be one of `sizes`, within
        `timeout` (default: the connection's)."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        fds: list[int] = []
        try:
            header = self._read_exact(HEADER_SIZE, deadline, fds, req, limit)
            code, flags, size = decode_header(header)
            if code != req:
                self._violation(f"answered {req.name} with {request_name(code)}")
            if flags & VERSION_MASK != VERSION:
                self._violation(f"answered {req.name} with protocol version {flags & VERSION_MASK}")
            if not flags & FLAG_REPLY:
                self._violation(f"answered {req.name} without the reply flag")
            if size not in sizes:
                want = " or ".join(str(s) for s in sizes)
                self._violation(f"answered {req.name} with {size} payload bytes, expected {want}")
            payload = self._read_exact(size, deadline, fds, req, limit)
            if fds:
                self._violation(
                    f"passed {len(fds)} file descriptor(s) with its reply to "
                    f"{req.name}, which carries none"
                )
        finally:
            for fd in fds:
                os.close(fd)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %s size=%d", self.who, req.name, size)
        return payload

    def _read_exact(
        self, n: int, deadline: float, fds: list[int], req: Request, limit: float
    ) -> bytes:
        sock = self._live_socket()
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not answer {req.name} within {limit} s")
            try:
                sock.settimeout(remaining)
                data, anc, _, _ = sock.recvmsg(n - len(buf), _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                self._fail(f"did not answer {req.name} within {limit} s")
            except ConnectionResetError:
                self._closed(req)
            except OSError as exc:
                self._fail(f"reading the reply to {req.name} failed: {exc.strerror or exc}")
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % array.array("i").itemsize
                    fds.extend(array.array("i", cdata[:usable]))
            if not data:
                self._closed(req)
            buf += data
        return bytes(buf)

    def _closed(self, req: Request) -> NoReturn:
        self._fail(f"closed the connection (during {req.name})")

    def _violation(self, what: str) -> NoReturn:
        self._fail(f"broke the protocol: {what}")

    def _fail(self, what: str) -> NoReturn:
        """Poison the connection: shut it down so the backend and the event loop
        both see it end, remember why, raise. The fd stays open until close()."""
        message = f"vhost-user backend {self.socket_path} {what}"
        self._broken = message
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise VhostUserError(message)
