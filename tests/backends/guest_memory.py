"""Guest memory as a backend sees it: the regions of SET_MEM_TABLE, mapped from the passed fds.

Guest-physical addresses (descriptor addresses) and front-end virtual addresses (SET_VRING_ADDR)
are both translated through the region table; anything not wholly inside one region is refused.

With XEN_MMAP negotiated, regions are mapped the way rust-vmm's vm-memory maps them on Xen. The
fd that comes with a FOREIGN or GRANT region says which Xen it is (`xen_backend_of`):

- real Xen: the front-end's own /dev/xen/privcmd (FOREIGN) or /dev/xen/gntdev (GRANT), a
  character device; mapped through their ioctls (xen_devices.py).
- the software Xen: a connection to the simulator's control socket (its privcmd/gntdev
  stand-in, xvf.platform.sim.control).

- FOREIGN: guest-physical [gpa, gpa + size) of the domain, mapped writable at SET_MEM_TABLE
  (software Xen: from the guest's RAM memfd, the region must lie in one bank).
- GRANT: the region's addresses are grant addresses (bit 63 | ref << 12 | offset); the refs that
  cover it are mapped writable at SET_MEM_TABLE (the rings).
- GRANT | NO_ADVANCE_MAP: nothing is mapped up front. Each descriptor buffer is mapped when its
  chain is walked (writable or read-only, as the descriptor says) and unmapped when the chain is
  completed, before the used entry is published, because the guest revokes the grants then.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import struct
from collections.abc import Callable
from typing import Protocol

from xvf.errors import GuestError, SimulatorError, VhostUserError, XvfError
from xvf.platform.sim import control as C

from . import xen_devices as xd
from .pages import PageMapping, map_file_pages

log = logging.getLogger(__name__)

# Xen mmap description flags (rust-vmm vm-memory MmapXenFlags; QEMU's spec text differs for the
# "no advance map" bit, rust-vmm is what the real backends run, so its value is used).
XEN_MMAP_UNIX = 0x0
XEN_MMAP_FOREIGN = 0x1
XEN_MMAP_GRANT = 0x2
XEN_MMAP_NO_ADVANCE_MAP = 0x8
_XEN_MMAP_KNOWN = XEN_MMAP_FOREIGN | XEN_MMAP_GRANT | XEN_MMAP_NO_ADVANCE_MAP

# What check_xen_mmap decides a region is.
MAP_FD = "fd"
MAP_FOREIGN = "foreign"
MAP_GRANT = "grant"
MAP_GRANT_ON_DEMAND = "grant on demand"

# These backends stand in for third-party ones (rust-vmm): they keep their own
# copy of these facts on purpose and never import xvf's (xvf.protocols.virtqueue).
GRANT_ADDR_BIT = 1 << 63  # XEN_GRANT_DMA_ADDR_OFF: grant addresses in rings and descriptors
PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
DOMID_FIRST_RESERVED = 0x7FF0
MAX_GRANTS_PER_MAP = 4096  # what one software-Xen OP_GNT_MAP takes
CONTROL_TIMEOUT = 5.0  # a peer that is not a software Xen may never answer


# What a Xen region's fd leads to (besides xd.PRIVCMD and xd.GNTDEV).
SOFTWARE_XEN = "software Xen"


class GuestMemoryError(GuestError):
    """A guest address range is not (wholly) inside the mapped guest memory, or cannot be mapped.
    `errno` is the failing call's, if one failed."""

    def __init__(self, message: str, err: int = 0) -> None:
        self.errno = err
        if err:
            message = f"{message}: {os.strerror(err)} ({errno.errorcode.get(err, err)})"
        super().__init__(message)


def _os_failure(what: str, e: OSError) -> GuestMemoryError:
    # xen_devices / pages put the failing step in strerror; plain OSErrors carry only the text.
    step = e.strerror if e.strerror and e.strerror != os.strerror(e.errno or 0) else "failed"
    return GuestMemoryError(f"{what}: {step}", e.errno or errno.EIO)


def check_xen_mmap(flags: int, domid: int) -> str:
    """The one place that decides whether a region with a Xen mmap description is valid, and how
    it is mapped: MAP_FD, MAP_FOREIGN, MAP_GRANT or MAP_GRANT_ON_DEMAND.

    rust-vmm accepts: UNIX (0: plain mmap of the fd), FOREIGN without NO_ADVANCE_MAP (privcmd
    foreign mapping of the whole region) and GRANT with or without NO_ADVANCE_MAP (gntdev).
    Everything else is refused as invalid.
    """
    if flags & ~_XEN_MMAP_KNOWN:
        raise VhostUserError(f"xen mmap flags {flags:#x}: unknown bits")
    if flags == XEN_MMAP_UNIX:
        return MAP_FD
    foreign, grant = bool(flags & XEN_MMAP_FOREIGN), bool(flags & XEN_MMAP_GRANT)
    on_demand = bool(flags & XEN_MMAP_NO_ADVANCE_MAP)
    if grant and not foreign:
        kind = MAP_GRANT_ON_DEMAND if on_demand else MAP_GRANT
    elif foreign and not grant and not on_demand:
        kind = MAP_FOREIGN
    else:
        raise VhostUserError(f"xen mmap flags {flags:#x}: invalid combination")
    if not 0 <= domid < DOMID_FIRST_RESERVED:
        raise VhostUserError(f"xen mmap flags {flags:#x}: domain id {domid} is not a guest")
    return kind


def _run_closers(closers: list[Callable[[], object]]) -> None:
    # Every step runs even if an earlier one fails: a leaked mapping must not leak the grants.
    for close in closers:
        try:
            close()
        except (BufferError, OSError, XvfError) as e:
            log.warning("releasing guest memory: %s", e)


class Region:
    """One region of the table. `view` is [gpa, gpa + size); None for an on-demand region.
    `kind` is how check_xen_mmap classified it."""

    kind: str = MAP_FD

    def __init__(
        self,
        gpa: int,
        size: int,
        uva: int,
        view: memoryview | None,
        closers: list[Callable[[], object]] | None = None,
    ) -> None:
        self.gpa, self.size, self.uva, self.view = gpa, size, uva, view
        self._closers = closers or []

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
        closers, self._closers = self._closers, []
        _run_closers(closers)


def _check_bounds(gpa: int, size: int, uva: int, offset: int) -> None:
    if size == 0:
        raise VhostUserError("memory region of size 0")
    for name, value in (("guest_phys_addr", gpa), ("userspace_addr", uva), ("mmap_offset", offset)):
        if value + size > 1 << 64:
            raise VhostUserError(f"memory region {name} {value:#x} + size {size:#x} overflows")


def _mmap_file(fd: int, file_offset: int, size: int) -> tuple[mmap.mmap, memoryview]:
    """Shared read-write mapping of fd[file_offset, file_offset + size), any alignment."""
    st = os.fstat(fd)
    # A file shorter than the mapping would SIGBUS this process on first touch.
    if stat.S_ISREG(st.st_mode) and st.st_size < file_offset + size:
        raise VhostUserError(
            f"memory region fd is {st.st_size:#x} bytes, region needs {file_offset + size:#x}"
        )
    start = file_offset & ~(mmap.ALLOCATIONGRANULARITY - 1)
    skip = file_offset - start
    try:
        m = mmap.mmap(
            fd,
            skip + size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
    except (OSError, ValueError, OverflowError) as e:
        raise VhostUserError(f"cannot mmap memory region: {e}") from e
    return m, memoryview(m)[skip : skip + size]


def _close_mmap(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:
        pass  # a slice handed out earlier is still alive; the mapping goes when it does


def _mmap_region(gpa: int, size: int, uva: int, m: mmap.mmap, view: memoryview) -> Region:
    return Region(gpa, size, uva, view, [lambda: _close_mmap(m)])


def map_region(fd: int, gpa: int, size: int, uva: int, offset: int) -> Region:
    """A plain region (no Xen mmap description, or flags 0): mmap `fd` as vhost-user says, from
    file offset 0 for offset + size bytes (offsets need no page alignment)."""
    _check_bounds(gpa, size, uva, offset)
    m, view = _mmap_file(fd, offset, size)
    return _mmap_region(gpa, size, uva, m, view)


# ---- which Xen a region's fd leads to ----------------------------------------------------------


def _file_type(st: os.stat_result) -> str:
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(st.st_mode):
            return name
    return f"a file of mode {st.st_mode:#o}"


def xen_backend_of(fd: int, what: str) -> str:
    """What the fd of a FOREIGN or GRANT region leads to: xd.PRIVCMD or xd.GNTDEV (real Xen, the
    front-end's own device fd) or SOFTWARE_XEN (a socket: a connection to the simulator).
    Anything else is refused before it is mapped."""
    try:
        st = os.fstat(fd)
        if stat.S_ISSOCK(st.st_mode):
            return SOFTWARE_XEN
        kind = xd.identify(fd) if stat.S_ISCHR(st.st_mode) else None
    except OSError as e:
        raise VhostUserError(f"{what}: cannot tell what the region's fd is: {e}") from e
    if kind is not None:
        return kind
    if stat.S_ISCHR(st.st_mode):
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        raise VhostUserError(
            f"{what}: the region's fd is character device {dev}, neither /dev/xen/privcmd nor "
            "/dev/xen/gntdev"
        )
    raise VhostUserError(
        f"{what}: the region's fd is {_file_type(st)}: not a connection to a software Xen "
        "(privcmd.sock), and not /dev/xen/privcmd or /dev/xen/gntdev either"
    )


def grant_span(addr: int, length: int) -> tuple[int, int, int]:
    """(first ref, number of refs, offset in the first page) of grant range [addr, addr+length)."""
    if not addr & GRANT_ADDR_BIT:
        raise GuestMemoryError(f"{addr:#x} is not a grant address (bit 63 clear)")
    if length <= 0:
        raise GuestMemoryError(f"grant range {addr:#x} of length {length}")
    a = addr & ~GRANT_ADDR_BIT
    first, last = a >> PAGE_SHIFT, (a + length - 1) >> PAGE_SHIFT
    if last > 0xFFFFFFFF:
        raise GuestMemoryError(f"grant range {addr:#x}+{length:#x} runs past grant ref 2**32")
    return first, last - first + 1, a & (PAGE - 1)


def _refs_what(first: int, count: int, domid: int, writable: bool) -> str:
    access = "writable" if writable else "read-only"
    return f"grant refs {first}..{first + count - 1} of domain {domid} ({access})"


class GrantMapper(Protocol):
    """gntdev for one domain: real Xen's (GntdevMapper) or the software Xen's (SimGrantMapper).
    A mapping's close() unmaps it and then the grants."""

    def map(self, first: int, count: int, writable: bool) -> PageMapping: ...

    def close(self) -> None: ...


# ---- real Xen: the front-end's /dev/xen/privcmd and /dev/xen/gntdev fds -----------------------


def map_foreign_privcmd(fd: int, gpa: int, size: int, uva: int, domid: int) -> Region:
    """A FOREIGN region on real Xen: the guest frames covering [gpa, gpa + size)."""
    skip = gpa & (PAGE - 1)
    count = (skip + size + PAGE - 1) >> PAGE_SHIFT
    what = f"foreign region {gpa:#x}+{size:#x} of domain {domid}"
    try:
        mapping = xd.map_foreign(fd, domid, gpa >> PAGE_SHIFT, count)
    except OSError as e:
        raise _os_failure(what, e) from e
    whole = mapping.view()
    return Region(gpa, size, uva, whole[skip : skip + size], [whole.release, mapping.close])


class GntdevMapper:
    """Grants of one domain mapped through a duplicate of the front-end's gntdev fd. The
    duplicate stays open while any mapping made through it lives: its unmap ioctl needs it."""

    def __init__(self, fd: int, domid: int) -> None:
        self.fd: int | None = os.dup(fd)
        self.domid = domid
        self._live = 0
        self._closing = False

    def map(self, first: int, count: int, writable: bool) -> PageMapping:
        what = _refs_what(first, count, self.domid, writable)
        if self.fd is None or self._closing:
            raise GuestMemoryError(f"{what}: the memory table is gone")
        try:
            mapping = xd.map_grants(self.fd, self.domid, first, count, writable)
        except OSError as e:
            raise _os_failure(what, e) from e
        self._live += 1
        mapping.on_close(self._forget)  # after the unmap ioctl, which needs the fd
        log.debug("gntdev: mapped %s", what)
        return mapping

    def _forget(self) -> None:
        self._live -= 1
        if self._closing and not self._live:
            self._close_fd()

    def close(self) -> None:
        self._closing = True
        if not self._live:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


# ---- the software Xen's privcmd / gntdev, over the fd the front-end passed ---------------------


def _adopt_control(fd: int, what: str) -> C.ControlClient:
    """A client on a duplicate of `fd` (the caller keeps closing the original)."""
    dup = os.dup(fd)
    try:
        client = C.ControlClient.adopt(dup)
    except SimulatorError as e:
        os.close(dup)
        raise VhostUserError(
            f"{what}: the region's fd is not a connection to a software Xen ({e}); on the "
            "simulator, Xen regions are mapped only through its control socket (privcmd.sock)"
        ) from e
    client.sock.settimeout(CONTROL_TIMEOUT)
    return client


def _call(client: C.ControlClient, op: int, payload: bytes, what: str) -> tuple[bytes, list[int]]:
    try:
        return client.call(op, payload)
    except (OSError, SimulatorError) as e:  # socket.timeout is an OSError
        raise GuestMemoryError(f"{what}: the software Xen refused or did not answer: {e}") from e


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def map_foreign_sim(fd: int, gpa: int, size: int, uva: int, domid: int) -> Region:
    """A FOREIGN region on the software Xen: [gpa, gpa + size) of `domid`, from its RAM memfd."""
    what = f"foreign region {gpa:#x}+{size:#x} of domain {domid}"
    client = _adopt_control(fd, what)
    try:
        reply, fds = _call(client, C.OP_FOREIGN_MAP, struct.pack("<H", domid), what)
    finally:
        client.close()  # privcmd mappings outlive the fd they were made through
    try:
        if len(fds) != 1 or len(reply) < 4:
            raise GuestMemoryError(f"{what}: malformed OP_FOREIGN_MAP reply")
        (count,) = struct.unpack_from("<I", reply)
        if len(reply) != 4 + 24 * count:
            raise GuestMemoryError(f"{what}: malformed OP_FOREIGN_MAP reply")
        banks = [struct.unpack_from("<QQQ", reply, 4 + 24 * i) for i in range(count)]
        for bank_gpa, bank_size, bank_offset in banks:
            if bank_gpa <= gpa and gpa + size <= bank_gpa + bank_size:
                m, view = _mmap_file(fds[0], bank_offset + gpa - bank_gpa, size)
                return _mmap_region(gpa, size, uva, m, view)
        listed = ", ".join(f"{g:#x}+{s:#x}" for g, s, _ in banks)
        raise GuestMemoryError(f"{what} is not inside one RAM bank of the guest ({listed})")
    finally:
        _close_fds(fds)


class SimGrantMapper:
    """gntdev for one domain on the software Xen: maps consecutive refs over its connection."""

    def __init__(self, client: C.ControlClient, domid: int) -> None:
        self.client, self.domid = client, domid

    def map(self, first: int, count: int, writable: bool) -> PageMapping:
        what = _refs_what(first, count, self.domid, writable)
        if count > MAX_GRANTS_PER_MAP:
            raise GuestMemoryError(f"{what}: more than {MAX_GRANTS_PER_MAP} pages at once")
        refs = struct.pack(f"<{count}I", *range(first, first + count))
        head = struct.pack("<HBBI", self.domid, int(writable), 0, count)
        reply, fds = _call(self.client, C.OP_GNT_MAP, head + refs, what)
        try:
            if len(fds) != 1 or len(reply) != 8 * count:
                raise GuestMemoryError(f"{what}: malformed OP_GNT_MAP reply")
            offsets = struct.unpack(f"<{count}Q", reply)
            try:
                mapping = map_file_pages(fds[0], offsets, writable)
            except ValueError as e:
                raise GuestMemoryError(f"{what}: {e}") from e
            except OSError as e:
                raise _os_failure(what, e) from e
        except Exception:
            self.unmap(first, count)
            raise
        finally:
            _close_fds(fds)
        mapping.on_close(lambda: self.unmap(first, count))
        return mapping

    def unmap(self, first: int, count: int) -> None:
        """OP_GNT_UNMAP of refs first..first+count-1 (count 0: a no-op that the peer answers)."""
        refs = struct.pack(f"<{count}I", *range(first, first + count))
        what = f"unmapping grant refs {first}..{first + count - 1} of domain {self.domid}"
        _call(self.client, C.OP_GNT_UNMAP, struct.pack("<HHI", self.domid, 0, count) + refs, what)

    def close(self) -> None:
        self.client.close()  # like closing gntdev: whatever is still mapped goes


# ---- grant regions, whichever Xen maps them ---------------------------------------------------


def map_grant(mapper: GrantMapper, gpa: int, size: int, uva: int) -> Region:
    """A GRANT region mapped in advance (the rings): every ref it covers, writable."""
    first, count, skip = grant_span(gpa, size)
    try:
        mapping = mapper.map(first, count, writable=True)
    except Exception:
        mapper.close()
        raise
    whole = mapping.view()
    closers = [whole.release, mapping.close, mapper.close]
    return Region(gpa, size, uva, whole[skip : skip + size], closers)


class HeldBuffer:
    """A descriptor buffer of an on-demand grant region, mapped while its chain is in flight.

    The device works on a copy (`view`): a device-readable buffer is read once when mapped, a
    device-writable one is copied back at release. So no view into the grant mapping outlives
    it, and the grants can always be unmapped before the used entry is published.
    """

    def __init__(self, mapper: GrantMapper, addr: int, length: int, writable: bool) -> None:
        self.first, self.count, self.skip = grant_span(addr, length)
        self.length, self.writable = length, writable
        self.mapping: PageMapping | None = mapper.map(self.first, self.count, writable)
        try:
            with self.mapping.view() as mv:
                data = bytes(mv[self.skip : self.skip + length])
        except BaseException:
            self.release(write_back=False)
            raise
        self._data = bytearray(data) if writable else data
        self.view = memoryview(self._data)

    def release(self, write_back: bool = True) -> None:
        """Copy what the device wrote back into guest memory, then unmap the grants."""
        mapping, self.mapping = self.mapping, None
        if mapping is None:
            return

        def copy_back() -> None:
            if write_back and self.writable:
                with mapping.view() as mv:
                    mv[self.skip : self.skip + self.length] = self._data

        _run_closers([copy_back, mapping.close])


class OnDemandGrantRegion(Region):
    """A GRANT | NO_ADVANCE_MAP region: nothing is mapped until a buffer in it is used."""

    kind = MAP_GRANT_ON_DEMAND

    def __init__(self, mapper: GrantMapper, gpa: int, size: int, uva: int) -> None:
        super().__init__(gpa, size, uva, None, [mapper.close])
        self.mapper = mapper

    def hold(self, addr: int, length: int, writable: bool) -> HeldBuffer:
        return HeldBuffer(self.mapper, addr, length, writable)


def _sim_on_demand(mapper: SimGrantMapper, gpa: int, size: int, uva: int) -> Region:
    try:  # an empty unmap: does a software Xen answer on this fd at all?
        mapper.unmap(0, 0)
    except GuestMemoryError:
        mapper.close()
        raise
    return OnDemandGrantRegion(mapper, gpa, size, uva)


def map_xen_region(
    kind: str, fd: int, gpa: int, size: int, uva: int, offset: int, domid: int
) -> Region:
    """The region as `check_xen_mmap` classified it, mapped through whatever Xen `fd` leads to."""
    if kind == MAP_FD:
        return map_region(fd, gpa, size, uva, offset)
    if offset:
        # Neither privcmd/gntdev mappings nor the software Xen's handle take a file offset
        # (rust-vmm refuses one too); the front-end sends 0.
        raise VhostUserError(f"{kind} region at {gpa:#x}: mmap_offset {offset:#x} is not 0")
    _check_bounds(gpa, size, uva, 0)
    if kind != MAP_FOREIGN:
        grant_span(gpa, size)  # a grant region must be grant space
    what = f"{kind} region {gpa:#x}+{size:#x} of domain {domid}"
    via = xen_backend_of(fd, what)
    if via != SOFTWARE_XEN:
        need = xd.PRIVCMD if kind == MAP_FOREIGN else xd.GNTDEV
        if via != need:
            raise VhostUserError(
                f"{what}: the region's fd is {xd.NODES[via]}, this region needs {xd.NODES[need]}"
            )
    if kind == MAP_FOREIGN:
        if via == SOFTWARE_XEN:
            region = map_foreign_sim(fd, gpa, size, uva, domid)
        else:
            region = map_foreign_privcmd(fd, gpa, size, uva, domid)
    elif via == SOFTWARE_XEN:
        sim = SimGrantMapper(_adopt_control(fd, what), domid)
        if kind == MAP_GRANT:
            region = map_grant(sim, gpa, size, uva)
        else:
            region = _sim_on_demand(sim, gpa, size, uva)
    else:
        gntdev = GntdevMapper(fd, domid)
        if kind == MAP_GRANT:
            region = map_grant(gntdev, gpa, size, uva)
        else:
            region = OnDemandGrantRegion(gntdev, gpa, size, uva)
    region.kind = kind
    log.info("mapped %s", describe_region(region, via, domid))
    return region


def describe_region(r: Region, via: str, domid: int) -> str:
    """One line saying what a Xen region is and how it was mapped (logged once per region)."""
    if r.kind == MAP_FOREIGN:
        first, last = r.gpa >> PAGE_SHIFT, (r.gpa + r.size - 1) >> PAGE_SHIFT
        span = f"gpa {r.gpa:#x}..{r.gpa + r.size - 1:#x} (gfn {first:#x}..{last:#x})"
    else:
        first, count, skip = grant_span(r.gpa, r.size)
        span = f"grant refs {first}..{first + count - 1}"
        if skip:
            span += f" (from offset {skip:#x} in the first)"
    how = "nothing mapped until a buffer is used" if r.view is None else "mapped writable"
    return f"{r.kind} region via {via}: {span}, {r.size:#x} bytes of domain {domid}, {how}"


class GuestMemory:
    """The current memory table. Replaced wholesale by each SET_MEM_TABLE."""

    def __init__(self, regions: list[Region] | None = None) -> None:
        self.regions = sorted(regions or [], key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.gpa + a.size > b.gpa:
                raise VhostUserError(f"memory regions at {a.gpa:#x} and {b.gpa:#x} overlap")

    def __bool__(self) -> bool:
        return bool(self.regions)

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []

    def _find(self, gpa: int, length: int) -> Region:
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} overflows")
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size or (length == 0 and gpa == r.gpa + r.size):
                if gpa - r.gpa + length > r.size:
                    raise GuestMemoryError(
                        f"guest range {gpa:#x}+{length:#x} runs past the region ending at "
                        f"{r.gpa + r.size:#x}"
                    )
                return r
        raise GuestMemoryError(f"guest address {gpa:#x} is outside guest memory")

    def slice(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest [gpa, gpa + length), which must lie in one region that is
        mapped (not on demand: rings and the like must be mapped in advance)."""
        r = self._find(gpa, length)
        if r.view is None:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} is in a region mapped only on demand"
            )
        start = gpa - r.gpa
        return r.view[start : start + length]

    def buffer(self, gpa: int, length: int, writable: bool, held: list[HeldBuffer]) -> memoryview:
        """A descriptor buffer. In an on-demand grant region its grants are mapped (writable or
        read-only) and the HeldBuffer is appended to `held`, to be released at completion."""
        r = self._find(gpa, length)
        if not isinstance(r, OnDemandGrantRegion):
            return self.slice(gpa, length)
        if length == 0:
            return memoryview(bytearray() if writable else b"")
        hb = r.hold(gpa, length, writable)
        held.append(hb)
        return hb.view

    def read(self, gpa: int, length: int) -> bytes:
        r = self._find(gpa, length)
        if isinstance(r, OnDemandGrantRegion) and length:
            hb = r.hold(gpa, length, writable=False)  # e.g. an indirect table: read once
            try:
                return bytes(hb.view)
            finally:
                hb.release()
        return bytes(self.slice(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.slice(gpa, len(data))[:] = data

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Front-end virtual address (SET_VRING_ADDR) to guest-physical, range checked."""
        for r in self.regions:
            if r.uva <= uva < r.uva + r.size:
                if uva - r.uva + length > r.size:
                    raise GuestMemoryError(f"ring at uva {uva:#x}+{length:#x} runs past its region")
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError(f"front-end address {uva:#x} is in no memory region")
