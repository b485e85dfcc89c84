"""The software Xen: domains, their RAM and grant tables, event channels,
IOREQ servers, interrupt lines, xenstore, and the control socket through which a
device model (xvf running with --sim DIR) reaches all of it.

Layout of DIR: `privcmd.sock` (control socket, see xvf.platform.sim.control) and
`xenstored.sock` (the xenstore wire protocol).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xvf.errors import GrantError, SimulatorError
from xvf.hotpath import _layout as L
from xvf.hotpath._layout import PAGE_SHIFT, PAGE_SIZE
from xvf.platform.sim import control as C
from xvf.platform.sim.evtchn import EventChannels
from xvf.platform.sim.grant_table import GrantTable
from xvf.platform.sim.ioreq import (
    MAX_SERVERS_PER_DOMAIN,
    GuestDataAbort,
    IoreqServer,
    MmioRange,
    VcpuChannel,
    issue,
)
from xvf.platform.sim.irqfd import IrqfdWatcher
from xvf.platform.sim.memory import GuestRam

log = logging.getLogger("xvf.platform.sim")

DM_DOMID = 0
XENMEM_RESOURCE_IOREQ_SERVER = 0

# xen_dm_op numbers (include/xvf/xen_dmop.h)
DMOP_CREATE_IOREQ_SERVER = 1
DMOP_GET_IOREQ_SERVER_INFO = 2
DMOP_MAP_IO_RANGE = 3
DMOP_UNMAP_IO_RANGE = 4
DMOP_SET_IOREQ_SERVER_STATE = 5
DMOP_DESTROY_IOREQ_SERVER = 6
DMOP_SET_IRQ_LEVEL = 19
DMOP_NR_VCPUS = 20
IO_RANGE_MEMORY = 1


@dataclass
class Domain:
    domid: int
    name: str
    ram: GuestRam
    grants: GrantTable
    nr_vcpus: int
    hv: Hypervisor
    vcpu_channels: list[VcpuChannel] = field(default_factory=list)
    servers: dict[int, IoreqServer] = field(default_factory=dict)
    irq_levels: dict[int, int] = field(default_factory=dict)
    irq_cond: threading.Condition = field(default_factory=threading.Condition)
    virtio: list = field(default_factory=list)  # toolstack VirtioSpec list
    alive: bool = True
    access_timeout: float = 10.0
    irq_pending: set[int] = field(default_factory=set)
    # privcmd ioeventfd: (addr, addr_len, vq) -> eventfd the Dom0 kernel signals
    ioeventfds: dict[tuple[int, int, int], int] = field(default_factory=dict)
    ioeventfd_hits: int = 0
    irqfd_hits: int = 0  # interrupts the Dom0 kernel injected (privcmd irqfd)
    # SPI -> eventfd signalled on each assertion, for a vCPU lent to another process
    irq_eventfds: dict[int, int] = field(default_factory=dict)

    def irqfd_fired(self, irq: int) -> None:
        """privcmd irqfd: set_irq_level(irq, 1) per signal, and nobody lowers the line.
        Xen's (old) Arm vGIC takes that as one injection and keeps no level, so this is
        an edge: pending once, the line not held high."""
        self.irqfd_hits += 1
        self.pulse_irq(irq)

    def pulse_irq(self, irq: int) -> None:
        """One injection of SPI `irq` that leaves its level as it was."""
        with self.irq_cond:
            self.irq_pending.add(irq)
            efd = self.irq_eventfds.get(irq)
            if efd is not None:
                os.eventfd_write(efd, 1)
            self.irq_cond.notify_all()

    # -- what a vCPU does ---------------------------------------------------
    def mmio(self, vcpu: int, addr: int, size: int, is_write: bool, value: int = 0) -> int:
        """One trapped MMIO access by `vcpu`, forwarded as an ioreq."""
        if not self.alive:
            raise SimulatorError(f"domain {self.domid} is destroyed")
        if not 0 <= vcpu < self.nr_vcpus:
            raise SimulatorError(f"domain {self.domid} has no vCPU {vcpu}")
        if size not in (1, 2, 4, 8):
            raise SimulatorError(f"an Arm load/store has no size {size}")
        if is_write and self.ioeventfds:
            efd = self.ioeventfds.get((addr, size, value))
            if efd is not None:
                # Completed in the Dom0 kernel (privcmd ioeventfd): the device
                # model never sees this QueueNotify.
                self.ioeventfd_hits += 1
                os.eventfd_write(efd, 1)
                return 0
        with self.hv.lock:
            # Xen's ioreq_server_select: FOR_EACH_IOREQ_SERVER walks ids from the top,
            # the first enabled server whose ranges contain the access takes it.
            server = next(
                (s for _, s in sorted(self.servers.items(), reverse=True) if s.claims(addr, size)),
                None,
            )
        if server is None:
            raise GuestDataAbort(f"domain {self.domid}: no device at {addr:#x}")
        return issue(
            server,
            vcpu,
            self.vcpu_channels[vcpu],
            self.hv.evtchn.notify,
            addr,
            size,
            is_write,
            value,
            self.access_timeout,
        )

    def servers_claiming(self, addr: int, size: int = 4) -> list[int]:
        """Ids of the enabled IOREQ servers whose ranges hold the access, in the order
        Xen would offer it to them (highest id first)."""
        with self.hv.lock:
            return [
                sid for sid, s in sorted(self.servers.items(), reverse=True) if s.claims(addr, size)
            ]

    def invalidate_mapcache(self, vcpu: int = 0) -> int:
        """What Xen does after the guest's p2m dropped a RAM page (Arm: p2m_put_l3_page,
        e.g. Linux's balloon or grant-table set-up): an IOREQ_TYPE_INVALIDATE broadcast
        to every enabled server, each answered before the vCPU runs on. Returns how many
        servers were asked."""
        with self.hv.lock:
            servers = [s for s in self.servers.values() if s.enabled]
        for server in servers:
            issue(
                server,
                vcpu,
                self.vcpu_channels[vcpu],
                self.hv.evtchn.notify,
                0,
                4,
                True,
                ~0 & 0xFFFFFFFFFFFFFFFF,
                self.access_timeout,
                req_type=L.IOREQ_TYPE_INVALIDATE,
                count=0,
            )
        return len(servers)

    def irq_level(self, irq: int) -> int:
        return self.irq_levels.get(irq, 0)

    def wait_irq(self, irq: int, timeout: float) -> bool:
        """Block until SPI `irq` is asserted; False on timeout.

        An assertion is pending until a wait takes it (the vGIC delivers it once),
        and the line stays asserted while the level is high.
        """
        with self.irq_cond:
            ok = self.irq_cond.wait_for(
                lambda: self.irq_levels.get(irq, 0) or irq in self.irq_pending, timeout
            )
            self.irq_pending.discard(irq)
            return bool(ok)

    def set_irq(self, irq: int, level: int) -> None:
        with self.irq_cond:
            self.irq_levels[irq] = 1 if level else 0
            if level:
                self.irq_pending.add(irq)
                efd = self.irq_eventfds.get(irq)
                if efd is not None:
                    os.eventfd_write(efd, 1)
            self.irq_cond.notify_all()


class Hypervisor:
    """One simulated host. `start()` opens the sockets; `close()` tears everything down."""

    def __init__(
        self, run_dir: str, kernel_eventfds: bool = False, destroy_timeout: float | None = None
    ) -> None:
        """`kernel_eventfds`: the simulated Dom0 kernel has privcmd ioeventfd and
        irqfd (Linux 6.7+); without them those requests fail with ENOTTY, as on
        Debian 12's 6.1 kernel. `destroy_timeout`: how long destroy waits for each
        virtio backend to reach Closed, libxl's 10 s unless told otherwise."""
        from xvf.platform.sim.toolstack import LIBXL_DESTROY_TIMEOUT

        self.run_dir = run_dir
        self.kernel_eventfds = kernel_eventfds
        self.destroy_timeout = LIBXL_DESTROY_TIMEOUT if destroy_timeout is None else destroy_timeout
        # domid -> whether every backend answered Closing with Closed (as `xl destroy`
        # waits for); tests read it to see the device model took part.
        self.backends_closed: dict[int, bool] = {}
        self.irqfds = IrqfdWatcher()
        self.control_path = os.path.join(run_dir, "privcmd.sock")
        self.xenstore_path = os.path.join(run_dir, "xenstored.sock")
        self.lock = threading.RLock()
        self.domains: dict[int, Domain] = {}
        self.evtchn = EventChannels()
        self.evtchn.add_domain(DM_DOMID)
        self._next_domid = 1
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stopping = False
        self._closed = False
        self.sessions: list[_Session] = []  # device-model connections (privcmd, gntdev)
        # domid -> what Dom0 still held of the domain once its backends answered Closed
        # (see destroy_domain)
        self.held_at_destroy: dict[int, list[str]] = {}
        from xvf.platform.sim.xenstored import XenStored

        self.xenstored = XenStored(self.xenstore_path)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> Hypervisor:
        os.makedirs(self.run_dir, exist_ok=True)
        self.xenstored.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        if os.path.exists(self.control_path):
            os.unlink(self.control_path)
        sock.bind(self.control_path)
        sock.listen(16)
        self._listener = sock
        t = threading.Thread(target=self._accept_loop, name="sim-control", daemon=True)
        t.start()
        self._threads.append(t)
        from xvf.protocols.xenstore import XenStore

        xs = XenStore(self.xenstore_path)
        try:
            xs.write("/local/domain/0/name", "Domain-0")
            xs.write("/local/domain/0/domid", "0")
        finally:
            xs.close()
        return self

    def __enter__(self) -> Hypervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:  # a test may close it before its fixture does
            return
        self._closed = True
        self._stopping = True
        for dom in list(self.domains.values()):
            self.destroy_domain(dom.domid)
        if self._listener is not None:
            try:  # wakes the thread blocked in accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)
        self.evtchn.close()
        self.irqfds.close()
        self.xenstored.stop()
        for path in (self.control_path,):
            if os.path.exists(path):
                os.unlink(path)

    # -- domains -------------------------------------------------------------
    def create_domain(
        self,
        name: str,
        memory_mib: int = 64,
        vcpus: int = 1,
        virtio: str | list | None = None,
        grant_entries: int = 4096,
        domid: int | None = None,
    ) -> Domain:
        """What `xl create` does, for a guest with `virtio = [...]` devices."""
        from xvf.platform.sim import toolstack
        from xvf.protocols.xenstore import XenStore

        specs: list[toolstack.VirtioSpec] = []
        if virtio:
            specs = toolstack.parse_virtio_line(virtio) if isinstance(virtio, str) else list(virtio)
            specs = toolstack.assign_mmio_resources(specs)
        with self.lock:
            if domid is None:
                domid = self._next_domid
                self._next_domid += 1
            elif domid in self.domains or not 0 < domid < 0x7FF0:
                raise SimulatorError(f"domain id {domid} is in use or not a DomU id")
        ram = GuestRam(memory_mib << 20)
        dom = Domain(
            domid=domid,
            name=name,
            ram=ram,
            grants=GrantTable(grant_entries),
            nr_vcpus=vcpus,
            hv=self,
            virtio=specs,
        )
        dom.vcpu_channels = [VcpuChannel() for _ in range(vcpus)]
        self.evtchn.add_domain(domid)
        with self.lock:
            self.domains[domid] = dom
        xs = XenStore(self.xenstore_path)
        try:
            base = f"/local/domain/{domid}"
            xs.write(f"{base}/name", name)
            xs.write(f"{base}/domid", str(domid))
            xs.write(f"{base}/vm", f"/vm/{uuid.uuid4()}")  # libxl: the domain's identity
            xs.write(f"{base}/memory/static-max", str(memory_mib << 10))
            xs.write(f"{base}/cpu/nr", str(vcpus))
            self.xenstored.introduce_domain(domid)
            if specs:
                toolstack.add_virtio_devices(xs, domid, specs)
        finally:
            xs.close()
        log.info(
            "created domain %d (%s): %d MiB, %d vCPUs, %d virtio devices",
            domid,
            name,
            memory_mib,
            vcpus,
            len(specs),
        )
        return dom

    def destroy_domain(self, domid: int) -> None:
        from xvf.platform.sim import toolstack
        from xvf.protocols.xenstore import XenStore

        with self.lock:
            dom = self.domains.get(domid)
        if dom is None:
            return
        # libxl pauses the domain, asks each backend to close and waits for it,
        # then destroys the domain and removes the nodes.
        dom.alive = False
        try:
            xs = XenStore(self.xenstore_path)
            try:
                self.backends_closed[domid] = toolstack.close_virtio_devices(
                    xs, domid, self.destroy_timeout
                )
            finally:
                xs.close()
        except Exception as exc:  # xenstored may already be gone at shutdown
            log.debug("closing virtio devices of domain %d: %s", domid, exc)
        if self.backends_closed.get(domid):
            self.held_at_destroy[domid] = held = self._held_by_dom0(dom)
            if held:
                # On real Xen this is no leak but a hang: with Dom0 still holding the
                # guest's eventfd offloads or grants, `xl destroy` spun in its destroy
                # hypercall (seen on the rig: RCU stalls in Dom0, the test timed out).
                log.warning("domain %d destroyed while Dom0 holds %s", domid, ", ".join(held))
        with self.lock:
            self.domains.pop(domid, None)
        dom.grants.retire()  # grant copies in flight finish; later ones find no domain
        try:
            xs = XenStore(self.xenstore_path)
            try:
                toolstack.remove_virtio_devices(xs, domid)
            finally:
                xs.close()
        except Exception as exc:  # xenstored may already be gone at shutdown
            log.debug("removing xenstore nodes of domain %d: %s", domid, exc)
        self.xenstored.release_domain(domid)
        for fd in dom.ioeventfds.values():
            os.close(fd)
        dom.ioeventfds.clear()
        with self.lock:
            for server in dom.servers.values():
                server.close()
            dom.servers.clear()
        self.evtchn.remove_domain(domid)
        dom.ram.close()

    def _held_by_dom0(self, dom: Domain) -> list[str]:
        """What the device models still hold of `dom`: kernel eventfd offloads, grants."""
        with self.lock:
            sessions = list(self.sessions)
        held = [f"ioeventfd at {addr:#x} queue {vq}" for addr, _, vq in dom.ioeventfds]
        for session in sessions:
            held += [f"irqfd of SPI {irq}" for d, irq in session.irqfds if d == dom.domid]
            held += [f"grant {ref}" for d, ref, _ in session.mapped_grants if d == dom.domid]
        return held

    def domain(self, domid: int) -> Domain:
        with self.lock:
            dom = self.domains.get(domid)
        if dom is None:
            raise OSError(errno.ESRCH, f"no domain {domid}")
        return dom

    # -- control socket ------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping and self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="sim-privcmd", daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        session = _Session(self)
        with self.lock:
            self.sessions.append(session)
        buf = bytearray(C.MAX_MESSAGE)
        try:
            while True:
                try:
                    data, fds = C.recv_message(conn, buf)
                except (OSError, SimulatorError):
                    return
                if not data:
                    return
                reply, out_fds = session.handle(data, fds)
                try:
                    C.send_message(conn, b"", reply, out_fds)
                except OSError:
                    return
                finally:
                    for fd in out_fds:
                        os.close(fd)
        finally:
            with self.lock:
                self.sessions.remove(session)
            session.close()
            conn.close()
            if conn in self._conns:
                self._conns.remove(conn)


class _Session:
    """One device-model connection: its requests and what it holds."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.handles: list[int] = []
        self.mapped_grants: list[tuple[int, int, bool]] = []
        self.irqfds: dict[tuple[int, int], int] = {}
        self.ioeventfds: list[tuple[int, tuple[int, int, int]]] = []
        self._fds: list[int] = []  # the fds of the request being handled
        self._handlers: dict[int, Callable[[bytes], tuple[bytes, list[int]]]] = {
            C.OP_DM_OP: self._dm_op,
            C.OP_MMAP_RESOURCE: self._mmap_resource,
            C.OP_FOREIGN_MAP: self._foreign_map,
            C.OP_EVTCHN_OPEN: self._evtchn_open,
            C.OP_EVTCHN_BIND: self._evtchn_bind,
            C.OP_EVTCHN_BIND_UNBOUND: self._evtchn_bind_unbound,
            C.OP_EVTCHN_UNBIND: self._evtchn_unbind,
            C.OP_GNT_MAP: self._gnt_map,
            C.OP_GNT_UNMAP: self._gnt_unmap,
            C.OP_GNT_COPY_DOMAIN: self._gnt_copy_domain,
            C.OP_IOEVENTFD: lambda p: self._ioeventfd(p, self._fds),
            C.OP_IRQFD: lambda p: self._irqfd(p, self._fds),
        }

    def close(self) -> None:
        # Like closing /dev/xen/gntdev: mappings go away. IOREQ servers stay, as in Xen.
        for domid, ref, _writable in self.mapped_grants:
            dom = self.hv.domains.get(domid)
            if dom is not None:
                dom.grants.mark_unmapped(ref)
        self.mapped_grants.clear()
        for efd in self.irqfds.values():  # closing privcmd drops its eventfd offloads
            self.hv.irqfds.remove(efd)
        self.irqfds.clear()
        for domid, key in self.ioeventfds:
            dom = self.hv.domains.get(domid)
            kick = dom.ioeventfds.pop(key, None) if dom is not None else None
            if kick is not None:
                os.close(kick)
        self.ioeventfds.clear()

    def handle(self, data: bytes, fds: Sequence[int] = ()) -> tuple[bytes, list[int]]:
        fds = list(fds)
        try:
            return self._handle(data, fds)
        finally:
            for fd in fds:  # whatever a handler did not keep
                os.close(fd)

    def _handle(self, data: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._fds = fds
        try:
            return self._dispatch(data)
        finally:
            self._fds = []

    def _dispatch(self, data: bytes) -> tuple[bytes, list[int]]:
        if len(data) < C.HEADER.size:
            return C.RC.pack(-errno.EINVAL), []
        op, length = C.HEADER.unpack_from(data)
        payload = data[C.HEADER.size :]
        if length != len(payload):
            return C.RC.pack(-errno.EINVAL), []
        handler = self._handlers.get(op)
        if handler is None:
            return C.RC.pack(-errno.ENOSYS), []
        try:
            out, fds = handler(payload)
        except struct.error:
            return C.RC.pack(-errno.EINVAL), []
        except GrantError as exc:
            log.info("grant map refused: %s", exc)
            return C.RC.pack(-(exc.errno or errno.EPERM)), []
        except OSError as exc:
            return C.RC.pack(-(exc.errno or errno.EIO)), []
        except (SimulatorError, ValueError) as exc:
            # A domain torn down meanwhile (its RAM or grant table closed), a size the
            # memfd does not have: the request fails, the session goes on.
            log.info("control request %d failed: %s", op, exc)
            return C.RC.pack(-errno.EINVAL), []
        return C.RC.pack(0) + out, fds

    # -- dm_op ---------------------------------------------------------------
    def _dm_op(self, payload: bytes) -> tuple[bytes, list[int]]:
        domid, _, _ = C.DM_OP_PREFIX.unpack_from(payload)
        op_bytes = bytearray(payload[C.DM_OP_PREFIX.size : C.DM_OP_PREFIX.size + C.DM_OP_SIZE])
        if len(op_bytes) != C.DM_OP_SIZE:
            raise OSError(errno.EINVAL, "short dm_op")
        dom = self.hv.domain(domid)
        op = struct.unpack_from("<I", op_bytes, 0)[0]
        u = 8  # offset of the union in xen_dm_op
        hv = self.hv
        if op == DMOP_CREATE_IOREQ_SERVER:
            with hv.lock:
                if len(dom.servers) >= MAX_SERVERS_PER_DOMAIN:
                    # Xen: ioreq_server_create finds no free slot -> -ENOSPC
                    raise OSError(
                        errno.ENOSPC, f"domain {domid} has {MAX_SERVERS_PER_DOMAIN} IOREQ servers"
                    )
                # Xen's ioreq_server_create: the lowest free slot of this domain.
                sid = min(set(range(MAX_SERVERS_PER_DOMAIN)) - set(dom.servers))
            ports = [
                hv.evtchn.alloc_unbound(domid, DM_DOMID, dom.vcpu_channels[v].on_event)
                for v in range(dom.nr_vcpus)
            ]
            server = IoreqServer.create(sid, domid, ports)
            with hv.lock:
                dom.servers[sid] = server
            struct.pack_into("<H", op_bytes, u + 4, sid)
        elif op == DMOP_GET_IOREQ_SERVER_INFO:
            sid, _flags = struct.unpack_from("<HH", op_bytes, u)
            self._server(dom, sid)
            # No buffered ioreqs; with XEN_DMOP_no_gfns the gfns are not reported.
            struct.pack_into("<IQQ", op_bytes, u + 4, 0, 0, 0)
        elif op in (DMOP_MAP_IO_RANGE, DMOP_UNMAP_IO_RANGE):
            sid, _, kind, start, end = struct.unpack_from("<HHIQQ", op_bytes, u)
            server = self._server(dom, sid)
            if kind != IO_RANGE_MEMORY or end < start:
                raise OSError(errno.EINVAL, "only MMIO ranges on Arm")
            with hv.lock:
                if op == DMOP_MAP_IO_RANGE:
                    # Xen checks the server's own rangeset only (ioreq_server_map_io_range):
                    # another server may claim the same range; dispatch then decides.
                    if any(r.start <= end and start <= r.end for r in server.ranges):
                        raise OSError(errno.EEXIST, f"range {start:#x}-{end:#x} taken")
                    server.ranges.append(MmioRange(start, end))
                else:
                    before = len(server.ranges)
                    server.ranges = [r for r in server.ranges if (r.start, r.end) != (start, end)]
                    if len(server.ranges) == before:
                        raise OSError(errno.ENOENT, "range not mapped")
        elif op == DMOP_SET_IOREQ_SERVER_STATE:
            sid, enabled = struct.unpack_from("<HB", op_bytes, u)
            server = self._server(dom, sid)
            with hv.lock:
                server.set_enabled(bool(enabled))
        elif op == DMOP_DESTROY_IOREQ_SERVER:
            (sid,) = struct.unpack_from("<H", op_bytes, u)
            server = self._server(dom, sid)
            with hv.lock:
                dom.servers.pop(sid, None)
            for port in server.ports:
                hv.evtchn.close_port(domid, port)
            server.close()
        elif op == DMOP_SET_IRQ_LEVEL:
            irq, level = struct.unpack_from("<IB", op_bytes, u)
            if not 32 <= irq < 1020:  # SPIs only, like Xen on Arm
                raise OSError(errno.EINVAL, f"irq {irq} is not an SPI")
            dom.set_irq(irq, level)
        elif op == DMOP_NR_VCPUS:
            struct.pack_into("<I", op_bytes, u, dom.nr_vcpus)
        else:
            raise OSError(errno.EOPNOTSUPP, f"dm_op {op}")
        return bytes(op_bytes), []

    @staticmethod
    def _server(dom: Domain, sid: int) -> IoreqServer:
        server = dom.servers.get(sid)
        if server is None:
            raise OSError(errno.ENOENT, f"no ioreq server {sid}")
        return server

    def _mmap_resource(self, payload: bytes) -> tuple[bytes, list[int]]:
        domid, _, rtype, rid, idx, num = struct.unpack_from("<HHIIIQ", payload)
        dom = self.hv.domain(domid)
        if rtype != XENMEM_RESOURCE_IOREQ_SERVER:
            raise OSError(errno.EOPNOTSUPP, "only ioreq server resources")
        server = self._server(dom, rid)
        if idx + num > 2 or num == 0:
            raise OSError(errno.EINVAL, "frames out of range")
        with self.hv.lock:
            server.allocate_page()
        return struct.pack("<Q", idx * PAGE_SIZE), [os.dup(server.fd)]

    def _foreign_map(self, payload: bytes) -> tuple[bytes, list[int]]:
        (domid,) = struct.unpack_from("<H", payload)
        dom = self.hv.domain(domid)
        regions = dom.ram.regions
        out = struct.pack("<I", len(regions)) + b"".join(
            struct.pack("<QQQ", r.gpa, r.size, r.fd_offset) for r in regions
        )
        return out, [os.dup(dom.ram.fd)]

    def _evtchn_open(self, payload: bytes) -> tuple[bytes, list[int]]:
        hid, sock = self.hv.evtchn.open_handle()
        self.handles.append(hid)
        fd = sock.detach()
        return struct.pack("<I", hid), [fd]

    def _evtchn_bind(self, payload: bytes) -> tuple[bytes, list[int]]:
        hid, rdom, rport = struct.unpack_from("<III", payload)
        if hid not in self.handles:
            raise OSError(errno.EBADF, "not your handle")
        return struct.pack("<I", self.hv.evtchn.bind_interdomain(hid, rdom, rport)), []

    def _evtchn_bind_unbound(self, payload: bytes) -> tuple[bytes, list[int]]:
        hid, rdom = struct.unpack_from("<II", payload)
        if hid not in self.handles:
            raise OSError(errno.EBADF, "not your handle")
        return struct.pack("<I", self.hv.evtchn.bind_unbound(hid, rdom)), []

    def _evtchn_unbind(self, payload: bytes) -> tuple[bytes, list[int]]:
        hid, port = struct.unpack_from("<II", payload)
        if hid not in self.handles:
            raise OSError(errno.EBADF, "not your handle")
        self.hv.evtchn.unbind(hid, port)
        return b"", []

    def _gnt_map(self, payload: bytes) -> tuple[bytes, list[int]]:
        domid, writable, _, count = struct.unpack_from("<HBBI", payload)
        if count == 0 or count > 4096:
            raise OSError(errno.EINVAL, "grant count")
        refs = struct.unpack_from(f"<{count}I", payload, 8)
        dom = self.hv.domain(domid)
        offsets = self._map_refs(dom, refs, bool(writable))
        return struct.pack(f"<{count}Q", *offsets), [os.dup(dom.ram.fd)]

    def _gnt_copy_domain(self, payload: bytes) -> tuple[bytes, list[int]]:
        """What Xen sees of a guest, for a copier doing Xen's GNTTABOP_copy in the
        caller (xvf.platform.sim._grant_copy): its RAM, grant table and grant lock."""
        (domid,) = C.COPY_DOMAIN.unpack_from(payload)
        with self.hv.lock:
            dom = self.hv.domains.get(domid)
        if dom is None:
            raise OSError(errno.ESRCH, f"no domain {domid}")
        regions = dom.ram.regions
        reply = C.COPY_DOMAIN_REPLY.pack(DM_DOMID, dom.grants.nr_entries, len(regions))
        reply += b"".join(C.RAM_REGION.pack(r.gpa, r.size, r.fd_offset) for r in regions)
        return reply, [os.dup(dom.ram.fd), os.dup(dom.grants.fd), os.dup(dom.grants.lock.fd)]

    def _map_refs(self, dom: Domain, refs: Sequence[int], writable: bool) -> list[int]:
        """Map the refs (all or none); the frames' offsets in guest RAM."""
        offsets = []
        done: list[int] = []
        try:
            for ref in refs:
                gfn = dom.grants.lookup(ref, DM_DOMID, writable)
                offsets.append(dom.ram.gpa_to_offset(gfn << PAGE_SHIFT))
                dom.grants.mark_mapped(ref, writable)
                done.append(ref)
        except Exception:
            for ref in done:
                dom.grants.mark_unmapped(ref)
            raise
        self.mapped_grants.extend((dom.domid, ref, writable) for ref in refs)
        return offsets

    def _require_kernel_eventfds(self) -> None:
        if not self.hv.kernel_eventfds:  # the ioctl does not exist before Linux 6.7
            raise OSError(errno.ENOTTY, "this Dom0 kernel has no privcmd eventfd offload")

    def _take_eventfd(self, fds: list[int]) -> int:
        if len(fds) != 1:
            raise OSError(errno.EBADF, "one eventfd expected")
        return fds.pop()

    def _ioeventfd(self, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._require_kernel_eventfds()
        domid, _, flags, addr, addr_len, vq = struct.unpack_from("<HHIQII", payload)
        dom = self.hv.domain(domid)
        key = (addr, addr_len, vq)
        if flags & C.FLAG_DEASSIGN:
            old = dom.ioeventfds.pop(key, None)
            if old is None:
                raise OSError(errno.ENOENT, "no such ioeventfd")
            os.close(old)
            if (domid, key) in self.ioeventfds:
                self.ioeventfds.remove((domid, key))
            return b"", []
        if addr_len not in (1, 2, 4, 8):
            raise OSError(errno.EINVAL, "bad ioeventfd length")
        efd = self._take_eventfd(fds)
        if key in dom.ioeventfds:
            os.close(efd)
            raise OSError(errno.EEXIST, "ioeventfd already assigned")
        dom.ioeventfds[key] = efd
        self.ioeventfds.append((domid, key))
        return b"", []

    def _irqfd(self, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._require_kernel_eventfds()
        domid, _, flags, irq = struct.unpack_from("<HHII", payload)
        dom = self.hv.domain(domid)
        if flags & C.FLAG_DEASSIGN:
            key = self.irqfds.pop((domid, irq), None)
            if key is None:
                raise OSError(errno.ENOENT, "no such irqfd")
            self.hv.irqfds.remove(key)
            return b"", []
        if not 32 <= irq < 1020:
            raise OSError(errno.EINVAL, f"irq {irq} is not an SPI")
        efd = self._take_eventfd(fds)
        self.hv.irqfds.add(efd, lambda: dom.irqfd_fired(irq))
        self.irqfds[(domid, irq)] = efd
        return b"", []

    def _gnt_unmap(self, payload: bytes) -> tuple[bytes, list[int]]:
        domid, _, count = struct.unpack_from("<HHI", payload)
        refs = struct.unpack_from(f"<{count}I", payload, 8)
        dom = self.hv.domains.get(domid)
        for ref in refs:
            for i, (d, r, _w) in enumerate(self.mapped_grants):
                if d == domid and r == ref:
                    del self.mapped_grants[i]
                    if dom is not None:
                        dom.grants.mark_unmapped(ref)
                    break
        return b"", []
