# cython: language_level=3
"""/dev/xen/privcmd: the dm_ops xvf issues and the ioctls that carry them.

Every struct Xen or the kernel reads is a C struct of include/xvf/ (xen_dmop.h,
linux_xen.h), whose layouts tests/unit/test_abi_conformance.py checks against
Debian's headers; nothing here lays out bytes by hand. `dm_op_*` build a struct
xen_dm_op and return its bytes, `parse_*` read Xen's answers out of one, and
`Privcmd` issues the ioctls. The `pack_*` functions return the bytes of the
ioctl arguments exactly as `Privcmd` fills them, for the tests.
"""

from cpython.buffer cimport Py_buffer, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EBADF, EIO, ENODEV, ENOENT, EPERM, ENOTTY, errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from xvf.hotpath.includes.linux_xen cimport (
    XVF_IOCTL_PRIVCMD_DM_OP, XVF_IOCTL_PRIVCMD_IOEVENTFD, XVF_IOCTL_PRIVCMD_IRQFD,
    XVF_IOCTL_PRIVCMD_IRQFD_6_6_0, XVF_IOCTL_PRIVCMD_MMAP_RESOURCE, XVF_IOCTL_PRIVCMD_RESTRICT,
    XVF_IOCTL_PRIVCMD_MMAPBATCH_V2, XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN,
    XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN, xvf_privcmd_dm_op_buf_t, xvf_privcmd_dm_op_t,
    xvf_privcmd_ioeventfd_t, xvf_privcmd_irqfd_t, xvf_privcmd_mmap_resource_t,
    xvf_privcmd_mmapbatch_v2_t,
)
from xvf.hotpath.includes.system cimport close, ioctl
from xvf.hotpath.includes.xen_arm cimport (
    XVF_GUEST_RAM0_BASE, XVF_GUEST_RAM0_SIZE, XVF_GUEST_RAM1_BASE, XVF_GUEST_RAM1_SIZE,
)
from xvf.hotpath.includes.xen_dmop cimport (
    XVF_DMOP_create_ioreq_server, XVF_DMOP_destroy_ioreq_server,
    XVF_DMOP_get_ioreq_server_info, XVF_DMOP_IO_RANGE_MEMORY, XVF_DMOP_IO_RANGE_PORT,
    XVF_DMOP_map_io_range_to_ioreq_server, XVF_DMOP_no_gfns, XVF_DMOP_nr_vcpus,
    XVF_DMOP_set_ioreq_server_state, XVF_DMOP_set_irq_level,
    XVF_DMOP_unmap_io_range_from_ioreq_server, XVF_DOMID_INVALID,
    XVF_HVM_IOREQSRV_BUFIOREQ_OFF, xvf_dm_op_t,
)
from xvf.hotpath.includes.xen_ioreq cimport (
    XVF_IOREQ_SERVER_FRAME_IOREQ, XVF_IOREQ_SLOTS_PER_PAGE, XVF_PAGE_SIZE,
    XVF_XENMEM_RESOURCE_IOREQ_SERVER,
)

import logging
import mmap as _mmap

from xvf.errors import HypercallError

log = logging.getLogger("xvf.platform.xen.privcmd")

# For Python callers and tests; the values are the headers'.
PAGE_SIZE = XVF_PAGE_SIZE
DOMID_INVALID = XVF_DOMID_INVALID
IOREQ_SLOTS_PER_PAGE = XVF_IOREQ_SLOTS_PER_PAGE
DM_OP_SIZE = sizeof(xvf_dm_op_t)
XEN_DMOP_IO_RANGE_PORT = XVF_DMOP_IO_RANGE_PORT
XEN_DMOP_IO_RANGE_MEMORY = XVF_DMOP_IO_RANGE_MEMORY
XEN_DMOP_no_gfns = XVF_DMOP_no_gfns
HVM_IOREQSRV_BUFIOREQ_OFF = XVF_HVM_IOREQSRV_BUFIOREQ_OFF
XENMEM_resource_ioreq_server = XVF_XENMEM_RESOURCE_IOREQ_SERVER
IOCTL_PRIVCMD_MMAPBATCH_V2 = XVF_IOCTL_PRIVCMD_MMAPBATCH_V2
IOCTL_PRIVCMD_DM_OP = XVF_IOCTL_PRIVCMD_DM_OP
IOCTL_PRIVCMD_MMAP_RESOURCE = XVF_IOCTL_PRIVCMD_MMAP_RESOURCE
IOCTL_PRIVCMD_IRQFD = XVF_IOCTL_PRIVCMD_IRQFD
IOCTL_PRIVCMD_IOEVENTFD = XVF_IOCTL_PRIVCMD_IOEVENTFD
IOCTL_PRIVCMD_IRQFD_6_6_0 = XVF_IOCTL_PRIVCMD_IRQFD_6_6_0
PRIVCMD_IRQFD_FLAG_DEASSIGN = XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN
PRIVCMD_IOEVENTFD_FLAG_DEASSIGN = XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN
# Arm guest RAM (public/arch-arm.h): (base, size) of each bank, in order.
GUEST_RAM_BANKS = ((XVF_GUEST_RAM0_BASE, XVF_GUEST_RAM0_SIZE),
                   (XVF_GUEST_RAM1_BASE, XVF_GUEST_RAM1_SIZE))


def XENMEM_resource_ioreq_server_frame_ioreq(unsigned int n) -> int:
    return XVF_IOREQ_SERVER_FRAME_IOREQ(n)


# ---- struct xen_dm_op ----

cdef inline void _dm_op_init(xvf_dm_op_t *op, uint32_t code) noexcept:
    memset(op, 0, sizeof(xvf_dm_op_t))
    op.op = code


cdef inline bytes _dm_op_bytes(xvf_dm_op_t *op):
    return PyBytes_FromStringAndSize(<char *>op, sizeof(xvf_dm_op_t))


cdef xvf_dm_op_t _dm_op_of(bytes out) except *:
    cdef xvf_dm_op_t op
    if len(out) != sizeof(xvf_dm_op_t):
        raise ValueError(f"a xen_dm_op is {sizeof(xvf_dm_op_t)} bytes, not {len(out)}")
    memcpy(&op, <const char *>out, sizeof(xvf_dm_op_t))
    return op


def dm_op_create_ioreq_server(
        unsigned int handle_bufioreq=XVF_HVM_IOREQSRV_BUFIOREQ_OFF) -> bytes:
    cdef xvf_dm_op_t op
    _dm_op_init(&op, XVF_DMOP_create_ioreq_server)
    op.u.create_ioreq_server.handle_bufioreq = handle_bufioreq
    return _dm_op_bytes(&op)


def dm_op_get_ioreq_server_info(uint16_t server_id, uint16_t flags=XVF_DMOP_no_gfns) -> bytes:
    cdef xvf_dm_op_t op
    _dm_op_init(&op, XVF_DMOP_get_ioreq_server_info)
    op.u.get_ioreq_server_info.id = server_id
    op.u.get_ioreq_server_info.flags = flags
    return _dm_op_bytes(&op)


def dm_op_io_range(bint map_, uint16_t server_id, uint32_t type_, uint64_t start,
                   uint64_t end_inclusive) -> bytes:
    """map_io_range_to_ioreq_server, or with map_=False unmap_io_range_from_ioreq_server
    (the two share one member layout)."""
    cdef xvf_dm_op_t op
    if map_:
        _dm_op_init(&op, XVF_DMOP_map_io_range_to_ioreq_server)
        op.u.map_io_range_to_ioreq_server.id = server_id
        op.u.map_io_range_to_ioreq_server.type = type_
        op.u.map_io_range_to_ioreq_server.start = start
        op.u.map_io_range_to_ioreq_server.end = end_inclusive
    else:
        _dm_op_init(&op, XVF_DMOP_unmap_io_range_from_ioreq_server)
        op.u.unmap_io_range_from_ioreq_server.id = server_id
        op.u.unmap_io_range_from_ioreq_server.type = type_
        op.u.unmap_io_range_from_ioreq_server.start = start
        op.u.unmap_io_range_from_ioreq_server.end = end_inclusive
    return _dm_op_bytes(&op)


def dm_op_set_ioreq_server_state(uint16_t server_id, bint enabled) -> bytes:
    cdef xvf_dm_op_t op
    _dm_op_init(&op, XVF_DMOP_set_ioreq_server_state)
    op.u.set_ioreq_server_state.id = server_id
    op.u.set_ioreq_server_state.enabled = 1 if enabled else 0
    return _dm_op_bytes(&op)


def dm_op_destroy_ioreq_server(uint16_t server_id) -> bytes:
    cdef xvf_dm_op_t op
    _dm_op_init(&op, XVF_DMOP_destroy_ioreq_server)
    op.u.destroy_ioreq_server.id = server_id
    return _dm_op_bytes(&op)


def dm_op_set_irq_level(uint32_t irq, int level) -> bytes:
    cdef xvf_dm_op_t op
    _dm_op_init(&op, XVF_DMOP_set_irq_level)
    op.u.set_irq_level.irq = irq
    op.u.set_irq_level.level = 1 if level else 0
    return _dm_op_bytes(&op)


def dm_op_nr_vcpus() -> bytes:
    cdef xvf_dm_op_t op
    _dm_op_init(&op, XVF_DMOP_nr_vcpus)
    return _dm_op_bytes(&op)


def parse_created_server_id(bytes out) -> int:
    return _dm_op_of(out).u.create_ioreq_server.id


def parse_ioreq_server_info(bytes out) -> tuple:
    """(bufioreq_port, ioreq_gfn, bufioreq_gfn) of a completed get_ioreq_server_info."""
    cdef xvf_dm_op_t op = _dm_op_of(out)
    return (op.u.get_ioreq_server_info.bufioreq_port, op.u.get_ioreq_server_info.ioreq_gfn,
            op.u.get_ioreq_server_info.bufioreq_gfn)


def parse_nr_vcpus(bytes out) -> int:
    return _dm_op_of(out).u.nr_vcpus.vcpus


# ---- ioctl arguments: filled here, used by Privcmd and returned as bytes by pack_* ----

cdef inline void _fill_dm_op(xvf_privcmd_dm_op_t *arg, xvf_privcmd_dm_op_buf_t *buf,
                             uint16_t domid, uint16_t num, void *uptr,
                             size_t size) noexcept nogil:
    memset(arg, 0, sizeof(arg[0]))
    memset(buf, 0, sizeof(buf[0]))
    buf.uptr = uptr
    buf.size = size
    arg.dom = domid
    arg.num = num
    arg.ubufs = buf if num else NULL


cdef inline void _fill_mmap_resource(xvf_privcmd_mmap_resource_t *arg, uint16_t domid,
                                     uint32_t type_, uint32_t id_, uint32_t idx, uint64_t num,
                                     uint64_t addr) noexcept nogil:
    memset(arg, 0, sizeof(arg[0]))
    arg.dom = domid
    arg.type = type_
    arg.id = id_
    arg.idx = idx
    arg.num = num
    arg.addr = addr


cdef inline void _fill_mmapbatch_v2(xvf_privcmd_mmapbatch_v2_t *arg, unsigned int num,
                                    uint16_t domid, uint64_t addr, const uint64_t *arr,
                                    int *err) noexcept nogil:
    memset(arg, 0, sizeof(arg[0]))
    arg.num = num
    arg.dom = domid
    arg.addr = addr
    arg.arr = arr
    arg.err = err


cdef inline void _fill_irqfd(xvf_privcmd_irqfd_t *arg, uint64_t dm_op, uint32_t size, int fd,
                             uint32_t flags, uint16_t domid) noexcept nogil:
    memset(arg, 0, sizeof(arg[0]))
    arg.dm_op = dm_op
    arg.size = size
    arg.fd = <uint32_t>fd
    arg.flags = flags
    arg.dom = domid


cdef inline void _fill_ioeventfd(xvf_privcmd_ioeventfd_t *arg, uint64_t ioreq, uint64_t ports,
                                 uint64_t addr, uint32_t addr_len, int event_fd, uint32_t vcpus,
                                 uint32_t vq, uint32_t flags, uint16_t domid) noexcept nogil:
    memset(arg, 0, sizeof(arg[0]))
    arg.ioreq = ioreq
    arg.ports = ports
    arg.addr = addr
    arg.addr_len = addr_len
    arg.event_fd = <uint32_t>event_fd
    arg.vcpus = vcpus
    arg.vq = vq
    arg.flags = flags
    arg.dom = domid


def pack_dm_op_buf(uint64_t uptr, size_t size) -> bytes:
    cdef xvf_privcmd_dm_op_t arg
    cdef xvf_privcmd_dm_op_buf_t buf
    _fill_dm_op(&arg, &buf, 0, 1, <void *><uintptr_t>uptr, size)
    return PyBytes_FromStringAndSize(<char *>&buf, sizeof(buf))


def pack_privcmd_dm_op(uint16_t domid, uint16_t num, uint64_t ubufs) -> bytes:
    """The argument with `ubufs` in place of the buffer array's address."""
    cdef xvf_privcmd_dm_op_t arg
    cdef xvf_privcmd_dm_op_buf_t buf
    _fill_dm_op(&arg, &buf, domid, num, NULL, 0)
    arg.ubufs = <xvf_privcmd_dm_op_buf_t *><uintptr_t>ubufs
    return PyBytes_FromStringAndSize(<char *>&arg, sizeof(arg))


def pack_mmap_resource(uint16_t domid, uint32_t type_, uint32_t id_, uint32_t idx, uint64_t num,
                       uint64_t addr) -> bytes:
    cdef xvf_privcmd_mmap_resource_t arg
    _fill_mmap_resource(&arg, domid, type_, id_, idx, num, addr)
    return PyBytes_FromStringAndSize(<char *>&arg, sizeof(arg))


def pack_mmapbatch_v2(unsigned int num, uint16_t domid, uint64_t addr, uint64_t arr,
                      uint64_t err) -> bytes:
    cdef xvf_privcmd_mmapbatch_v2_t arg
    _fill_mmapbatch_v2(&arg, num, domid, addr, <const uint64_t *><uintptr_t>arr,
                       <int *><uintptr_t>err)
    return PyBytes_FromStringAndSize(<char *>&arg, sizeof(arg))


def pack_irqfd(uint64_t dm_op, uint32_t size, int fd, uint32_t flags, uint16_t domid) -> bytes:
    cdef xvf_privcmd_irqfd_t arg
    _fill_irqfd(&arg, dm_op, size, fd, flags, domid)
    return PyBytes_FromStringAndSize(<char *>&arg, sizeof(arg))


def pack_ioeventfd(uint64_t ioreq, uint64_t ports, uint64_t addr, uint32_t addr_len,
                   int event_fd, uint32_t vcpus, uint32_t vq, uint32_t flags,
                   uint16_t domid) -> bytes:
    cdef xvf_privcmd_ioeventfd_t arg
    _fill_ioeventfd(&arg, ioreq, ports, addr, addr_len, event_fd, vcpus, vq, flags, domid)
    return PyBytes_FromStringAndSize(<char *>&arg, sizeof(arg))


# ---- mappings ----

cdef class Mapping:
    """A shared mapping of the privcmd device (ioreq page or foreign guest RAM).

    Python's mmap object counts the buffers exported from it, so a mapping
    still used by the hot path (or any memoryview) is never unmapped under it.
    """

    def __init__(self, int fd, size_t length):
        cdef Py_buffer buf
        try:
            self._mm = _mmap.mmap(fd, length, _mmap.MAP_SHARED,
                                  _mmap.PROT_READ | _mmap.PROT_WRITE)
        except OSError as exc:
            raise HypercallError(f"mmap of {length:#x} bytes failed", exc.errno) from None
        PyObject_GetBuffer(self._mm, &buf, PyBUF_WRITABLE)
        self.address = <uintptr_t>buf.buf
        PyBuffer_Release(&buf)
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


cdef int _first_error(const int *errs, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if errs[i]:
            return <int>i
    return -1


# ---- the device ----

cdef class Privcmd:
    """An open /dev/xen/privcmd fd and the operations xvf issues through it.

    Every ioctl runs without the GIL: a hypercall may take a while, and other
    threads (backend workers, the service loop) keep running meanwhile.
    """

    def __cinit__(self, int fd):
        self.fd = fd

    def probe(self) -> int:
        """A DM_OP with no buffers: 0 on privcmd, an errno anywhere else."""
        cdef xvf_privcmd_dm_op_t arg
        cdef xvf_privcmd_dm_op_buf_t buf
        cdef int rc
        _fill_dm_op(&arg, &buf, XVF_DOMID_INVALID, 0, NULL, 0)
        with nogil:
            rc = ioctl(self.fd, XVF_IOCTL_PRIVCMD_DM_OP, &arg)
        if rc < 0:
            return errno or EIO
        return 0

    def dm_op(self, uint16_t domid, bytes op) -> bytes:
        """Issue one struct xen_dm_op; returns it as Xen left it (OUT fields filled)."""
        cdef bytearray out = bytearray(op)
        cdef char *data = out
        cdef size_t size = len(out)
        cdef uint32_t code = 0
        cdef xvf_privcmd_dm_op_t arg
        cdef xvf_privcmd_dm_op_buf_t buf
        cdef int rc, err
        if size >= sizeof(code):
            memcpy(&code, data, sizeof(code))
        _fill_dm_op(&arg, &buf, domid, 1, data, size)
        with nogil:
            rc = ioctl(self.fd, XVF_IOCTL_PRIVCMD_DM_OP, &arg)
            err = errno
        if rc < 0:
            raise HypercallError(f"dm_op {code} for domain {domid} failed", err)
        return bytes(out)

    def restrict(self, uint16_t domid) -> None:
        """Limit this fd to one domain (IOCTL_PRIVCMD_RESTRICT); cannot be undone."""
        cdef uint16_t dom = domid
        cdef int rc, err = 0
        with nogil:
            rc = ioctl(self.fd, XVF_IOCTL_PRIVCMD_RESTRICT, &dom)
            if rc < 0:
                err = errno
        if rc < 0:
            raise HypercallError(f"restricting privcmd to domain {domid}", err)

    def map_resource(self, uint16_t domid, uint32_t type_, uint32_t id_, uint32_t idx,
                     uint64_t num) -> Mapping:
        """XENMEM_acquire_resource frames mapped here (the ioreq page)."""
        cdef xvf_privcmd_mmap_resource_t arg
        cdef int rc, err
        m = Mapping(self.fd, num * XVF_PAGE_SIZE)
        _fill_mmap_resource(&arg, domid, type_, id_, idx, num, m.address)
        with nogil:
            rc = ioctl(self.fd, XVF_IOCTL_PRIVCMD_MMAP_RESOURCE, &arg)
            err = errno
        if rc < 0:
            m.close()
            raise HypercallError(
                f"mapping resource type {type_} id {id_} frame {idx} of domain {domid}", err)
        return m

    def map_foreign(self, uint16_t domid, uint64_t gpa, uint64_t size,
                    bint partial=False) -> tuple:
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
        cdef size_t pages = size // XVF_PAGE_SIZE
        cdef uint64_t first = gpa // XVF_PAGE_SIZE
        cdef uint64_t *arr = NULL
        cdef int *errs = NULL
        cdef xvf_privcmd_mmapbatch_v2_t arg
        cdef size_t i
        cdef int rc, err
        cdef int bad = -1
        m = Mapping(self.fd, pages * XVF_PAGE_SIZE)
        try:
            arr = <uint64_t *>malloc((pages + 1) * sizeof(uint64_t))  # +1: never malloc(0)
            errs = <int *>calloc(pages + 1, sizeof(int))
            if arr == NULL or errs == NULL:
                raise MemoryError()
            for i in range(pages):
                arr[i] = first + i
            _fill_mmapbatch_v2(&arg, <unsigned int>pages, domid, m.address, arr, errs)
            with nogil:
                rc = ioctl(self.fd, XVF_IOCTL_PRIVCMD_MMAPBATCH_V2, &arg)
                err = errno
                bad = _first_error(errs, pages)
            if rc < 0:
                where = "" if bad < 0 else (
                    f"; first failing gfn {first + bad:#x} ({-errs[bad]})")
                raise HypercallError(
                    f"foreign mapping of {pages} pages of domain {domid} at gfn {first:#x}"
                    f"{where}", err)
            if bad >= 0 and not partial:
                raise HypercallError(
                    f"foreign mapping of domain {domid}: gfn {first + bad:#x} is not mapped",
                    -errs[bad])
        except BaseException:
            m.close()
            raise
        finally:
            free(arr)
            free(errs)
        return m, (pages if bad < 0 else <size_t>bad) * XVF_PAGE_SIZE

    # ---- irqfd / ioeventfd (Linux >= 6.6 / 6.7 with CONFIG_XEN_PRIVCMD_EVENTFD) ----

    cdef int _probe_request(self, unsigned long request, void *arg) noexcept:
        """0 when the ioctl succeeds, else its errno."""
        cdef int rc
        with nogil:
            rc = ioctl(self.fd, request, arg)
        if rc < 0:
            return errno or EIO
        return 0

    def probe_eventfd_ioctls(self) -> tuple:
        """(irqfd request number or None, ioeventfd supported).

        Each probe deassigns fd -1: a kernel with the ioctl looks the eventfd up
        and fails with EBADF; one without it says ENOTTY (unknown ioctl), or
        EOPNOTSUPP (built without CONFIG_XEN_PRIVCMD_EVENTFD).
        """
        cdef xvf_privcmd_irqfd_t irqfd_arg
        cdef xvf_privcmd_ioeventfd_t ioev_arg
        cdef unsigned long request
        cdef int err
        known = (EBADF, EPERM, ENOENT, ENODEV, 0)
        _fill_irqfd(&irqfd_arg, 0, 0, -1, XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN, 0)
        irqfd = None
        for request in (XVF_IOCTL_PRIVCMD_IRQFD, XVF_IOCTL_PRIVCMD_IRQFD_6_6_0):
            err = self._probe_request(request, &irqfd_arg)
            if err in known:
                irqfd = request
                break
            if err != ENOTTY:
                break
        _fill_ioeventfd(&ioev_arg, 0, 0, 0, 4, -1, 1, 0, XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN, 0)
        ioeventfd = self._probe_request(XVF_IOCTL_PRIVCMD_IOEVENTFD, &ioev_arg) in known
        return irqfd, ioeventfd

    def irqfd(self, unsigned long request, uint16_t domid, int eventfd, bytes dm_op,
              bint deassign=False) -> None:
        """Have the kernel issue `dm_op` (set_irq_level) whenever `eventfd` is signalled."""
        cdef const char *op = dm_op  # copied by the kernel
        cdef xvf_privcmd_irqfd_t arg
        cdef int rc, err
        flags = XVF_PRIVCMD_IRQFD_FLAG_DEASSIGN if deassign else 0
        _fill_irqfd(&arg, <uintptr_t>op, len(dm_op), eventfd, flags, domid)
        with nogil:
            rc = ioctl(self.fd, request, &arg)
            err = errno
        if rc < 0:
            what = "deassigning" if deassign else "assigning"
            raise HypercallError(f"{what} irqfd {eventfd} for domain {domid}", err)

    def ioeventfd(self, uint16_t domid, uint64_t ioreq_page, ports, uint64_t addr,
                  uint32_t addr_len, int eventfd, uint32_t vq, bint deassign=False) -> None:
        """Have the kernel complete writes of `vq` to `addr` by signalling `eventfd`.

        `ioreq_page` is the address of the mapped ioreq page; `ports` the local
        event-channel ports bound for each vCPU (the kernel shares their IRQs).
        """
        cdef size_t n = len(ports)
        cdef uint32_t *arr = <uint32_t *>malloc((n + 1) * sizeof(uint32_t))
        cdef xvf_privcmd_ioeventfd_t arg
        cdef size_t i
        cdef int rc, err
        if arr == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                arr[i] = ports[i]
            flags = XVF_PRIVCMD_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
            _fill_ioeventfd(&arg, ioreq_page, <uintptr_t>arr, addr, addr_len, eventfd,
                            <uint32_t>n, vq, flags, domid)
            with nogil:
                rc = ioctl(self.fd, XVF_IOCTL_PRIVCMD_IOEVENTFD, &arg)
                err = errno
        finally:
            free(arr)
        if rc < 0:
            what = "deassigning" if deassign else "assigning"
            raise HypercallError(
                f"{what} ioeventfd for queue {vq} at {addr:#x} of domain {domid}", err)

    def close(self) -> None:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
