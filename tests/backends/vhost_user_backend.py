"""A small backend-side vhost-user server for the reference devices.

It listens on a unix socket, serves one front-end at a time and accepts the next after a
disconnect. Requests are handled the way rust-vmm's vhost / vhost-user-backend crates handle
them (the real vhost-device backends are built on those), including their refusals: a request
that fails is NAKed when REPLY_ACK asked for it and then the connection is dropped, as rust-vmm
does. Queues are processed on kick-eventfd readiness in the same single thread, and used buffers
are signalled on the call eventfd.
"""

from __future__ import annotations

import argparse
import array
import logging
import os
import selectors
import signal
import socket
import sys
from collections.abc import Callable

from xvf.errors import GuestError, VhostUserError

from . import protocol as p
from .guest_memory import MAP_FD, GuestMemory, check_xen_mmap, map_xen_region
from .virtqueue import BadChain, Chain, RingError, Virtqueue

log = logging.getLogger(__name__)


class Disconnected(VhostUserError):
    """The front-end closed the socket."""


class Device:
    """What a device model tells the server. Subclasses override the class attributes and hooks."""

    name = "device"
    virtio_id = 0
    num_queues = 1
    queue_size = 256
    device_features = 0  # device-specific bits; the transport bits are added below
    protocol_features = p.bit(p.PF_MQ)

    @property
    def features(self) -> int:
        # What rust-vmm vhost-device backends offer: "libvhost defaults except LOG_ALL".
        return (
            self.device_features
            | p.bit(p.F_VERSION_1)
            | p.bit(p.F_NOTIFY_ON_EMPTY)
            | p.bit(p.F_INDIRECT_DESC)
            | p.bit(p.F_EVENT_IDX)
            | p.bit(p.F_PROTOCOL_FEATURES)
        )

    def config(self) -> bytes | None:
        """Config space bytes, or None when the device has none (no CONFIG protocol feature)."""
        return None

    def set_config(self, offset: int, data: bytes) -> None:
        raise VhostUserError(f"{self.name}: config space is read-only")

    def connection_reset(self, server: Server) -> None:
        """A front-end came or went: drop per-connection state (pending buffers)."""

    def set_features(self, features: int) -> None:
        """The driver's accepted feature bits."""

    def process(self, server: Server, vq: Virtqueue, chains: list[Chain | BadChain]) -> None:
        """Handle chains popped from `vq`; complete each with server.complete()."""
        raise NotImplementedError


class Server:
    def __init__(
        self,
        device: Device,
        socket_path: str,
        require_xen_mmap: bool = False,
        xen_mmap: bool = True,
    ) -> None:
        self.device = device
        self.socket_path = socket_path
        self.require_xen_mmap = require_xen_mmap
        self.protocol_features = device.protocol_features
        if xen_mmap:  # a rust-vmm build with its `xen` feature offers it; without, not
            self.protocol_features |= p.bit(p.PF_XEN_MMAP)
        self.queues = [Virtqueue(i, device.queue_size) for i in range(device.num_queues)]
        self.mem = GuestMemory()
        self.sel = selectors.DefaultSelector()
        self.conn: socket.socket | None = None
        self.listener: socket.socket | None = None
        self._reset_connection_state()
        self._handlers: dict[int, Callable[[int, bytes, list[int]], bytes | None]] = {
            p.GET_FEATURES: self._get_features,
            p.SET_FEATURES: self._set_features,
            p.SET_OWNER: self._set_owner,
            p.RESET_OWNER: self._reset_owner,
            p.SET_MEM_TABLE: self._set_mem_table,
            p.SET_VRING_NUM: self._set_vring_num,
            p.SET_VRING_ADDR: self._set_vring_addr,
            p.SET_VRING_BASE: self._set_vring_base,
            p.GET_VRING_BASE: self._get_vring_base,
            p.SET_VRING_KICK: self._set_vring_kick,
            p.SET_VRING_CALL: self._set_vring_call,
            p.SET_VRING_ERR: self._set_vring_err,
            p.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            p.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            p.GET_QUEUE_NUM: self._get_queue_num,
            p.SET_VRING_ENABLE: self._set_vring_enable,
            p.GET_CONFIG: self._get_config,
            p.SET_CONFIG: self._set_config,
            p.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            p.ADD_MEM_REG: self._add_mem_reg,
            p.REM_MEM_REG: self._rem_mem_reg,
        }

    # ---- connection lifecycle -------------------------------------------------------------

    def _reset_connection_state(self) -> None:
        self.owned = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.features_read = False
        for vq in self.queues:
            self._unwatch(vq)
            vq.close_fds()
            vq.reset()
        self.mem.close()
        self.mem = GuestMemory()

    def listen(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path)
        self.listener.listen(1)
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        log.info("%s: listening on %s", self.device.name, self.socket_path)

    def serve_forever(self) -> None:
        if self.listener is None:
            self.listen()
        while True:
            for key, _ in self.sel.select():
                kind, arg = key.data
                if kind == "conn" and self.conn is None:
                    continue  # dropped earlier in this round
                try:
                    if kind == "listen":
                        self._accept()
                    elif kind == "conn":
                        self._on_message()
                    elif kind == "kick":
                        self._on_kick(arg)
                except OSError as e:
                    # A front-end that vanished mid-reply (EPIPE, ECONNRESET) is not fatal.
                    self._drop_connection(f"socket error: {e}")
                except Exception:
                    log.exception("%s: unexpected error; dropping the front-end", self.device.name)
                    self._drop_connection("internal error")

    def _accept(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        # One front-end at a time: later ones wait in the listen backlog until this one goes.
        self.sel.unregister(self.listener)
        self.conn = conn
        self.sel.register(conn, selectors.EVENT_READ, ("conn", None))
        self.device.connection_reset(self)
        log.info("%s: front-end connected", self.device.name)

    def _drop_connection(self, why: str) -> None:
        log.info("%s: dropping front-end: %s", self.device.name, why)
        if self.conn is not None:
            self.sel.unregister(self.conn)
            self.conn.close()
            self.conn = None
        self._reset_connection_state()
        self.device.connection_reset(self)
        if self.listener is not None:
            self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))

    # ---- message I/O ----------------------------------------------------------------------

    def _recv_exact(self, n: int, fds: list[int] | None = None) -> bytes:
        assert self.conn is not None
        buf = bytearray()
        while len(buf) < n:
            if fds is not None:
                space = socket.CMSG_SPACE(p.MAX_FDS * 4)
                data, anc, _flags, _ = self.conn.recvmsg(n - len(buf), space)
                for level, kind, cdata in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                        fds.extend(arr)
            else:
                data = self.conn.recv(n - len(buf))
            if not data:
                raise Disconnected("front-end closed the connection")
            buf += data
        return bytes(buf)

    def _send(self, request: int, payload: bytes) -> None:
        assert self.conn is not None
        flags = p.VERSION | p.FLAG_REPLY
        self.conn.sendall(p.HEADER.pack(request, flags, len(payload)) + payload)

    def _reply_ack_enabled(self) -> bool:
        return bool(
            self.device.features & p.bit(p.F_PROTOCOL_FEATURES)
            and self.protocol_features & p.bit(p.PF_REPLY_ACK)
            and self.acked_protocol_features & p.bit(p.PF_REPLY_ACK)
        )

    def _on_message(self) -> None:
        fds: list[int] = []
        try:
            header = self._recv_exact(p.HEADER.size, fds)
            request, flags, size = p.HEADER.unpack(header)
            if size > p.MAX_PAYLOAD:
                raise VhostUserError(f"request {request}: payload of {size} bytes is too large")
            payload = self._recv_exact(size) if size else b""
        except (Disconnected, ConnectionError) as e:
            for fd in fds:
                os.close(fd)
            self._drop_connection(str(e))
            return
        except VhostUserError as e:
            for fd in fds:
                os.close(fd)
            self._drop_connection(str(e))
            return
        try:
            reply = self._dispatch(request, flags, payload, fds)
        except (VhostUserError, GuestError) as e:
            log.error("%s: request %d failed: %s", self.device.name, request, e)
            for fd in fds:
                _close_quietly(fd)
            if flags & p.FLAG_NEED_REPLY and self._reply_ack_enabled():
                self._send(request, p.U64.pack(1))
            self._drop_connection(f"request {request} failed")
            return
        if reply is not None:
            self._send(request, reply)
        elif flags & p.FLAG_NEED_REPLY and self._reply_ack_enabled():
            self._send(request, p.U64.pack(0))
        if self.conn is not None and request == p.SET_PROTOCOL_FEATURES:
            self._check_xen_mmap_required()

    def _dispatch(self, request: int, flags: int, payload: bytes, fds: list[int]) -> bytes | None:
        if flags & p.VERSION_MASK != p.VERSION or flags & p.FLAG_REPLY:
            raise VhostUserError(f"request {request}: bad header flags {flags:#x}")
        if fds and request not in p.FD_REQUESTS:
            raise VhostUserError(f"request {request} carries {len(fds)} unexpected fds")
        handler = self._handlers.get(request)
        if handler is None:
            raise VhostUserError(f"request {request} is not supported")
        return handler(request, payload, fds)

    def _check_xen_mmap_required(self) -> None:
        # A rust-vmm backend built with the `xen` feature refuses a front-end that did not ack it.
        if self.require_xen_mmap and not self.acked_protocol_features & p.bit(p.PF_XEN_MMAP):
            self._drop_connection("front-end did not ack XEN_MMAP (--require-xen-mmap)")

    # ---- request handlers -----------------------------------------------------------------

    @staticmethod
    def _body(request: int, payload: bytes, layout) -> tuple:
        if len(payload) != layout.size:
            raise VhostUserError(
                f"request {request}: payload is {len(payload)} bytes, expected {layout.size}"
            )
        return layout.unpack(payload)

    def _no_body(self, request: int, payload: bytes) -> None:
        if payload:
            raise VhostUserError(f"request {request}: unexpected payload")

    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < len(self.queues):
            raise VhostUserError(f"vring index {index} out of range (have {len(self.queues)})")
        return self.queues[index]

    def _need_protocol_feature(self, bit: int, what: str) -> None:
        if not self.acked_protocol_features & p.bit(bit):
            raise VhostUserError(f"{what} needs protocol feature bit {bit}, which is not acked")

    def _get_features(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        self._no_body(request, payload)
        self.features_read = True
        return p.U64.pack(self.device.features)

    def _set_features(self, request: int, payload: bytes, fds: list[int]) -> None:
        (features,) = self._body(request, payload, p.U64)
        extra = features & ~self.device.features
        if extra:
            raise VhostUserError(f"SET_FEATURES acks bits {extra:#x} that were not offered")
        self.acked_features = features
        for vq in self.queues:
            vq.event_idx = bool(features & p.bit(p.F_EVENT_IDX))
            vq.indirect = bool(features & p.bit(p.F_INDIRECT_DESC))
            # Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start enabled.
            if not features & p.bit(p.F_PROTOCOL_FEATURES):
                vq.enabled = True
        self.device.set_features(features)

    def _set_owner(self, request: int, payload: bytes, fds: list[int]) -> None:
        self._no_body(request, payload)
        if self.owned:
            raise VhostUserError("SET_OWNER: already owned")
        self.owned = True

    def _reset_owner(self, request: int, payload: bytes, fds: list[int]) -> None:
        self._no_body(request, payload)
        self.owned = False
        self.acked_features = 0
        self.acked_protocol_features = 0

    def _get_protocol_features(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        self._no_body(request, payload)
        return p.U64.pack(self.protocol_features)

    def _set_protocol_features(self, request: int, payload: bytes, fds: list[int]) -> None:
        (features,) = self._body(request, payload, p.U64)
        extra = features & ~self.protocol_features
        if extra:
            # rust-vmm stores whatever is sent; only offered bits ever take effect.
            log.warning("SET_PROTOCOL_FEATURES acks unoffered bits %#x; ignoring them", extra)
        self.acked_protocol_features = features & self.protocol_features

    def _get_queue_num(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        self._need_protocol_feature(p.PF_MQ, "GET_QUEUE_NUM")
        self._no_body(request, payload)
        return p.U64.pack(len(self.queues))

    def _set_mem_table(self, request: int, payload: bytes, fds: list[int]) -> None:
        if len(payload) < p.MEMORY_HEADER.size:
            raise VhostUserError("SET_MEM_TABLE: payload too short")
        nregions, _pad = p.MEMORY_HEADER.unpack_from(payload)
        xen = bool(self.acked_protocol_features & p.bit(p.PF_XEN_MMAP))
        layout = p.MEM_REGION_XEN if xen else p.MEM_REGION
        if not 0 < nregions <= p.MAX_MEM_REGIONS:
            raise VhostUserError(f"SET_MEM_TABLE: {nregions} regions")
        if len(payload) != p.MEMORY_HEADER.size + nregions * layout.size:
            raise VhostUserError(
                f"SET_MEM_TABLE: {len(payload)} bytes for {nregions} regions of {layout.size} "
                f"bytes (XEN_MMAP {'acked' if xen else 'not acked'})"
            )
        if len(fds) != nregions:
            raise VhostUserError(f"SET_MEM_TABLE: {nregions} regions but {len(fds)} fds")
        regions = []
        try:
            for i in range(nregions):
                fields = layout.unpack_from(payload, p.MEMORY_HEADER.size + i * layout.size)
                gpa, size, uva, offset = fields[:4]
                kind, domid = MAP_FD, 0
                if xen:
                    kind, domid = check_xen_mmap(fields[4], fields[5]), fields[5]
                regions.append(map_xen_region(kind, fds[i], gpa, size, uva, offset, domid))
            new = GuestMemory(regions)
        except Exception:
            for r in regions:
                r.close()
            raise
        finally:
            for fd in fds:
                _close_quietly(fd)
            fds.clear()
        for vq in self.queues:  # their mappings go with the old table
            vq.release_held()
        self.mem.close()
        self.mem = new
        log.info(
            "%s: mem table: %s",
            self.device.name,
            ", ".join(f"gpa {r.gpa:#x}+{r.size:#x} ({r.kind})" for r in new.regions),
        )

    def _single_region(self, request: int, payload: bytes) -> tuple:
        """ADD_MEM_REG / REM_MEM_REG payload: u64 padding, then one region description."""
        self._need_protocol_feature(p.PF_CONFIGURE_MEM_SLOTS, f"request {request}")
        xen = bool(self.acked_protocol_features & p.bit(p.PF_XEN_MMAP))
        layout = p.MEM_REGION_XEN if xen else p.MEM_REGION
        if len(payload) != p.U64.size + layout.size:
            raise VhostUserError(
                f"request {request}: {len(payload)} bytes for one region of {layout.size}"
            )
        fields = layout.unpack_from(payload, p.U64.size)
        return fields if xen else (*fields, 0, 0)

    def _get_max_mem_slots(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        self._need_protocol_feature(p.PF_CONFIGURE_MEM_SLOTS, "GET_MAX_MEM_SLOTS")
        self._no_body(request, payload)
        return p.U64.pack(p.MAX_MEM_SLOTS)

    def _add_mem_reg(self, request: int, payload: bytes, fds: list[int]) -> None:
        try:
            gpa, size, uva, offset, flags, domid = self._single_region(request, payload)
            if len(fds) != 1:
                raise VhostUserError(f"ADD_MEM_REG with {len(fds)} fds")
            if len(self.mem.regions) >= p.MAX_MEM_SLOTS:
                raise VhostUserError(f"ADD_MEM_REG beyond {p.MAX_MEM_SLOTS} slots")
            xen = bool(self.acked_protocol_features & p.bit(p.PF_XEN_MMAP))
            kind = check_xen_mmap(flags, domid) if xen else MAP_FD
            region = map_xen_region(kind, fds[0], gpa, size, uva, offset, domid)
        finally:
            for fd in fds:
                _close_quietly(fd)
            fds.clear()
        try:
            new = GuestMemory([*self.mem.regions, region])
        except Exception:
            region.close()
            raise
        self.mem = new  # the other regions stay mapped: only one is added
        log.info("%s: added gpa %#x+%#x (%s)", self.device.name, gpa, size, region.kind)

    def _rem_mem_reg(self, request: int, payload: bytes, fds: list[int]) -> None:
        for fd in fds:  # QEMU sends the region's fd along; it is not needed
            _close_quietly(fd)
        fds.clear()
        gpa, size, uva, _offset, _flags, _domid = self._single_region(request, payload)
        gone = [r for r in self.mem.regions if (r.gpa, r.size, r.uva) == (gpa, size, uva)]
        if not gone:
            raise VhostUserError(f"REM_MEM_REG: no region gpa {gpa:#x}+{size:#x} uva {uva:#x}")
        for vq in self.queues:  # chains held in it go with it
            vq.release_held()
        self.mem = GuestMemory([r for r in self.mem.regions if r not in gone])
        for r in gone:
            r.close()
        log.info("%s: removed gpa %#x+%#x", self.device.name, gpa, size)

    def _set_vring_num(self, request: int, payload: bytes, fds: list[int]) -> None:
        index, num = self._body(request, payload, p.VRING_STATE)
        vq = self._queue(index)
        if num == 0 or num > vq.max_size or num & (num - 1):
            raise VhostUserError(
                f"SET_VRING_NUM {index}: size {num} (max {vq.max_size}, power of 2)"
            )
        vq.size = num

    def _set_vring_addr(self, request: int, payload: bytes, fds: list[int]) -> None:
        index, flags, desc, used, avail, _log = self._body(request, payload, p.VRING_ADDR)
        vq = self._queue(index)
        if flags & ~p.VRING_ADDR_F_LOG or desc & 0xF or avail & 0x1 or used & 0x3:
            raise VhostUserError(f"SET_VRING_ADDR {index}: bad flags or alignment")
        if not self.mem:
            raise VhostUserError(f"SET_VRING_ADDR {index}: no memory table yet")
        n = vq.size
        vq.release_held(write_back=False)  # chains of the old rings are abandoned
        vq.desc = self.mem.uva_to_gpa(desc, 16 * n)
        vq.avail = self.mem.uva_to_gpa(avail, 6 + 2 * n)
        vq.used = self.mem.uva_to_gpa(used, 6 + 8 * n)
        for gpa, length in ((vq.desc, 16 * n), (vq.avail, 6 + 2 * n), (vq.used, 6 + 8 * n)):
            self.mem.slice(gpa, length)  # rings must be mapped, not on demand
        # Like rust-vmm: the used index restarts from what the ring holds now.
        vq.next_used = vq.used_idx(self.mem)
        vq.signalled_used = None
        vq.broken = False

    def _set_vring_base(self, request: int, payload: bytes, fds: list[int]) -> None:
        index, num = self._body(request, payload, p.VRING_STATE)
        self._queue(index).next_avail = num & 0xFFFF

    def _get_vring_base(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        index, _ = self._body(request, payload, p.VRING_STATE)
        vq = self._queue(index)
        vq.started = False
        self._unwatch(vq)
        vq.set_fd("kick_fd", None)
        vq.set_fd("call_fd", None)
        return p.VRING_STATE.pack(index, vq.next_avail)

    def _vring_fd(
        self, request: int, payload: bytes, fds: list[int]
    ) -> tuple[Virtqueue, int | None]:
        (value,) = self._body(request, payload, p.U64)
        has_fd = not value & p.VRING_FD_NOFD
        if has_fd != bool(fds) or len(fds) > 1:
            raise VhostUserError(f"request {request}: fd flag and {len(fds)} attached fds disagree")
        vq = self._queue(value & p.VRING_FD_INDEX_MASK)
        fd = fds.pop() if fds else None
        return vq, fd

    def _set_vring_kick(self, request: int, payload: bytes, fds: list[int]) -> None:
        vq, fd = self._vring_fd(request, payload, fds)
        self._unwatch(vq)
        vq.set_fd("kick_fd", fd)
        if fd is None:
            log.warning("queue %d: polling mode (no kick fd) is not supported", vq.index)
            return
        os.set_blocking(fd, False)
        self.sel.register(fd, selectors.EVENT_READ, ("kick", vq))
        vq.started = True

    def _set_vring_call(self, request: int, payload: bytes, fds: list[int]) -> None:
        vq, fd = self._vring_fd(request, payload, fds)
        vq.set_fd("call_fd", fd)

    def _set_vring_err(self, request: int, payload: bytes, fds: list[int]) -> None:
        vq, fd = self._vring_fd(request, payload, fds)
        vq.set_fd("err_fd", fd)

    def _set_vring_enable(self, request: int, payload: bytes, fds: list[int]) -> None:
        index, num = self._body(request, payload, p.VRING_STATE)
        if not self.acked_features & p.bit(p.F_PROTOCOL_FEATURES):
            raise VhostUserError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acked")
        if num not in (0, 1):
            raise VhostUserError(f"SET_VRING_ENABLE {index}: value {num}")
        vq = self._queue(index)
        vq.enabled = bool(num)
        if vq.enabled:
            self._process(vq)  # kicks that came while disabled were dropped

    def _config_header(self, request: int, payload: bytes) -> tuple[int, int, int]:
        if len(payload) < p.CONFIG_HEADER.size:
            raise VhostUserError(f"request {request}: config payload too short")
        offset, size, flags = p.CONFIG_HEADER.unpack_from(payload)
        if (
            size == 0
            or offset + size > p.CONFIG_SPACE_MAX
            or flags & ~(p.CONFIG_F_WRITABLE | p.CONFIG_F_LIVE_MIGRATION)
            or len(payload) != p.CONFIG_HEADER.size + size
        ):
            raise VhostUserError(f"request {request}: bad config header {offset}/{size}/{flags}")
        return offset, size, flags

    def _get_config(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        self._need_protocol_feature(p.PF_CONFIG, "GET_CONFIG")
        offset, size, flags = self._config_header(request, payload)
        space = self.device.config() or b""
        if offset + size > len(space):
            # rust-vmm's answer to a failed read: the header with size 0, connection kept.
            log.warning(
                "GET_CONFIG %d+%d beyond the %d-byte config space", offset, size, len(space)
            )
            return p.CONFIG_HEADER.pack(offset, 0, flags)
        return p.CONFIG_HEADER.pack(offset, size, flags) + space[offset : offset + size]

    def _set_config(self, request: int, payload: bytes, fds: list[int]) -> None:
        self._need_protocol_feature(p.PF_CONFIG, "SET_CONFIG")
        offset, _size, _flags = self._config_header(request, payload)
        self.device.set_config(offset, payload[p.CONFIG_HEADER.size :])

    # ---- queue processing -----------------------------------------------------------------

    def _unwatch(self, vq: Virtqueue) -> None:
        if vq.kick_fd is not None:
            try:
                self.sel.unregister(vq.kick_fd)
            except (KeyError, ValueError):
                pass

    def _on_kick(self, vq: Virtqueue) -> None:
        try:
            os.eventfd_read(vq.kick_fd)
        except BlockingIOError:
            return
        self._process(vq)

    def _process(self, vq: Virtqueue) -> None:
        if not vq.ready(self.mem):
            return
        try:
            while True:
                chains = vq.pop_all(self.mem)
                if chains:
                    before = vq.next_used
                    self.device.process(self, vq, chains)
                    if vq.next_used != before:
                        vq.signal(self.mem)
                if not (vq.event_idx and vq.more_available(self.mem)):
                    break
        except RingError as e:
            log.error("%s: %s; queue stopped until it is set up again", self.device.name, e)
        except GuestError as e:
            vq.broken = True
            log.error("%s: queue %d: %s; queue stopped", self.device.name, vq.index, e)

    def complete(self, vq: Virtqueue, head: int, length: int) -> None:
        """Put a finished chain on the used ring (signalled by the caller's batch, or notify())."""
        vq.push_used(self.mem, head, length)

    def notify(self, vq: Virtqueue) -> None:
        """Signal used buffers completed outside a kick (e.g. a GPIO interrupt)."""
        if self.conn is not None and self.mem:
            vq.signal(self.mem)

    def reject(self, vq: Virtqueue, bad: BadChain) -> None:
        """Hand a malformed chain back untouched (used length 0) so the driver is not stuck."""
        log.error(
            "%s: queue %d: chain %d refused: %s", self.device.name, vq.index, bad.head, bad.reason
        )
        vq.push_used(self.mem, bad.head, 0)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket-path", required=True, help="unix socket to listen on")
    parser.add_argument(
        "--require-xen-mmap",
        action="store_true",
        help="drop front-ends that do not ack XEN_MMAP, as a rust-vmm `xen` build does",
    )
    parser.add_argument(
        "--no-xen-mmap",
        action="store_true",
        help="do not offer XEN_MMAP, as a build without rust-vmm's `xen` feature",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(device: Device, args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {device.name}-backend %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    server = Server(
        device,
        args.socket_path,
        require_xen_mmap=args.require_xen_mmap,
        xen_mmap=not args.no_xen_mmap,
    )
    server.listen()

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        try:
            os.unlink(args.socket_path)
        except OSError:
            pass
    return 0
