"""/dev/xen/privcmd: argument packing (pure functions) and the ioctls that use them.

Every struct the kernel or Xen reads is built by a `pack_*`/`dm_op_*` function
returning bytes, so tests compare them byte for byte with what the C compiler
makes of Debian's headers (tests/unit/test_xen_platform.py). Layouts are those
of a 64-bit Linux Dom0 (aarch64 or x86_64, both little-endian).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct

from xvf.errors import HypercallError

log = logging.getLogger("xvf.platform.xen.privcmd")

PAGE_SIZE = 4096
PAGE_SHIFT = 12
DOMID_INVALID = 0x7FF4

# ---- ioctl numbers (asm-generic encoding, used by x86 and arm64) ----
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2


def ioc(direction: int, type_: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(type_) << 8) | nr


# struct layouts ("=" : native order, no implicit padding; pads are explicit)
DM_OP_BUF = struct.Struct("=QQ")  # privcmd_dm_op_buf {void *uptr; size_t size}
PRIVCMD_DM_OP = struct.Struct("=HH4xQ")  # {domid_t dom; u16 num; ubufs*}
MMAP_RESOURCE = struct.Struct("=H2xIIIQQ")  # {dom; type; id; idx; u64 num; u64 addr}
MMAPBATCH_V2 = struct.Struct("=IH2xQQQ")  # {uint num; dom; u64 addr; arr*; err*}
RESTRICT = struct.Struct("=H")  # domid_t
IRQFD = struct.Struct("=QIIIH2x")  # {u64 dm_op; size; fd; flags; dom; pad[2]}
# {u64 ioreq; u64 ports; u64 addr; addr_len; event_fd; vcpus; vq; flags; dom; pad[2]}
IOEVENTFD = struct.Struct("=QQQIIIIIH2x")

IOCTL_PRIVCMD_MMAPBATCH_V2 = ioc(IOC_NONE, "P", 4, MMAPBATCH_V2.size)
IOCTL_PRIVCMD_DM_OP = ioc(IOC_NONE, "P", 5, PRIVCMD_DM_OP.size)
IOCTL_PRIVCMD_RESTRICT = ioc(IOC_NONE, "P", 6, RESTRICT.size)
IOCTL_PRIVCMD_MMAP_RESOURCE = ioc(IOC_NONE, "P", 7, MMAP_RESOURCE.size)
IOCTL_PRIVCMD_IRQFD = ioc(IOC_WRITE, "P", 8, IRQFD.size)
IOCTL_PRIVCMD_IOEVENTFD = ioc(IOC_WRITE, "P", 9, IOEVENTFD.size)
# Linux 6.6.0 numbered IRQFD with _IOC_NONE; 6.6 stable and 6.7+ use _IOW.
IOCTL_PRIVCMD_IRQFD_6_6_0 = ioc(IOC_NONE, "P", 8, IRQFD.size)
PRIVCMD_IRQFD_FLAG_DEASSIGN = 1
PRIVCMD_IOEVENTFD_FLAG_DEASSIGN = 1

# ---- Xen dm_op (public/hvm/dm_op.h) ----
DM_OP_SIZE = 32  # struct xen_dm_op: op, pad, 24-byte union
DM_OP_HEADER = struct.Struct("=II")
XEN_DMOP_create_ioreq_server = 1
XEN_DMOP_get_ioreq_server_info = 2
XEN_DMOP_map_io_range_to_ioreq_server = 3
XEN_DMOP_unmap_io_range_from_ioreq_server = 4
XEN_DMOP_set_ioreq_server_state = 5
XEN_DMOP_destroy_ioreq_server = 6
XEN_DMOP_set_irq_level = 19
XEN_DMOP_nr_vcpus = 20
XEN_DMOP_IO_RANGE_PORT = 0
XEN_DMOP_IO_RANGE_MEMORY = 1
XEN_DMOP_no_gfns = 1
HVM_IOREQSRV_BUFIOREQ_OFF = 0

# ---- acquire_resource (public/memory.h) ----
XENMEM_resource_ioreq_server = 0
XENMEM_resource_ioreq_server_frame_bufioreq = 0


def XENMEM_resource_ioreq_server_frame_ioreq(n: int) -> int:
    return 1 + n


# ---- Arm guest memory map (public/arch-arm.h) ----
GUEST_RAM_BANKS = ((0x40000000, 0xC0000000), (0x0200000000, 0xFE00000000))


def pack_dm_op(op: int, body: bytes = b"") -> bytes:
    """A struct xen_dm_op: header, the union member's bytes, zero padding to 32."""
    if len(body) > DM_OP_SIZE - DM_OP_HEADER.size:
        raise ValueError(f"dm_op {op} body of {len(body)} bytes overflows the union")
    raw = DM_OP_HEADER.pack(op, 0) + body
    return raw + bytes(DM_OP_SIZE - len(raw))


def dm_op_create_ioreq_server(handle_bufioreq: int = HVM_IOREQSRV_BUFIOREQ_OFF) -> bytes:
    return pack_dm_op(XEN_DMOP_create_ioreq_server, struct.pack("=B3xH", handle_bufioreq, 0))


def dm_op_get_ioreq_server_info(server_id: int, flags: int = XEN_DMOP_no_gfns) -> bytes:
    body = struct.pack("=HHIQQ", server_id, flags, 0, 0, 0)
    return pack_dm_op(XEN_DMOP_get_ioreq_server_info, body)


def dm_op_io_range(map_: bool, server_id: int, type_: int, start: int, end_inclusive: int) -> bytes:
    op = XEN_DMOP_map_io_range_to_ioreq_server
    if not map_:
        op = XEN_DMOP_unmap_io_range_from_ioreq_server
    return pack_dm_op(op, struct.pack("=HHIQQ", server_id, 0, type_, start, end_inclusive))


def dm_op_set_ioreq_server_state(server_id: int, enabled: bool) -> bytes:
    return pack_dm_op(XEN_DMOP_set_ioreq_server_state, struct.pack("=HBx", server_id, int(enabled)))


def dm_op_destroy_ioreq_server(server_id: int) -> bytes:
    return pack_dm_op(XEN_DMOP_destroy_ioreq_server, struct.pack("=H2x", server_id))


def dm_op_set_irq_level(irq: int, level: int) -> bytes:
    return pack_dm_op(XEN_DMOP_set_irq_level, struct.pack("=IB3x", irq, 1 if level else 0))


def dm_op_nr_vcpus() -> bytes:
    return pack_dm_op(XEN_DMOP_nr_vcpus)


def parse_created_server_id(out: bytes) -> int:
    return struct.unpack_from("=H", out, DM_OP_HEADER.size + 4)[0]


def parse_ioreq_server_info(out: bytes) -> tuple[int, int, int]:
    """(bufioreq_port, ioreq_gfn, bufioreq_gfn) of a completed get_ioreq_server_info."""
    _, _, port, gfn, bufgfn = struct.unpack_from("=HHIQQ", out, DM_OP_HEADER.size)
    return port, gfn, bufgfn


def parse_nr_vcpus(out: bytes) -> int:
    return struct.unpack_from("=I", out, DM_OP_HEADER.size)[0]


def pack_dm_op_buf(uptr: int, size: int) -> bytes:
    return DM_OP_BUF.pack(uptr, size)


def pack_privcmd_dm_op(domid: int, num: int, ubufs: int) -> bytes:
    return PRIVCMD_DM_OP.pack(domid, num, ubufs)


def pack_mmap_resource(domid: int, type_: int, id_: int, idx: int, num: int, addr: int) -> bytes:
    return MMAP_RESOURCE.pack(domid, type_, id_, idx, num, addr)


def pack_mmapbatch_v2(num: int, domid: int, addr: int, arr: int, err: int) -> bytes:
    return MMAPBATCH_V2.pack(num, domid, addr, arr, err)


def pack_restrict(domid: int) -> bytes:
    return RESTRICT.pack(domid)


def pack_irqfd(dm_op: int, size: int, fd: int, flags: int, domid: int) -> bytes:
    return IRQFD.pack(dm_op, size, fd & 0xFFFFFFFF, flags, domid)


def pack_ioeventfd(
    ioreq: int,
    ports: int,
    addr: int,
    addr_len: int,
    event_fd: int,
    vcpus: int,
    vq: int,
    flags: int,
    domid: int,
) -> bytes:
    return IOEVENTFD.pack(
        ioreq, ports, addr, addr_len, event_fd & 0xFFFFFFFF, vcpus, vq, flags, domid
    )


def guest_ram_banks(mem_bytes: int) -> list[tuple[int, int]]:
    """Where libxl puts `mem_bytes` of Arm guest RAM: bank 0 first (3 GiB), then bank 1."""
    if mem_bytes <= 0 or mem_bytes % PAGE_SIZE:
        raise ValueError(f"guest memory size {mem_bytes:#x} is not a positive page multiple")
    banks = []
    left = mem_bytes
    for base, size in GUEST_RAM_BANKS:
        take = min(left, size)
        if take:
            banks.append((base, take))
        left -= take
    if left:
        raise ValueError(f"guest memory size {mem_bytes:#x} exceeds the Arm guest RAM banks")
    return banks


# ---- system calls through libc (pointers inside the structs need stable buffers) ----

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def raw_ioctl(fd: int, request: int, arg: ctypes.Array | None) -> int:
    """ioctl(2) with a ctypes buffer; returns the result or raises OSError."""
    rc = _libc.ioctl(fd, request, ctypes.addressof(arg) if arg is not None else None)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


class Mapping:
    """A shared mapping of the privcmd device (ioreq page or foreign guest RAM).

    Python's mmap object counts the buffers exported from it, so a mapping
    still used by the hot path (or any memoryview) is never unmapped under it.
    """

    def __init__(self, fd: int, length: int) -> None:
        try:
            self._mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise HypercallError(f"mmap of {length:#x} bytes failed", exc.errno) from None
        probe = ctypes.c_char.from_buffer(self._mm)
        self.address: int = ctypes.addressof(probe)
        del probe
        self.length = length
        self.view = memoryview(self._mm)

    def close(self) -> bool:
        """Unmap; False (and still mapped) while a consumer holds the buffer."""
        if not self.address:
            return True
        try:
            self.view.release()  # refused while a consumer holds this view
            try:
                self._mm.close()  # refused while any other view of the map lives
            except BufferError:
                self.view = memoryview(self._mm)
                raise
        except BufferError:
            # Unmapping under a live buffer would leave it dangling: keep the
            # mapping until a later close(), or until the process exits.
            log.warning("mapping at %#x still in use; left mapped", self.address)
            return False
        self.address = 0
        return True


class Privcmd:
    """An open /dev/xen/privcmd fd and the operations xvf issues through it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def probe(self) -> int:
        """A DM_OP with no buffers: 0 on privcmd, an errno anywhere else."""
        arg = ctypes.create_string_buffer(pack_privcmd_dm_op(DOMID_INVALID, 0, 0))
        try:
            raw_ioctl(self.fd, IOCTL_PRIVCMD_DM_OP, arg)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def dm_op(self, domid: int, op: bytes) -> bytes:
        """Issue one struct xen_dm_op; returns it as Xen left it (OUT fields filled)."""
        buf = ctypes.create_string_buffer(op, len(op))
        bufs = ctypes.create_string_buffer(pack_dm_op_buf(ctypes.addressof(buf), len(op)))
        arg = ctypes.create_string_buffer(pack_privcmd_dm_op(domid, 1, ctypes.addressof(bufs)))
        code = struct.unpack_from("=I", op)[0]
        try:
            raw_ioctl(self.fd, IOCTL_PRIVCMD_DM_OP, arg)
        except OSError as exc:
            raise HypercallError(f"dm_op {code} for domain {domid} failed", exc.errno) from None
        return buf.raw

    def restrict(self, domid: int) -> None:
        """Limit this fd to one guest (IOCTL_PRIVCMD_RESTRICT); cannot be undone."""
        arg = ctypes.create_string_buffer(pack_restrict(domid))
        try:
            raw_ioctl(self.fd, IOCTL_PRIVCMD_RESTRICT, arg)
        except OSError as exc:
            raise HypercallError(f"restricting privcmd to domain {domid}", exc.errno) from None

    def map_resource(self, domid: int, type_: int, id_: int, idx: int, num: int) -> Mapping:
        """XENMEM_acquire_resource frames mapped here (the ioreq page)."""
        m = Mapping(self.fd, num * PAGE_SIZE)
        packed = pack_mmap_resource(domid, type_, id_, idx, num, m.address)
        arg = ctypes.create_string_buffer(packed)
        try:
            raw_ioctl(self.fd, IOCTL_PRIVCMD_MMAP_RESOURCE, arg)
        except OSError as exc:
            m.close()
            raise HypercallError(
                f"mapping resource type {type_} id {id_} frame {idx} of domain {domid}", exc.errno
            ) from None
        return m

    def map_foreign(
        self, domid: int, gpa: int, size: int, partial: bool = False
    ) -> tuple[Mapping, int]:
        """Map `size` bytes of a guest's RAM at guest-physical `gpa` (MMAPBATCH_V2).

        One ioctl for the whole mapping: Linux's privcmd refuses (EINVAL) a first
        MMAPBATCH on a fresh mapping that does not cover all of it, so chunks would fail
        for any bank over one chunk.

        Returns the mapping and how many bytes from `gpa` on are really mapped. MMAPBATCH_V2
        reports a frame that is not populated in its err array while the ioctl itself
        succeeds, and touching such a page is a SIGBUS: with `partial` the mapped part
        ends before the first such frame (the guest's RAM is smaller than asked for),
        otherwise any such frame is an error.
        """
        pages = size // PAGE_SIZE
        first = gpa >> PAGE_SHIFT
        m = Mapping(self.fd, pages * PAGE_SIZE)
        try:
            arr = (ctypes.c_uint64 * pages)(*range(first, first + pages))
            errs = (ctypes.c_int * pages)()
            arg = ctypes.create_string_buffer(
                pack_mmapbatch_v2(
                    pages, domid, m.address, ctypes.addressof(arr), ctypes.addressof(errs)
                )
            )
            try:
                raw_ioctl(self.fd, IOCTL_PRIVCMD_MMAPBATCH_V2, arg)
            except OSError as exc:
                bad = next((i for i in range(pages) if errs[i]), None)
                where = (
                    "" if bad is None else f"; first failing gfn {first + bad:#x} ({-errs[bad]})"
                )
                raise HypercallError(
                    f"foreign mapping of {pages} pages of domain {domid} at gfn {first:#x}{where}",
                    exc.errno,
                ) from None
            bad = next((i for i in range(pages) if errs[i]), None)
            if bad is not None and not partial:
                raise HypercallError(
                    f"foreign mapping of domain {domid}: gfn {first + bad:#x} is not mapped",
                    -errs[bad],
                )
        except BaseException:
            m.close()
            raise
        return m, (pages if bad is None else bad) * PAGE_SIZE

    # ---- irqfd / ioeventfd (Linux >= 6.6 / 6.7 with CONFIG_XEN_PRIVCMD_EVENTFD) ----

    def _probe_request(self, request: int, arg: bytes) -> int:
        buf = ctypes.create_string_buffer(arg)
        try:
            raw_ioctl(self.fd, request, buf)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def probe_eventfd_ioctls(self) -> tuple[int | None, bool]:
        """(irqfd request number or None, ioeventfd supported).

        Each probe deassigns fd -1: a kernel with the ioctl looks the eventfd up
        and fails with EBADF; one without it says ENOTTY (unknown ioctl), or
        EOPNOTSUPP (built without CONFIG_XEN_PRIVCMD_EVENTFD).
        """
        known = {errno.EBADF, errno.EPERM, errno.ENOENT, errno.ENODEV, 0}
        irqfd_arg = pack_irqfd(0, 0, -1, PRIVCMD_IRQFD_FLAG_DEASSIGN, 0)
        irqfd: int | None = None
        for request in (IOCTL_PRIVCMD_IRQFD, IOCTL_PRIVCMD_IRQFD_6_6_0):
            err = self._probe_request(request, irqfd_arg)
            if err in known:
                irqfd = request
                break
            if err != errno.ENOTTY:
                break
        ioev_arg = pack_ioeventfd(0, 0, 0, 4, -1, 1, 0, PRIVCMD_IOEVENTFD_FLAG_DEASSIGN, 0)
        ioeventfd = self._probe_request(IOCTL_PRIVCMD_IOEVENTFD, ioev_arg) in known
        return irqfd, ioeventfd

    def irqfd(
        self, request: int, domid: int, eventfd: int, dm_op: bytes, deassign: bool = False
    ) -> None:
        """Have the kernel issue `dm_op` (set_irq_level) whenever `eventfd` is signalled."""
        op = ctypes.create_string_buffer(dm_op, len(dm_op))  # copied by the kernel
        flags = PRIVCMD_IRQFD_FLAG_DEASSIGN if deassign else 0
        arg = ctypes.create_string_buffer(
            pack_irqfd(ctypes.addressof(op), len(dm_op), eventfd, flags, domid)
        )
        try:
            raw_ioctl(self.fd, request, arg)
        except OSError as exc:
            what = "deassigning" if deassign else "assigning"
            raise HypercallError(f"{what} irqfd {eventfd} for domain {domid}", exc.errno) from None

    def ioeventfd(
        self,
        domid: int,
        ioreq_page: int,
        ports: list[int],
        addr: int,
        addr_len: int,
        eventfd: int,
        vq: int,
        deassign: bool = False,
    ) -> None:
        """Have the kernel complete writes of `vq` to `addr` by signalling `eventfd`.

        `ioreq_page` is the address of the mapped ioreq page; `ports` the local
        event-channel ports bound for each vCPU (the kernel shares their IRQs).
        """
        arr = (ctypes.c_uint32 * len(ports))(*ports)
        flags = PRIVCMD_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        arg = ctypes.create_string_buffer(
            pack_ioeventfd(
                ioreq_page,
                ctypes.addressof(arr),
                addr,
                addr_len,
                eventfd,
                len(ports),
                vq,
                flags,
                domid,
            )
        )
        try:
            raw_ioctl(self.fd, IOCTL_PRIVCMD_IOEVENTFD, arg)
        except OSError as exc:
            what = "deassigning" if deassign else "assigning"
            raise HypercallError(
                f"{what} ioeventfd for queue {vq} at {addr:#x} of domain {domid}", exc.errno
            ) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
