# cython: language_level=3
"""The ioreq service loop and the hot virtio-mmio registers.

One `ServiceLoop` per daemon multiplexes, with epoll, the event-channel handle
(ioreq notifications from every vCPU of every IOREQ server), the backends' call
eventfds and any Python-level fds (xenstore, vhost-user sockets). Ioreq slots
are decoded here; QueueNotify, InterruptStatus and InterruptACK are answered
without calling Python. Every other register goes to the device's Python
register file (xvf.protocols.virtio_mmio), which shares this module's `MmioState`.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EBADF, ECONNRESET, EFAULT, EINTR, EINVAL, ENOTCONN, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from xvf.hotpath._evtchn cimport EventChannel
from xvf.hotpath.includes.linux_xen cimport (
    XVF_IOCTL_PRIVCMD_DM_OP, xvf_privcmd_dm_op_buf_t, xvf_privcmd_dm_op_t,
)
from xvf.hotpath.includes.system cimport (
    EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLERR, EPOLLHUP, EPOLLIN, epoll_create1,
    close, epoll_ctl, epoll_event, epoll_wait, ioctl, read, write,
)
from xvf.hotpath.includes.virtio_mmio cimport (
    XVF_VIRTIO_MMIO_INT_VRING, XVF_VIRTIO_MMIO_INTERRUPT_ACK, XVF_VIRTIO_MMIO_INTERRUPT_STATUS,
    XVF_VIRTIO_MMIO_QUEUE_NOTIFY, XVF_VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    XVF_VIRTIO_STATUS_DRIVER_OK,
)
from xvf.hotpath.includes.xen_dmop cimport XVF_DMOP_set_irq_level, xvf_dm_op_t
from xvf.hotpath.includes.xen_ioreq cimport (
    XVF_IOREQ_DATA_IS_PTR_BIT, XVF_IOREQ_DIR_BIT, XVF_IOREQ_SIZE, XVF_IOREQ_STATE_MASK,
    XVF_IOREQ_TYPE_COPY, XVF_IOREQ_TYPE_INVALIDATE, XVF_STATE_IOREQ_INPROCESS,
    XVF_STATE_IOREQ_READY, XVF_STATE_IORESP_READY, xvf_ioreq_t,
)

cdef extern from *:
    """
    /* Ordering against the other side of the shared ioreq page (Xen or the
     * simulator on another CPU): acquire after seeing READY, release before
     * publishing IORESP_READY. */
    static inline void xvf_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void xvf_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
    static inline void xvf_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline uint8_t xvf_load_flags(volatile uint8_t *p)
        { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void xvf_store_flags(volatile uint8_t *p, uint8_t v)
        { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    /* A spin-wait hint: lets the sibling hardware thread run (x86 PAUSE, Arm YIELD). */
    static inline void xvf_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__) || defined(__arm__)
        __asm__ __volatile__("yield" ::: "memory");
    #endif
    }
    """
    void xvf_acquire() nogil
    void xvf_release() nogil
    void xvf_full() nogil
    uint8_t xvf_load_flags(uint8_t *p) nogil
    void xvf_store_flags(uint8_t *p, uint8_t v) nogil
    void xvf_cpu_relax() nogil

import logging

from xvf.errors import HypercallError, XvfError

log = logging.getLogger("xvf.ioreq")

from xvf.ratelimit import RateLimitedLog  # noqa: E402

cdef enum:
    MAX_EVENTS = 64
    KIND_EVTCHN = 1
    KIND_CALL = 2
    KIND_PYTHON = 3


def fence_acquire() -> None:
    """Split-ring reader's barrier (virtio_rmb): after reading an index, before the
    entries it covers. A compiler and CPU fence (dmb ishld on aarch64)."""
    xvf_acquire()


def fence_release() -> None:
    """Split-ring writer's barrier (virtio_wmb): after writing entries, before the
    index that publishes them."""
    xvf_release()


def fence_full() -> None:
    """virtio_mb: between publishing an event index and re-reading the other side's
    index (the EVENT_IDX re-check), which needs a full barrier even on x86."""
    xvf_full()


cdef class IrqLine:
    """A guest interrupt line driven with XEN_DMOP_set_irq_level through
    IOCTL_PRIVCMD_DM_OP on a privcmd fd.

    The simulator's subclass (xvf.platform.sim._hotpath.SimIrqLine) sends the same
    xen_dm_op over its control socket instead.
    """

    def __cinit__(self, int fd, uint16_t domid, uint32_t irq):
        self.fd = fd
        self.domid = domid
        self.irq = irq
        self.level = 0

    cdef int c_set(self, int level) noexcept nogil:
        cdef xvf_dm_op_t op
        cdef int rc
        memset(&op, 0, sizeof(op))
        op.op = XVF_DMOP_set_irq_level
        op.u.set_irq_level.irq = self.irq
        op.u.set_irq_level.level = 1 if level else 0
        rc = self.c_issue(&op)
        if rc < 0:
            return rc
        self.level = level
        self.changes += 1
        return 0

    cdef int c_issue(self, xvf_dm_op_t *op) noexcept nogil:
        cdef xvf_privcmd_dm_op_buf_t buf
        cdef xvf_privcmd_dm_op_t arg
        buf.uptr = op
        buf.size = sizeof(xvf_dm_op_t)
        arg.dom = self.domid
        arg.num = 1
        arg.ubufs = &buf
        if ioctl(self.fd, XVF_IOCTL_PRIVCMD_DM_OP, &arg) < 0:
            return -errno
        return 0

    def set(self, int level) -> None:
        cdef int rc
        with nogil:
            rc = self.c_set(level)
        if rc < 0:
            raise HypercallError(
                f"set_irq_level(irq {self.irq}, {level}) for domain {self.domid}", -rc)


cdef class MmioState:
    """Register state shared by the hot path and the Python register file.

    `handler` is the Python object implementing every other register:
    `mmio_read(offset, size) -> int` and `mmio_write(offset, size, value)`.
    """

    def __cinit__(self):
        cdef int i
        for i in range(MAX_QUEUES):
            self.kick_fds[i] = -1
        self._deferred = {}
        self._deferring = <uint64_t>-1
        self._handler_errors = RateLimitedLog(log)

    def defer_access(self) -> int:
        """Called by a register handler: leave the current access unanswered until
        `answer(token)`. Returns the token; outside an access (tests) it is 0."""
        if self._deferring == <uint64_t>-1:
            return 0
        self._defer_next += 1
        self._deferring = self._defer_next
        return self._deferring

    def answer(self, uint64_t token, uint64_t value=0) -> bool:
        """Answer a deferred access (a read gets `value`); False if it is gone already."""
        entry = self._deferred.pop(token, None)
        if entry is None:
            if token != 0 and token == self._deferring:
                # Answered by its own handler before returning: not deferred after all.
                self._deferring = 0
                return True
            return False
        if entry[0] is None:  # an access() from a test or benchmark: nobody waits in a slot
            return True
        return (<IoreqServer>entry[0]).c_answer(entry[1], value, entry[2])

    def answer_all(self) -> int:
        """Answer every deferred access (the device stops): no vCPU is left waiting."""
        cdef int n = 0
        for token in list(self._deferred):
            try:
                n += self.answer(token)
            except Exception:
                log.exception("answering a deferred access failed")
        return n

    @property
    def deferred(self) -> int:
        """How many accesses wait for their answer now."""
        return len(self._deferred)

    @property
    def max_queues(self) -> int:
        return MAX_QUEUES

    def set_kick_fd(self, uint32_t queue, int fd) -> None:
        """Where QueueNotify for `queue` goes (-1: nowhere, the queue is not live)."""
        if queue >= MAX_QUEUES:
            raise XvfError(f"queue {queue} beyond the {MAX_QUEUES} queues xvf supports")
        self.kick_fds[queue] = fd

    def kick_fd(self, uint32_t queue) -> int:
        return self.kick_fds[queue] if queue < MAX_QUEUES else -1

    cdef void c_raise(self, uint32_t bits) noexcept:
        cdef uint32_t old = self.int_status
        self.int_status = old | bits
        self.interrupts += 1
        if old == 0 and self.irq is not None:
            self._drive_line(1)

    cdef void _drive_line(self, int level) noexcept:
        # The dm_op blocks until Xen (or the software Xen, which may live in this
        # very process in tests) answers: never hold the GIL across it.
        cdef IrqLine line = self.irq
        cdef int rc
        with nogil:
            rc = line.c_set(level)
        if rc < 0:
            log.error("%s irq %d failed: errno %d", "raising" if level else "lowering",
                      line.irq, -rc)

    def raise_interrupt(self, uint32_t bits) -> None:
        """Set InterruptStatus bits and assert the line (used-buffer or config change)."""
        self.c_raise(bits)

    cdef void c_ack(self, uint32_t bits) noexcept:
        self.int_status &= ~bits
        if self.int_status == 0 and self.irq is not None and self.irq.level:
            self._drive_line(0)

    def ack_interrupt(self, uint32_t bits) -> None:
        self.c_ack(bits)

    cdef void c_begin(self) noexcept:
        self._deferring = 0

    cdef uint64_t c_end(self) noexcept:
        """The token of the access just handled if its handler deferred it, else 0."""
        cdef uint64_t token = self._deferring
        self._deferring = <uint64_t>-1
        return token

    cdef uint64_t c_read(self, uint64_t offset, uint32_t size) noexcept:
        if offset == XVF_VIRTIO_MMIO_INTERRUPT_STATUS and size == 4:
            self.hot_accesses += 1
            if self.vring_sticky:
                return self.int_status | XVF_VIRTIO_MMIO_INT_VRING
            return self.int_status
        self.slow_accesses += 1
        try:
            return <uint64_t>self.handler.mmio_read(offset, size)
        except Exception:
            self._handler_errors(logging.ERROR, "register read at %#x (size %d) failed",
                                 offset, size, exc_info=True)
            return 0

    cdef void c_write(self, uint64_t offset, uint32_t size, uint64_t value) noexcept:
        cdef uint32_t queue
        cdef uint64_t one = 1
        cdef int fd
        if size == 4 and offset == XVF_VIRTIO_MMIO_QUEUE_NOTIFY:
            self.hot_accesses += 1
            queue = value & 0xffff      # upper bits: VIRTIO_F_NOTIFICATION_DATA
            fd = self.kick_fds[queue] if queue < MAX_QUEUES else -1
            # The spec forbids notifying before DRIVER_OK or after NEEDS_RESET;
            # such notifies are dropped, never forwarded to a backend.
            if (fd < 0 or not (self.status & XVF_VIRTIO_STATUS_DRIVER_OK)
                    or (self.status & XVF_VIRTIO_STATUS_DEVICE_NEEDS_RESET)):
                self.ignored_notifies += 1
                return
            self.notifies += 1
            if write(fd, &one, 8) != 8:
                self.ignored_notifies += 1
            return
        if size == 4 and offset == XVF_VIRTIO_MMIO_INTERRUPT_ACK:
            self.hot_accesses += 1
            self.c_ack(<uint32_t>value)
            return
        self.slow_accesses += 1
        try:
            self.handler.mmio_write(offset, size, value)
        except Exception:
            self._handler_errors(logging.ERROR, "register write at %#x (size %d) failed",
                                 offset, size, exc_info=True)

    def access(self, uint64_t offset, uint32_t size, bint is_write, uint64_t value=0) -> int:
        """One register access, as the ioreq path performs it (for tests and benchmarks).
        A deferred access is recorded (see `deferred`) and its answer discarded."""
        cdef uint64_t result = 0
        self.c_begin()
        if is_write:
            self.c_write(offset, size, value)
        else:
            result = self.c_read(offset, size)
        token = self.c_end()
        if token:
            self._deferred[token] = (None, 0, not is_write)
        return result


cdef class IoreqServer:
    """A guest's mapped synchronous ioreq page and the MMIO windows served through it.

    Xen allows at most 8 IOREQ servers per domain and libxl gives a guest up to 11
    virtio devices, so one server serves all of a guest's devices: each device is a
    window (base, size, MmioState) and an access is routed by its address.
    """

    def __cinit__(self, page, uint32_t nr_vcpus, uint64_t base=0, uint64_t size=0,
                  MmioState device=None):
        PyObject_GetBuffer(page, &self.view, PyBUF_WRITABLE)
        self.have_view = True
        if <size_t>self.view.len < nr_vcpus * XVF_IOREQ_SIZE:
            raise XvfError(f"ioreq page of {self.view.len} bytes cannot hold {nr_vcpus} vCPU slots")
        self.slots = <xvf_ioreq_t *>self.view.buf
        self.nr_vcpus = nr_vcpus
        self._win_dev = []
        self.nr_windows = 0
        self.last_hit = 0
        if device is not None:
            self.add_window(base, size, device)

    def __dealloc__(self):
        if self.have_view:
            PyBuffer_Release(&self.view)

    def add_window(self, uint64_t base, uint64_t size, MmioState device) -> None:
        """Route accesses to [base, base + size) to `device`."""
        cdef uint32_t i
        if size == 0 or base + size < base:
            raise XvfError(f"MMIO window {base:#x}+{size:#x} is empty or wraps")
        for i in range(self.nr_windows):
            if base < self.win_base[i] + self.win_size[i] and self.win_base[i] < base + size:
                raise XvfError(f"MMIO window {base:#x}+{size:#x} overlaps {self.win_base[i]:#x}")
        if self.nr_windows >= MAX_WINDOWS:
            raise XvfError(f"one IOREQ server serves at most {MAX_WINDOWS} devices")
        self.win_base[self.nr_windows] = base
        self.win_size[self.nr_windows] = size
        self._win_dev.append(device)
        self.nr_windows += 1

    def remove_window(self, uint64_t base) -> None:
        cdef uint32_t i, j
        for i in range(self.nr_windows):
            if self.win_base[i] == base:
                for j in range(i, self.nr_windows - 1):
                    self.win_base[j] = self.win_base[j + 1]
                    self.win_size[j] = self.win_size[j + 1]
                del self._win_dev[i]
                self.nr_windows -= 1
                self.last_hit = 0
                return
        raise XvfError(f"no MMIO window at {base:#x}")

    @property
    def windows(self) -> list:
        """[(base, size, MmioState)] in the order they were added."""
        return [(self.win_base[i], self.win_size[i], self._win_dev[i])
                for i in range(self.nr_windows)]

    def release(self) -> None:
        """Drop the reference to the page so the caller can unmap it."""
        if self.have_view:
            self.slots = NULL
            PyBuffer_Release(&self.view)
            self.have_view = False

    def vp_eport(self, uint32_t vcpu) -> int:
        """The guest-side event channel Xen wrote into this vCPU's slot.

        Xen writes it when the server is ENABLED (ioreq_server_enable), not when the
        page is created: read it only after enabling.
        """
        if vcpu >= self.nr_vcpus or self.slots == NULL:
            raise XvfError(f"no vCPU {vcpu}")
        return self.slots[vcpu].vp_eport

    cdef int c_window(self, uint64_t addr) noexcept:
        """Index of the window holding `addr`, or -1."""
        cdef uint32_t i = self.last_hit
        if i < self.nr_windows and addr - self.win_base[i] < self.win_size[i] \
                and addr >= self.win_base[i]:
            return i
        for i in range(self.nr_windows):
            if addr >= self.win_base[i] and addr - self.win_base[i] < self.win_size[i]:
                self.last_hit = i
                return i
        return -1

    cdef bint c_answer(self, uint32_t vcpu, uint64_t value, bint is_read) except -1:
        """Post the response of a deferred access of `vcpu`, then notify it."""
        cdef xvf_ioreq_t *req
        cdef uint8_t flags
        if self.slots == NULL or vcpu >= self.nr_vcpus:
            return False
        req = &self.slots[vcpu]
        flags = xvf_load_flags(&req.flags)
        if (flags & XVF_IOREQ_STATE_MASK) != XVF_STATE_IOREQ_INPROCESS:
            return False
        if is_read:
            if req.size < 8:
                value &= (((<uint64_t>1) << (req.size * 8)) - 1)
            req.data = value
        xvf_release()
        xvf_store_flags(&req.flags, (flags & ~XVF_IOREQ_STATE_MASK) | XVF_STATE_IORESP_READY)
        if self.notify_vcpu is not None:
            self.notify_vcpu(vcpu)
        return True

    cdef bint c_service(self, uint32_t vcpu) noexcept:
        """Serve the slot of `vcpu` if it holds a request; True if a response was posted."""
        cdef xvf_ioreq_t *req
        cdef uint8_t flags
        cdef uint64_t offset, value
        cdef int w = -1
        cdef bint is_read
        cdef uint64_t token
        cdef MmioState device
        if self.slots == NULL or vcpu >= self.nr_vcpus:
            return False
        req = &self.slots[vcpu]
        flags = xvf_load_flags(&req.flags)
        if (flags & XVF_IOREQ_STATE_MASK) != XVF_STATE_IOREQ_READY:
            return False
        xvf_store_flags(&req.flags, (flags & ~XVF_IOREQ_STATE_MASK) | XVF_STATE_IOREQ_INPROCESS)
        self.requests += 1
        is_read = (flags & XVF_IOREQ_DIR_BIT) != 0
        if (req.type == XVF_IOREQ_TYPE_COPY and not (flags & XVF_IOREQ_DATA_IS_PTR_BIT)
                and req.count == 1 and req.size != 0 and req.size <= 8):
            w = self.c_window(req.addr)
        if req.type == XVF_IOREQ_TYPE_INVALIDATE:
            # Only an answer is wanted. Backends hold their own mappings and xvf's foreign
            # mapping is made once at DRIVER_OK (see docs/real-xen.md: ballooning).
            self.invalidates += 1
            if is_read:  # never from Xen; answered like any read that is no MMIO access
                req.data = ~(<uint64_t>0)
        elif w < 0:
            # Not an access virtio-mmio can be asked for on Arm: answer, never hang the vCPU.
            self.bad_requests += 1
            if is_read:
                req.data = ~(<uint64_t>0)
        else:
            device = <MmioState>self._win_dev[w]
            offset = req.addr - self.win_base[w]
            device.c_begin()
            if is_read:
                value = device.c_read(offset, req.size)
                if req.size < 8:
                    value &= (((<uint64_t>1) << (req.size * 8)) - 1)
                req.data = value
            else:
                value = req.data
                if req.size < 8:
                    value &= (((<uint64_t>1) << (req.size * 8)) - 1)
                device.c_write(offset, req.size, value)
            token = device.c_end()
            if token:
                # The handler waits for a backend: the slot stays INPROCESS, the vCPU
                # waits, and MmioState.answer() posts the response later.
                device._deferred[token] = (self, vcpu, is_read)
                return False
        xvf_release()
        xvf_store_flags(&req.flags, (flags & ~XVF_IOREQ_STATE_MASK) | XVF_STATE_IORESP_READY)
        return True

    def service(self, uint32_t vcpu) -> bool:
        return self.c_service(vcpu)


cdef class ServiceLoop:
    """epoll over the event channel, backends' call fds and Python callbacks."""

    def __cinit__(self, EventChannel evtchn):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.evtchn = evtchn
        self._route_server = []
        self._route_vcpu = NULL
        self._route_slot = NULL
        self._route_len = 0
        self._poll_ports = NULL
        self._poll_len = 0
        self._poll_next = 0
        self._masked = NULL
        self._masked_len = 0
        self._fds = {}
        self._add(evtchn.fd, KIND_EVTCHN, None)

    def __dealloc__(self):
        free(self._route_vcpu)
        free(self._route_slot)
        free(self._poll_ports)
        free(self._masked)
        if self.epfd >= 0:
            close(self.epfd)

    cdef _add(self, int fd, int kind, object obj):
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, f"epoll_ctl(ADD, fd {fd}) failed")
        self._fds[fd] = (kind, obj)

    def remove_fd(self, int fd) -> None:
        if self._fds.pop(fd, None) is not None:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)

    def add_call_fd(self, int fd, MmioState device) -> None:
        """A backend's call eventfd: each signal sets the used-buffer interrupt."""
        self._add(fd, KIND_CALL, device)

    def add_reader(self, int fd, callback) -> None:
        """Run `callback()` (Python) whenever `fd` is readable or hung up."""
        self._add(fd, KIND_PYTHON, callback)

    def add_route(self, uint32_t port, IoreqServer server, uint32_t vcpu) -> None:
        """Ioreq notifications arriving on local `port` are for `vcpu` of `server`."""
        cdef uint32_t *grown
        cdef xvf_ioreq_t **grown_slots
        cdef uint32_t n, i
        if vcpu >= server.nr_vcpus or server.slots == NULL:
            raise XvfError(f"vCPU {vcpu} has no slot in this ioreq page")
        if port >= self._route_len:
            n = port + 64
            grown = <uint32_t *>realloc(self._route_vcpu, n * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self._route_vcpu = grown
            grown_slots = <xvf_ioreq_t **>realloc(self._route_slot, n * sizeof(xvf_ioreq_t *))
            if grown_slots == NULL:
                raise MemoryError()
            self._route_slot = grown_slots
            for i in range(self._route_len, n):
                self._route_slot[i] = NULL
            grown = <uint32_t *>realloc(self._poll_ports, n * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self._poll_ports = grown
            grown = <uint32_t *>realloc(self._masked, n * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self._masked = grown
            self._route_server.extend([None] * (n - self._route_len))
            self._route_len = n
        self._route_server[port] = server
        self._route_vcpu[port] = vcpu
        # The route list holds the server, and the server holds its page until
        # release(), which callers do only after remove_route: the pointer stays valid.
        self._route_slot[port] = &server.slots[vcpu]
        self._index_polled()

    def remove_route(self, uint32_t port) -> None:
        if port < self._route_len:
            self._unmask_deferred()  # before the port can be unbound and reused
            self._route_server[port] = None
            self._route_slot[port] = NULL
            self._index_polled()

    cdef void _unmask_deferred(self) noexcept nogil:
        if self._masked_len:
            self.evtchn.c_unmask_many(self._masked, self._masked_len)
            self._masked_len = 0

    cdef void _index_polled(self) noexcept:
        cdef uint32_t port
        self._poll_len = 0
        for port in range(self._route_len):
            if self._route_slot[port] != NULL:
                self._poll_ports[self._poll_len] = port
                self._poll_len += 1

    def set_polling(self, double poll_us) -> None:
        """Spin up to `poll_us` µs on the routed ioreq slots before each sleep (0: never).

        An ioreq found this way is served before its event-channel notification is even
        read: the device model's wake-up leaves the access's latency, at the price of a
        CPU kept busy for that long after each event. A port whose event was read stays
        masked while the loop spins (Xen then only marks it pending, so a burst of
        accesses costs one read, not one per access) and every such port is unmasked
        in one write before the loop sleeps; a pending one then fires at once. A slot
        served by the spin is no longer READY when its event is read, so nothing is
        served twice; the vCPU is notified exactly as without polling."""
        if not 0 <= poll_us <= 1e6:
            raise XvfError(f"poll time {poll_us} µs is outside 0..1000000")
        self._unmask_deferred()
        self.poll_ns = <uint64_t>(poll_us * 1000)

    cdef void _on_evtchn(self) noexcept:
        cdef uint32_t ports[64]
        cdef int n, i
        cdef uint32_t port
        cdef IoreqServer server
        while True:
            n = self.evtchn.c_read_pending(ports, 64)
            if n < 0:
                self.evtchn_errors += 1
                if -n in (EBADF, EFAULT, EINVAL, ECONNRESET, ENOTCONN):
                    self.evtchn_lost = True  # it will not get better: the daemon stops
                log.error("reading the event channel failed: errno %d", -n)
                return
            if n == 0:
                return
            if self.poll_ns == 0:
                # Unmask first, all in one write: a notification racing with our
                # response is kept pending.
                self.evtchn.c_unmask_many(ports, n)
            for i in range(n):
                port = ports[i]
                if self.poll_ns:
                    # Polling: the spin watches this slot; its port stays masked until
                    # the loop sleeps, and a notification meanwhile stays pending.
                    if port < self._route_len and self._masked_len < self._route_len:
                        self._masked[self._masked_len] = port
                        self._masked_len += 1
                    else:
                        self.evtchn.c_unmask(port)
                if port >= self._route_len:
                    continue
                obj = self._route_server[port]
                if obj is None:
                    continue
                server = <IoreqServer>obj
                if server.c_service(self._route_vcpu[port]):
                    self.evtchn.c_notify(port)
            if n < 64:
                return

    cdef int _spin(self) noexcept nogil:
        """Watch the routed slots for a READY request for up to poll_ns; its port, or -1."""
        cdef timespec ts
        cdef uint64_t now, deadline
        cdef uint32_t i, k, port
        clock_gettime(CLOCK_MONOTONIC, &ts)
        deadline = <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec + self.poll_ns
        while True:
            # From the slot after the last one served: a vCPU that keeps its slot busy
            # cannot keep the others' requests waiting.
            for k in range(self._poll_len):
                i = (self._poll_next + k) % self._poll_len
                port = self._poll_ports[i]
                if (xvf_load_flags(&self._route_slot[port].flags)
                        & XVF_IOREQ_STATE_MASK) == XVF_STATE_IOREQ_READY:
                    self._poll_next = i + 1
                    return <int>port
            clock_gettime(CLOCK_MONOTONIC, &ts)
            now = <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec
            if now >= deadline:
                return -1
            xvf_cpu_relax()

    cdef void _serve_port(self, uint32_t port) noexcept:
        cdef IoreqServer server
        obj = self._route_server[port]
        if obj is None:
            return
        server = <IoreqServer>obj
        if server.c_service(self._route_vcpu[port]):
            self.polled += 1
            self.evtchn.c_notify(port)

    cdef void _on_call(self, int fd, MmioState device) noexcept:
        cdef uint64_t count
        if read(fd, &count, 8) == 8:
            device.c_raise(XVF_VIRTIO_MMIO_INT_VRING)

    def run_once(self, int timeout_ms) -> int:
        """Wait up to timeout_ms for events and handle them; returns the number handled."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, fd
        cdef int hit = -1
        cdef bint spun = False
        with nogil:
            if self.poll_ns and self._poll_len and timeout_ms != 0:
                # Polling: what is already there first, then the spin, then the sleep.
                n = epoll_wait(self.epfd, events, MAX_EVENTS, 0)
                if n != 0:
                    # Busy with other fds, so no spin this time: the ports kept masked
                    # for the spin are unmasked, or a guest whose request is only
                    # pending would wait for as long as the others keep the loop busy.
                    self._unmask_deferred()
                else:
                    hit = self._spin()
                    spun = hit < 0
                    if spun:
                        # Unmasked now, a port with a request that raced the end of the
                        # spin fires at once: the sleep below returns for it.
                        self._unmask_deferred()
                        n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
            else:
                self._unmask_deferred()  # never sleep with a port masked
                n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
        if hit >= 0:
            self._serve_port(<uint32_t>hit)
            return 1
        if spun:
            self.idle_spins += 1
        if n < 0:
            if errno == EINTR:
                return 0
            raise OSError(errno, "epoll_wait failed")
        self.wakeups += 1
        for i in range(n):
            fd = <int>events[i].data.u64
            if fd == self.evtchn.fd:  # the hot one: no dict lookup
                if events[i].events & (EPOLLHUP | EPOLLERR):
                    self.evtchn_lost = True
                else:
                    self._on_evtchn()
                continue
            entry = self._fds.get(fd)
            if entry is None:
                continue
            kind = entry[0]
            if kind == KIND_EVTCHN:
                if events[i].events & (EPOLLHUP | EPOLLERR):
                    self.evtchn_lost = True
                    continue
                self._on_evtchn()
            elif kind == KIND_CALL:
                self._on_call(fd, <MmioState>entry[1])
            else:
                # One failing handler must not take the daemon (and every
                # other guest's device) down with it.
                try:
                    entry[1]()
                except Exception:
                    log.exception("handler for fd %d failed", fd)
        return n
