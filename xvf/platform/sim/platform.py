"""The device model's view of the software Xen: `Platform` over its control socket.

Everything the frontend gets is what the real platform gives: an event-channel
fd with /dev/xen/evtchn semantics, an ioreq page in Xen's layout, a guest-RAM
mapping, grant mappings, and IrqLine objects issuing real xen_dm_op structures.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
from typing import TYPE_CHECKING

from xvf.errors import GrantError, HypercallError, PlatformUnavailable
from xvf.hotpath import _privcmd as P
from xvf.hotpath._evtchn import DOMID_SELF
from xvf.hotpath._gnttab import GrantCopier, GrantMapping, map_file_pages
from xvf.hotpath._layout import PAGE_SIZE
from xvf.platform.dm_op import DmOpIoreqServer
from xvf.platform.interface import IoreqServerHandle, MemoryRegion
from xvf.platform.sim import control as C
from xvf.platform.sim._grant_copy import SimGrantCopier
from xvf.platform.sim._hotpath import SimEventChannel, SimIrqLine
from xvf.protocols.vhost_user_wire import XEN_MMAP_FOREIGN


def _control_connection(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.connect(path)
    return sock


def _close_sent(sent: list[socket.socket], regions: list[MemoryRegion] | None = None) -> None:
    """Close the handles given to a backend in `regions` (None: all of them): several
    devices of one guest share its memory, each table's handles are its own."""
    fds = None if regions is None else {r.fd for r in regions}
    for handle in list(sent):
        if fds is None or handle.fileno() in fds:
            handle.close()
            sent.remove(handle)


class SimEventChannelHandle:
    def __init__(self, ctl: C.ControlClient) -> None:
        self._ctl = ctl
        reply, fds = ctl.call(C.OP_EVTCHN_OPEN)
        (self.handle_id,) = struct.unpack("<I", reply[:4])
        fd = fds[0]
        os.set_blocking(fd, False)
        self.channel = SimEventChannel(fd)

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        reply, _ = self._ctl.call(
            C.OP_EVTCHN_BIND, struct.pack("<III", self.handle_id, domid, remote_port)
        )
        return struct.unpack("<I", reply[:4])[0]

    def bind_loopback(self) -> tuple[int, int]:
        reply, _ = self._ctl.call(
            C.OP_EVTCHN_BIND_UNBOUND, struct.pack("<II", self.handle_id, DOMID_SELF)
        )
        (listen,) = struct.unpack("<I", reply[:4])
        try:
            return listen, self.bind_interdomain(DOMID_SELF, listen)
        except BaseException:
            self.unbind(listen)
            raise

    def unbind(self, local_port: int) -> None:
        self._ctl.call(C.OP_EVTCHN_UNBIND, struct.pack("<II", self.handle_id, local_port))

    def close(self) -> None:
        self.channel.close()


class SimIoreqServer(DmOpIoreqServer):
    def __init__(self, platform: SimPlatform, domid: int, existing: int | None = None) -> None:
        """A new server, or with `existing` the server of that id (another process's)."""
        super().__init__(platform, domid, existing)
        self.nr_vcpus = self._query_nr_vcpus()
        frame = P.XENMEM_resource_ioreq_server_frame_ioreq(0)
        reply, fds = platform.ctl.call(
            C.OP_MMAP_RESOURCE,
            struct.pack("<HHIIIQ", domid, 0, P.XENMEM_resource_ioreq_server, self.id, frame, 1),
        )
        (offset,) = struct.unpack("<Q", reply[:8])
        try:
            self._mmap = mmap.mmap(fds[0], PAGE_SIZE, offset=offset)
        finally:
            os.close(fds[0])
        self.page = memoryview(self._mmap)
        anchor = ctypes.c_char.from_buffer(self._mmap)
        self.page_address = ctypes.addressof(anchor)
        del anchor  # release the export, or the mapping could never be closed

    def destroy(self) -> None:
        try:
            self._destroy_server()
        finally:
            self.page.release()
            self._mmap.close()


class SimGuestMemory:
    def __init__(self, ctl: C.ControlClient, domid: int, control_path: str) -> None:
        reply, fds = ctl.call(C.OP_FOREIGN_MAP, struct.pack("<H", domid))
        self.fd = fds[0]
        (count,) = struct.unpack_from("<I", reply)
        total = max(
            off + size
            for _, size, off in (
                struct.unpack_from("<QQQ", reply, 4 + 24 * i) for i in range(count)
            )
        )
        self._mmap = mmap.mmap(self.fd, total)
        self._base = memoryview(self._mmap)
        anchor = ctypes.c_char.from_buffer(self._mmap)
        addr = ctypes.addressof(anchor)
        del anchor  # release the export, or the mapping could never be closed
        self.domid = domid
        self.control_path = control_path
        self._sent: list[socket.socket] = []
        self.regions = []
        for i in range(count):
            gpa, size, off = struct.unpack_from("<QQQ", reply, 4 + 24 * i)
            self.regions.append(
                MemoryRegion(
                    gpa=gpa, size=size, uva=addr + off, fd=self.fd, fd_offset=off, domid=domid
                )
            )

    def translate(self, gpa: int, length: int) -> tuple[int, int] | None:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.fd_offset + (gpa - r.gpa), r.uva + (gpa - r.gpa)
        return None

    def view(self, gpa: int, length: int) -> memoryview:
        t = self.translate(gpa, length)
        if t is None:
            raise GrantError(f"guest range {gpa:#x}+{length:#x} is not RAM")
        return self._base[t[0] : t[0] + length]

    def xen_regions(self) -> list[MemoryRegion]:
        """The same RAM described with the vhost-user Xen mmap extension: FOREIGN
        regions whose fd is, as /dev/xen/privcmd is on a Dom0, the handle a Xen-aware
        backend maps the guest with (here: a fresh connection to the software Xen,
        which the backend alone uses once it has it; see `after_mem_table`)."""
        handle = _control_connection(self.control_path)
        self._sent.append(handle)
        return [
            MemoryRegion(
                gpa=r.gpa,
                size=r.size,
                uva=r.uva,
                fd=handle.fileno(),
                fd_offset=0,
                xen_mmap_flags=XEN_MMAP_FOREIGN,
                domid=self.domid,
            )
            for r in self.regions
        ]

    def after_mem_table(self, regions: list[MemoryRegion]) -> None:
        """The backend holds its copies of these regions' handles now; ours would
        keep its mappings alive after it is gone."""
        _close_sent(self._sent, regions)

    def close(self) -> None:
        self._base.release()
        self._mmap.close()
        os.close(self.fd)
        _close_sent(self._sent)


class SimGrantMapper:
    def __init__(self, ctl: C.ControlClient, domid: int, control_path: str) -> None:
        self._ctl = ctl
        self.domid = domid
        self.control_path = control_path
        self._sent: list[socket.socket] = []

    def map(self, refs: list[int], writable: bool) -> GrantMapping:
        payload = struct.pack("<HBBI", self.domid, int(writable), 0, len(refs))
        payload += struct.pack(f"<{len(refs)}I", *refs)
        try:
            reply, fds = self._ctl.call(C.OP_GNT_MAP, payload)
        except OSError as exc:
            raise GrantError(
                f"mapping grants {refs[:4]}... of domain {self.domid}", exc.errno
            ) from None
        try:
            offsets = struct.unpack(f"<{len(refs)}Q", reply)
            return map_file_pages(fds[0], list(offsets), writable)
        finally:
            os.close(fds[0])

    def copier(self, address: int, size: int) -> GrantCopier:
        """Grant copies to and from [address, address + size), run in this process
        (xvf.platform.sim._grant_copy); its control connection is its own. The guest
        is mapped now, so that the first copy (on the guest's thread) needs no GIL."""
        client = C.ControlClient(self.control_path)
        try:
            copier = SimGrantCopier(client)
            copier.share(address, size)
            copier.attach(self.domid)
            return copier
        except BaseException:
            client.close()
            raise

    def fileno(self) -> int:
        """What a Xen-aware backend maps this guest's grants through (gntdev on a
        Dom0; a fresh connection to the software Xen here, closed by
        `after_mem_table` once the backend has its copy)."""
        handle = _control_connection(self.control_path)
        self._sent.append(handle)
        return handle.fileno()

    def after_mem_table(self, regions: list[MemoryRegion]) -> None:
        _close_sent(self._sent, regions)

    def unmap(self, refs: list[int]) -> None:
        payload = struct.pack("<HHI", self.domid, 0, len(refs)) + struct.pack(
            f"<{len(refs)}I", *refs
        )
        self._ctl.call(C.OP_GNT_UNMAP, payload)

    def close(self) -> None:
        _close_sent(self._sent)


class SimPlatform:
    """Platform for a software Xen whose sockets live in `run_dir`."""

    name = "sim"
    simulated = True
    guest_ram_shareable = True  # guest RAM is a memfd

    def __init__(self, run_dir: str, xen_mmap: bool = True) -> None:
        """`xen_mmap`: offer backends the vhost-user Xen mmap extension (they then map
        the guest through the software Xen, as Xen-aware backends do through
        /dev/xen/privcmd and gntdev); otherwise guest RAM is a plain shared memfd."""
        self.run_dir = run_dir
        self.xen_mmap = xen_mmap
        path = self.control_path = os.path.join(run_dir, "privcmd.sock")
        if not os.path.exists(path):
            raise PlatformUnavailable(
                f"no software Xen at {run_dir} (missing {path}); start one with `xvf sim`"
            )
        self.ctl = C.ControlClient(path)
        self.supports_irqfd = self.supports_ioeventfd = self._probe_eventfds()

    def dm_op(self, domid: int, op: bytes) -> bytes:
        try:
            reply, _ = self.ctl.call(C.OP_DM_OP, C.DM_OP_PREFIX.pack(domid, 0, 0) + op)
        except OSError as exc:
            raise HypercallError(f"dm_op {op[0]} for domain {domid}", exc.errno) from None
        return reply

    # -- privcmd eventfd offloads (Linux 6.7+), probed like on a real Dom0 --------
    def _probe_eventfds(self) -> bool:
        try:
            self.ctl.call(C.OP_IRQFD, struct.pack("<HHII", 0, 0, C.FLAG_DEASSIGN, 32))
        except OSError as exc:
            return exc.errno != errno.ENOTTY
        return True

    def assign_irqfd(self, domid: int, irq: int, eventfd: int, deassign: bool = False) -> None:
        flags = C.FLAG_DEASSIGN if deassign else 0
        try:
            self.ctl.call(
                C.OP_IRQFD,
                struct.pack("<HHII", domid, 0, flags, irq),
                [] if deassign else [eventfd],
            )
        except OSError as exc:
            raise HypercallError(f"irqfd for irq {irq} of domain {domid}", exc.errno) from None

    def assign_ioeventfd(
        self,
        server: IoreqServerHandle,
        ports: list[int],
        addr: int,
        eventfd: int,
        vq: int,
        addr_len: int = 4,
        deassign: bool = False,
    ) -> None:
        flags = C.FLAG_DEASSIGN if deassign else 0
        payload = struct.pack("<HHIQII", server.domid, 0, flags, addr, addr_len, vq)
        try:
            self.ctl.call(C.OP_IOEVENTFD, payload, [] if deassign else [eventfd])
        except OSError as exc:
            raise HypercallError(
                f"ioeventfd at {addr:#x} for domain {server.domid}", exc.errno
            ) from None

    def xenstore_path(self) -> str:
        return os.path.join(self.run_dir, "xenstored.sock")

    def own_domid(self) -> int:
        return 0

    def open_event_channel(self) -> SimEventChannelHandle:
        return SimEventChannelHandle(self.ctl)

    def create_ioreq_server(self, domid: int) -> SimIoreqServer:
        return SimIoreqServer(self, domid)

    def open_ioreq_server(self, domid: int, server_id: int) -> SimIoreqServer:
        return SimIoreqServer(self, domid, existing=server_id)

    def irq_line(self, domid: int, irq: int) -> SimIrqLine:
        # The hot path sends dm_ops itself, maybe from a guest's own service thread:
        # each line gets a connection of its own so that no replies interleave, neither
        # with Python-level calls nor with another line's.
        line = SimIrqLine(_control_connection(self.control_path).detach(), domid, irq)
        line.take_fd()
        return line

    def guest_memory_bytes(self, domid: int) -> int:
        reply, fds = self.ctl.call(C.OP_FOREIGN_MAP, struct.pack("<H", domid))
        for fd in fds:
            os.close(fd)
        (count,) = struct.unpack_from("<I", reply)
        return sum(struct.unpack_from("<QQQ", reply, 4 + 24 * i)[1] for i in range(count))

    def map_guest_memory(self, domid: int) -> SimGuestMemory:
        return SimGuestMemory(self.ctl, domid, self.control_path)

    def open_grant_mapper(self, domid: int) -> SimGrantMapper:
        return SimGrantMapper(self.ctl, domid, self.control_path)

    def close(self) -> None:
        self.ctl.close()


if TYPE_CHECKING:
    from xvf.platform.interface import Platform

    def _is_a_platform(p: SimPlatform) -> Platform:
        """mypy's proof that SimPlatform (and all it hands out) is a `Platform`."""
        return p
