"""The real Xen platform: `xvf.platform.Platform` on an (aarch64) Dom0.

privcmd carries the dm_ops (IOREQ server life cycle, interrupt lines), maps the
ioreq page (acquire_resource) and foreign guest RAM; evtchn and gntdev are the
Cython hot-path objects over their devices. Newer kernels can complete
QueueNotify (ioeventfd) and raise the interrupt (irqfd) themselves; both are
probed at start and used only when present.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from xvf.errors import EventChannelError, GrantError, HypercallError, PlatformUnavailable
from xvf.hotpath import _privcmd as P
from xvf.hotpath._evtchn import DOMID_SELF, EventChannel
from xvf.hotpath._gnttab import GntDev, GrantCopier, GrantMapping
from xvf.hotpath._ioreq import IrqLine
from xvf.platform.dm_op import DmOpIoreqServer
from xvf.platform.interface import IoreqServerHandle, MemoryRegion
from xvf.platform.xen import devices

log = logging.getLogger("xvf.platform.xen")

# vhost-user Xen mmap extension flags for a region (VHOST_USER_PROTOCOL_F_XEN_MMAP).
XEN_MMAP_FLAG_FOREIGN = 0x1
XEN_MMAP_FLAG_GRANT = 0x2

XENSTORED_SOCKETS = ("/run/xenstored/socket", "/var/run/xenstored/socket")


def guest_ram_banks(mem_bytes: int) -> list[tuple[int, int]]:
    """Where libxl puts `mem_bytes` of Arm guest RAM: bank 0 first (3 GiB), then bank 1."""
    if mem_bytes <= 0 or mem_bytes % P.PAGE_SIZE:
        raise ValueError(f"guest memory size {mem_bytes:#x} is not a positive page multiple")
    banks = []
    left = mem_bytes
    for base, size in P.GUEST_RAM_BANKS:
        take = min(left, size)
        if take:
            banks.append((base, take))
        left -= take
    if left:
        raise ValueError(f"guest memory size {mem_bytes:#x} exceeds the Arm guest RAM banks")
    return banks


class XenEventChannelHandle:
    """One open /dev/xen/evtchn."""

    def __init__(self, fd: int) -> None:
        self.channel = EventChannel(fd)

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return self.channel.bind_interdomain(domid, remote_port)

    def bind_loopback(self) -> tuple[int, int]:
        listen = self.channel.bind_unbound_port(DOMID_SELF)
        try:
            return listen, self.channel.bind_interdomain(DOMID_SELF, listen)
        except BaseException:
            self.channel.unbind(listen)
            raise

    def unbind(self, local_port: int) -> None:
        self.channel.unbind(local_port)

    def close(self) -> None:
        self.channel.close()


class XenIoreqServer(DmOpIoreqServer):
    """An IOREQ server of one guest with its synchronous ioreq page mapped here."""

    def __init__(self, pc: P.Privcmd, domid: int, existing: int | None = None) -> None:
        super().__init__(pc, domid, existing)
        self._mapping: P.Mapping | None = None
        try:
            self.nr_vcpus = self._query_nr_vcpus()
            # no_gfns: the page comes from acquire_resource, not the guest's memory map
            port, _, _ = P.parse_ioreq_server_info(
                self._dm_op(P.dm_op_get_ioreq_server_info(self.id, P.XEN_DMOP_no_gfns))
            )
            pages = max(1, -(-self.nr_vcpus // P.IOREQ_SLOTS_PER_PAGE))
            self._mapping = pc.map_resource(
                domid,
                P.XENMEM_resource_ioreq_server,
                self.id,
                P.XENMEM_resource_ioreq_server_frame_ioreq(0),
                pages,
            )
        except BaseException:
            self._destroy_server()
            raise
        self.page = self._mapping.view
        log.info(
            "domain %d: IOREQ server %d, %d vCPUs, ioreq page at %#x (bufioreq port %d)",
            domid,
            self.id,
            self.nr_vcpus,
            self._mapping.address,
            port,
        )

    @property
    def page_address(self) -> int:
        """User address of the ioreq page (what IOCTL_PRIVCMD_IOEVENTFD wants)."""
        return self._mapping.address if self._mapping else 0

    def _destroy_server(self) -> None:
        try:
            super()._destroy_server()
        except HypercallError as exc:
            log.warning("domain %d: destroying IOREQ server %d: %s", self.domid, self.id, exc)

    def destroy(self) -> None:
        self._destroy_server()
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None


class XenGuestMemory:
    """A guest's whole RAM, foreign-mapped bank by bank."""

    def __init__(self, pc: P.Privcmd, domid: int, mem_bytes: int, backend: P.Privcmd) -> None:
        """Maps with `pc`; `backend` is a privcmd fd restricted to this guest, the one
        backends are handed to map it (not xvf's own, which reaches every domain)."""
        self.domid = domid
        self.backend = backend
        self._maps: list[tuple[int, P.Mapping, int]] = []  # (gpa, mapping, bytes populated)
        self.regions: list[MemoryRegion] = []
        try:
            for gpa, upper in guest_ram_banks(mem_bytes):
                # static-max is an upper bound: the guest's real RAM is what its p2m has
                # populated from the bank's start (ballooning can take pages away).
                m, size = pc.map_foreign(domid, gpa, upper, partial=True)
                if size == 0:
                    m.close()
                    if not self._maps:
                        raise PlatformUnavailable(
                            f"domain {domid} has no RAM mapped at {gpa:#x} (is it running?)"
                        )
                    break
                self._maps.append((gpa, m, size))
                if size < upper:
                    log.info(
                        "domain %d: RAM at %#x is %d MiB (static-max allows %d MiB)",
                        domid,
                        gpa,
                        size >> 20,
                        upper >> 20,
                    )
                # Backends map Xen guests themselves from (flags, domid, gpa);
                # the fd is the privcmd device that such a mapping is made on,
                # restricted to this guest.
                self.regions.append(
                    MemoryRegion(
                        gpa=gpa,
                        size=size,
                        uva=m.address,
                        fd=backend.fd,
                        fd_offset=0,
                        xen_mmap_flags=XEN_MMAP_FLAG_FOREIGN,
                        domid=domid,
                    )
                )
                if size < upper:
                    break  # RAM ends inside this bank
        except BaseException:
            self.close()
            raise
        log.info(
            "domain %d: %d MiB of RAM foreign-mapped in %d bank(s)",
            domid,
            sum(size for _, _, size in self._maps) >> 20,
            len(self._maps),
        )

    def xen_regions(self) -> list[MemoryRegion]:
        """On Xen the regions always carry the Xen mmap description."""
        return list(self.regions)

    def after_mem_table(self, regions: list[MemoryRegion]) -> None:
        """Nothing to drop: the restricted privcmd fd lives as long as this mapping."""

    def translate(self, gpa: int, length: int) -> tuple[int, int] | None:
        """(offset in the bank's mapping, frontend address) of a RAM range, or None."""
        for base, m, size in self._maps:
            if base <= gpa and gpa + length <= base + size:
                return gpa - base, m.address + (gpa - base)
        return None

    def view(self, gpa: int, length: int) -> memoryview:
        for base, m, size in self._maps:
            if base <= gpa and gpa + length <= base + size:
                return m.view[gpa - base : gpa - base + length]
        raise GrantError(f"guest range {gpa:#x}+{length:#x} of domain {self.domid} is not RAM")

    def close(self) -> None:
        for _, m, _ in self._maps:
            m.close()
        self._maps.clear()
        self.backend.close()


class XenGrantMapper:
    """/dev/xen/gntdev for one guest's grants."""

    def __init__(self, fd: int, domid: int, max_grants: int) -> None:
        self.fd = fd
        self.domid = domid
        self.gntdev = GntDev(fd)
        try:
            self.gntdev.set_max_grants(max_grants)
        except GrantError as exc:
            # Kernels since 5.x size the pool by module parameter; the ioctl is advisory.
            log.debug("gntdev set_max_grants(%d): %s", max_grants, exc)

    def map(self, refs: list[int], writable: bool) -> GrantMapping:
        return self.gntdev.map(self.domid, refs, writable)

    def copier(self, address: int, size: int) -> GrantCopier:
        """gntdev itself: its GRANT_COPY ioctl pins this process's pages for each copy,
        so the memory needs no sharing."""
        return self.gntdev

    def fileno(self) -> int:
        """The gntdev fd a Xen-aware backend is handed to map this guest's grants."""
        return self.gntdev.fd

    def unmap(self, refs: list[int]) -> None:
        """Nothing to do: gntdev gave the grants back as their mapping closed."""

    def after_mem_table(self, regions: list[MemoryRegion]) -> None:
        """Nothing to drop: the gntdev fd stays xvf's."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class XenPlatform:
    """`Platform` over /dev/xen on a Dom0 (or a driver domain with `own_domid`)."""

    name = "xen"
    xen_mmap = True  # backends must map Xen guests themselves (vhost-user XEN_MMAP)
    guest_ram_shareable = False
    simulated = False

    def __init__(
        self,
        dev_dir: str = devices.DEFAULT_DEV_DIR,
        own_domid: int = 0,
        memory_size: Callable[[int], int] | None = None,
        max_grants: int = 4096,
    ) -> None:
        if struct.calcsize("P") != 8:
            raise PlatformUnavailable("xvf's Xen platform supports 64-bit Dom0s only")
        self.dev_dir = dev_dir
        self._own_domid = own_domid
        self._memory_size = memory_size
        self._max_grants = max_grants
        fd = devices.open_device(dev_dir, "privcmd")
        self.privcmd = P.Privcmd(fd)
        err = self.privcmd.probe()
        if err:
            self.privcmd.close()
            raise devices.not_the_driver(dev_dir, "privcmd", err)
        try:
            self._check_evtchn()
        except BaseException:
            self.privcmd.close()
            raise
        self.irqfd_request, self.supports_ioeventfd = self.privcmd.probe_eventfd_ioctls()
        log.info(
            "privcmd: interrupts via %s, QueueNotify via %s",
            "kernel irqfd" if self.supports_irqfd else "xvf (dm_op set_irq_level)",
            "kernel ioeventfd" if self.supports_ioeventfd else "xvf (ioreq service loop)",
        )

    @property
    def supports_irqfd(self) -> bool:
        return self.irqfd_request is not None

    def _check_evtchn(self) -> None:
        fd = devices.open_device(self.dev_dir, "evtchn")
        try:
            EventChannel(fd).reset()
        except EventChannelError as exc:
            raise devices.not_the_driver(self.dev_dir, "evtchn", exc.errno) from None
        finally:
            os.close(fd)

    # ---- Platform ----

    def xenstore_path(self) -> str:
        env = os.environ.get("XENSTORED_PATH")
        if env:
            return env
        for path in XENSTORED_SOCKETS:
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    return path
            except OSError:
                continue
        return os.path.join(self.dev_dir, "xenbus")

    def own_domid(self) -> int:
        return self._own_domid

    def open_event_channel(self) -> XenEventChannelHandle:
        return XenEventChannelHandle(devices.open_device(self.dev_dir, "evtchn", nonblock=True))

    def create_ioreq_server(self, domid: int) -> XenIoreqServer:
        return XenIoreqServer(self.privcmd, domid)

    def open_ioreq_server(self, domid: int, server_id: int) -> XenIoreqServer:
        return XenIoreqServer(self.privcmd, domid, existing=server_id)

    def irq_line(self, domid: int, irq: int) -> IrqLine:
        return IrqLine(self.privcmd.fd, domid, irq)

    def guest_memory_bytes(self, domid: int) -> int:
        """The guest's RAM size: `memory_size` if given, else xenstore's static-max."""
        if self._memory_size is not None:
            return self._memory_size(domid)
        return read_guest_memory_bytes(self.xenstore_path(), domid)

    def map_guest_memory(self, domid: int) -> XenGuestMemory:
        # A backend is handed an fd that can map this guest and nothing else.
        backend = P.Privcmd(devices.open_device(self.dev_dir, "privcmd"))
        try:
            backend.restrict(domid)
            return XenGuestMemory(self.privcmd, domid, self.guest_memory_bytes(domid), backend)
        except BaseException:
            backend.close()
            raise

    def open_grant_mapper(self, domid: int) -> XenGrantMapper:
        return XenGrantMapper(devices.open_device(self.dev_dir, "gntdev"), domid, self._max_grants)

    # ---- kernel fast paths ----

    def assign_irqfd(self, domid: int, irq: int, eventfd: int, deassign: bool = False) -> None:
        """Kernel raises `irq` of `domid` (set_irq_level 1) when `eventfd` is written."""
        if self.irqfd_request is None:
            raise HypercallError("this kernel has no privcmd irqfd", errno.ENOTTY)
        op = P.dm_op_set_irq_level(irq, 1)
        self.privcmd.irqfd(self.irqfd_request, domid, eventfd, op, deassign)

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
        """Kernel completes a write of `vq` to `addr` (QueueNotify) by signalling `eventfd`."""
        if not self.supports_ioeventfd:
            raise HypercallError("this kernel has no privcmd ioeventfd", errno.ENOTTY)
        self.privcmd.ioeventfd(
            server.domid, server.page_address, ports, addr, addr_len, eventfd, vq, deassign
        )

    def close(self) -> None:
        self.privcmd.close()


def read_guest_memory_bytes(xenstore_path: str, domid: int) -> int:
    """A guest's maximum RAM in bytes, from /local/domain/<domid>/memory/static-max (KiB)."""
    from xvf.protocols.xenstore import XenStore

    path = f"/local/domain/{domid}/memory/static-max"
    with XenStore(xenstore_path) as xs:
        value = xs.read(path)
    if value is None or not value.strip().isdigit():
        raise PlatformUnavailable(f"cannot size domain {domid}'s RAM: {path} is {value!r}")
    return int(value) * 1024


if TYPE_CHECKING:
    from xvf.platform.interface import Platform

    def _is_a_platform(p: XenPlatform) -> Platform:
        """mypy's proof that XenPlatform (and all it hands out) is a `Platform`."""
        return p
