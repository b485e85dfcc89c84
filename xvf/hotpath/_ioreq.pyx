# cython: language_level=3
"""The ioreq service loop and the hot virtio-mmio registers.

A `ServiceLoop` multiplexes, with epoll, an event-channel handle (ioreq
notifications from the vCPUs routed to it), the backends' call eventfds and any
Python-level fds (xenstore, vhost-user sockets). Ioreq slots are decoded here;
QueueNotify, InterruptStatus and InterruptACK are answered without the GIL.
Every other register goes to the device's Python register file
(xvf.protocols.virtio_mmio), which shares this module's `MmioState`.

Threads: the daemon's own loop runs on its main thread. A guest may have a loop
of its own on a thread of its own (`serve_forever`, GIL-free): it then serves only
the hot registers and call fds, and posts every other access to the daemon's
thread (IoreqServer.enable_posting), where all Python runs. Tables one thread
changes while another reads them have a mutex each, always taken with the GIL
released (a thread holding one may wait for the GIL: the simulator's dm_op
replies come from a Python thread). Lock order: loop, server, device.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.ref cimport PyObject
from libc.errno cimport EBADF, ECONNRESET, EFAULT, EINTR, EINVAL, ENOTCONN, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from xvf.hotpath._evtchn cimport EventChannel
from xvf.hotpath._grow cimport regrow
from xvf.hotpath.includes.barrier cimport xvf_acquire, xvf_full, xvf_release
from xvf.hotpath.includes.linux_xen cimport (
    XVF_IOCTL_PRIVCMD_DM_OP, xvf_privcmd_dm_op_buf_t, xvf_privcmd_dm_op_t,
)
from xvf.hotpath.includes.system cimport (
    EFD_CLOEXEC, EFD_NONBLOCK, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLERR, EPOLLHUP,
    EPOLLIN, close, epoll_create1, epoll_ctl, epoll_event, epoll_wait, eventfd, ioctl,
    pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock, read,
    write,
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
    /* The ioreq page's state byte: acquire after seeing READY, release when
     * publishing IORESP_READY (fences: xvf/barrier.h). */
    static inline uint8_t xvf_load_flags(volatile uint8_t *p)
        { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void xvf_store_flags(volatile uint8_t *p, uint8_t v)
        { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    /* Claim a slot (READY -> INPROCESS) that two threads may both see READY: the
     * guest's service thread and the daemon's answering what waits at a stop. */
    static inline int xvf_claim_flags(volatile uint8_t *p, uint8_t seen, uint8_t claimed)
        { return __atomic_compare_exchange_n(p, &seen, claimed, 0,
                                             __ATOMIC_ACQUIRE, __ATOMIC_RELAXED); }
    static inline uint8_t xvf_take_u8(volatile uint8_t *p)
        { return __atomic_exchange_n(p, 0, __ATOMIC_ACQ_REL); }
    static inline void xvf_set_u8(volatile uint8_t *p)
        { __atomic_store_n(p, 1, __ATOMIC_RELEASE); }
    static inline uint32_t xvf_load_u32(volatile uint32_t *p)
        { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void xvf_count(volatile uint64_t *p)
        { __atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }
    /* A spin-wait hint: lets the sibling hardware thread run (x86 PAUSE, Arm YIELD). */
    static inline void xvf_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__) || defined(__arm__)
        __asm__ __volatile__("yield" ::: "memory");
    #endif
    }
    """
    uint8_t xvf_load_flags(uint8_t *p) nogil
    void xvf_store_flags(uint8_t *p, uint8_t v) nogil
    bint xvf_claim_flags(uint8_t *p, uint8_t seen, uint8_t claimed) nogil
    uint8_t xvf_take_u8(uint8_t *p) nogil
    void xvf_set_u8(uint8_t *p) nogil
    uint32_t xvf_load_u32(uint32_t *p) nogil
    void xvf_count(uint64_t *p) nogil
    void xvf_cpu_relax() nogil

import logging

from xvf.errors import HypercallError, XvfError

log = logging.getLogger("xvf.ioreq")

from xvf.ratelimit import RateLimitedLog  # noqa: E402

cdef enum:
    MAX_EVENTS = 64
    KIND_NONE = 0
    KIND_EVTCHN = 1
    KIND_CALL = 2
    KIND_PYTHON = 3
    KIND_WAKE = 4     # serve_forever's stop signal
    KIND_HANDLER = 5  # an FdHandler's fd: its C method, no GIL

cdef enum:
    # what c_service_hot did with a slot
    SERVED_NOTHING = 0
    SERVED = 1        # answered: notify the vCPU
    SERVE_SLOW = 2    # claimed; the register needs Python: the caller serves it with the GIL
    SERVE_POSTED = 3  # claimed and handed to the daemon's thread, which answers it


cdef void _line_failed(uint32_t irq, int level, int rc) noexcept with gil:
    log.error("%s irq %d failed: errno %d", "raising" if level else "lowering", irq, -rc)


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
        self.irq_fd = -1
        self._deferred = {}
        self._deferring = <uint64_t>-1
        self._handler_errors = RateLimitedLog(log)
        pthread_mutex_init(&self.lock, NULL)

    def __dealloc__(self):
        pthread_mutex_destroy(&self.lock)

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
        """Where QueueNotify for `queue` goes (-1: nowhere, the queue is not live).
        Once it returns, no notify writes to the fd it replaced: it may be closed."""
        if queue >= MAX_QUEUES:
            raise XvfError(f"queue {queue} beyond the {MAX_QUEUES} queues xvf supports")
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.kick_fds[queue] = fd
            pthread_mutex_unlock(&self.lock)

    def kick_fd(self, uint32_t queue) -> int:
        return self.kick_fds[queue] if queue < MAX_QUEUES else -1

    def set_irq_fd(self, int fd) -> None:
        """Raise interrupts by writing `fd`, the device's kernel irqfd (-1: by the
        set_irq_level dm_op). Once it returns, nothing writes the fd it replaced."""
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.irq_fd = fd
            pthread_mutex_unlock(&self.lock)

    cdef void c_raise(self, uint32_t bits) noexcept nogil:
        # The line follows int_status under the lock: a raise and an ack racing on two
        # threads cannot leave the line high with nothing pending, or low with something.
        # The dm_op blocks until Xen (or the software Xen) answers: never with the GIL.
        cdef int rc = 0
        cdef uint32_t old
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.lock)
        old = self.int_status
        self.int_status = old | bits
        self.interrupts += 1
        if self.irq_fd >= 0:
            # Every raise: the kernel's injection is an edge, a raise while bits are
            # still pending may come after the guest read them.
            if write(self.irq_fd, &one, 8) != 8:
                rc = -errno
        elif old == 0 and self.irq is not None:
            rc = self.irq.c_set(1)
        pthread_mutex_unlock(&self.lock)
        if rc < 0:
            _line_failed(self.irq.irq if self.irq is not None else 0, 1, rc)

    def raise_interrupt(self, uint32_t bits) -> None:
        """Set InterruptStatus bits and assert the line (used-buffer or config change)."""
        with nogil:
            self.c_raise(bits)

    cdef void c_ack(self, uint32_t bits) noexcept nogil:
        cdef int rc = 0
        pthread_mutex_lock(&self.lock)
        self.int_status &= ~bits
        if self.int_status == 0 and self.irq is not None and self.irq.level:
            rc = self.irq.c_set(0)
        pthread_mutex_unlock(&self.lock)
        if rc < 0:
            _line_failed(self.irq.irq, 0, rc)

    def ack_interrupt(self, uint32_t bits) -> None:
        with nogil:
            self.c_ack(bits)

    cdef void c_begin(self) noexcept:
        self._deferring = 0

    cdef uint64_t c_end(self) noexcept:
        """The token of the access just handled if its handler deferred it, else 0."""
        cdef uint64_t token = self._deferring
        self._deferring = <uint64_t>-1
        return token

    cdef bint c_read_hot(self, uint64_t offset, uint32_t size, uint64_t *value) noexcept nogil:
        """Answer a read without Python if it is a hot register; False if it is not."""
        if offset == XVF_VIRTIO_MMIO_INTERRUPT_STATUS and size == 4:
            xvf_count(&self.hot_accesses)
            value[0] = xvf_load_u32(&self.int_status)
            if self.vring_sticky:
                value[0] |= XVF_VIRTIO_MMIO_INT_VRING
            return True
        return False

    cdef bint c_write_hot(self, uint64_t offset, uint32_t size, uint64_t value) noexcept nogil:
        """Perform a write without Python if it is a hot register; False if it is not."""
        cdef uint32_t queue
        cdef uint64_t one = 1
        cdef int fd
        cdef uint32_t status
        if size == 4 and offset == XVF_VIRTIO_MMIO_QUEUE_NOTIFY:
            xvf_count(&self.hot_accesses)
            queue = value & 0xffff      # upper bits: VIRTIO_F_NOTIFICATION_DATA
            status = xvf_load_u32(&self.status)
            # The lock keeps set_kick_fd from closing the fd between the load and the write.
            pthread_mutex_lock(&self.lock)
            fd = self.kick_fds[queue] if queue < MAX_QUEUES else -1
            # The spec forbids notifying before DRIVER_OK or after NEEDS_RESET;
            # such notifies are dropped, never forwarded to a backend.
            if (fd < 0 or not (status & XVF_VIRTIO_STATUS_DRIVER_OK)
                    or (status & XVF_VIRTIO_STATUS_DEVICE_NEEDS_RESET)):
                self.ignored_notifies += 1
            else:
                self.notifies += 1
                if write(fd, &one, 8) != 8:
                    self.ignored_notifies += 1
            pthread_mutex_unlock(&self.lock)
            return True
        if size == 4 and offset == XVF_VIRTIO_MMIO_INTERRUPT_ACK:
            xvf_count(&self.hot_accesses)
            self.c_ack(<uint32_t>value)
            return True
        return False

    cdef uint64_t c_read(self, uint64_t offset, uint32_t size) noexcept:
        cdef uint64_t value = 0
        cdef bint hot
        with nogil:
            hot = self.c_read_hot(offset, size, &value)
        if hot:
            return value
        self.slow_accesses += 1
        try:
            return <uint64_t>self.handler.mmio_read(offset, size)
        except Exception:
            self._handler_errors(logging.ERROR, "register read at %#x (size %d) failed",
                                 offset, size, exc_info=True)
            return 0

    cdef void c_write(self, uint64_t offset, uint32_t size, uint64_t value) noexcept:
        cdef bint hot
        with nogil:
            hot = self.c_write_hot(offset, size, value)
        if hot:
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
        self.posted_fd = -1
        self.posted = NULL
        pthread_mutex_init(&self.lock, NULL)
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
        if self.posted_fd >= 0:
            close(self.posted_fd)
        free(self.posted)
        pthread_mutex_destroy(&self.lock)

    def enable_posting(self) -> int:
        """Hand accesses the hot path cannot answer to whoever reads the returned
        eventfd and calls `serve_posted` (the daemon's thread), instead of serving
        them on the loop's thread: for a guest whose loop runs without the GIL."""
        if self.posted_fd < 0:
            self.posted = <uint8_t *>calloc(max(self.nr_vcpus, 1), 1)
            if self.posted == NULL:
                raise MemoryError()
            self.posted_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if self.posted_fd < 0:
                raise OSError(errno, "eventfd failed")
        return self.posted_fd

    @property
    def posting(self) -> bool:
        return self.posted_fd >= 0

    def serve_posted(self) -> int:
        """Serve the accesses the service thread posted; returns how many were answered
        (each answered vCPU is notified through `notify_vcpu`)."""
        cdef uint64_t count
        cdef uint32_t vcpu
        cdef int n = 0
        if self.posted_fd < 0:
            return 0
        read(self.posted_fd, &count, 8)  # nonblocking: a drained counter is fine
        for vcpu in range(self.nr_vcpus):
            if xvf_take_u8(&self.posted[vcpu]) and self.c_serve_slow(vcpu):
                n += 1
                if self.notify_vcpu is not None:
                    self.notify_vcpu(vcpu)
        return n

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
        self._win_dev.append(device)  # holds the reference the borrowed pointer relies on
        with nogil:
            pthread_mutex_lock(&self.lock)
            self.win_base[self.nr_windows] = base
            self.win_size[self.nr_windows] = size
            self.win_ptr[self.nr_windows] = <PyObject *>device
            self.nr_windows += 1
            pthread_mutex_unlock(&self.lock)

    def remove_window(self, uint64_t base) -> None:
        cdef uint32_t i, j
        cdef int found = -1
        with nogil:
            pthread_mutex_lock(&self.lock)
            for i in range(self.nr_windows):
                if self.win_base[i] == base:
                    found = i
                    for j in range(i, self.nr_windows - 1):
                        self.win_base[j] = self.win_base[j + 1]
                        self.win_size[j] = self.win_size[j + 1]
                        self.win_ptr[j] = self.win_ptr[j + 1]
                    self.nr_windows -= 1
                    self.last_hit = 0
                    break
            pthread_mutex_unlock(&self.lock)
        if found < 0:
            raise XvfError(f"no MMIO window at {base:#x}")
        del self._win_dev[found]  # only now: the service thread no longer sees it

    @property
    def windows(self) -> list:
        """[(base, size, MmioState)] in the order they were added."""
        return [(self.win_base[i], self.win_size[i], self._win_dev[i])
                for i in range(self.nr_windows)]

    def release(self) -> None:
        """Drop the reference to the page so the caller can unmap it (after the loops
        serving it removed its routes)."""
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

    cdef int c_window(self, uint64_t addr) noexcept nogil:
        """Index of the window holding `addr`, or -1. With self.lock held."""
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

    cdef int c_service_hot(self, uint32_t vcpu, bint post) noexcept nogil:
        """Claim the slot of `vcpu` if it holds a request and answer it if no Python is
        needed (SERVED); a register that needs Python is left claimed (SERVE_SLOW), or
        with `post` and posting enabled, handed to the daemon's thread (SERVE_POSTED)."""
        cdef xvf_ioreq_t *req
        cdef uint8_t flags
        cdef uint64_t offset, value = 0
        cdef int w = -1
        cdef bint is_read
        cdef bint hot = False
        cdef uint64_t one = 1
        if self.slots == NULL or vcpu >= self.nr_vcpus:
            return SERVED_NOTHING
        req = &self.slots[vcpu]
        flags = xvf_load_flags(&req.flags)
        if (flags & XVF_IOREQ_STATE_MASK) != XVF_STATE_IOREQ_READY:
            return SERVED_NOTHING
        if not xvf_claim_flags(&req.flags, flags,
                               (flags & ~XVF_IOREQ_STATE_MASK) | XVF_STATE_IOREQ_INPROCESS):
            return SERVED_NOTHING  # another thread claimed it
        xvf_count(&self.requests)
        is_read = (flags & XVF_IOREQ_DIR_BIT) != 0
        if req.type == XVF_IOREQ_TYPE_INVALIDATE:
            # Only an answer is wanted. Backends hold their own mappings and xvf's foreign
            # mapping is made once at DRIVER_OK (see docs/real-xen.md: ballooning).
            xvf_count(&self.invalidates)
            if is_read:  # never from Xen; answered like any read that is no MMIO access
                req.data = ~(<uint64_t>0)
        elif (req.type == XVF_IOREQ_TYPE_COPY and not (flags & XVF_IOREQ_DATA_IS_PTR_BIT)
                and req.count == 1 and req.size != 0 and req.size <= 8):
            pthread_mutex_lock(&self.lock)
            w = self.c_window(req.addr)
            if w >= 0:
                offset = req.addr - self.win_base[w]
                if is_read:
                    hot = (<MmioState>self.win_ptr[w]).c_read_hot(offset, req.size, &value)
                    if hot:
                        if req.size < 8:
                            value &= (((<uint64_t>1) << (req.size * 8)) - 1)
                        req.data = value
                else:
                    value = req.data
                    if req.size < 8:
                        value &= (((<uint64_t>1) << (req.size * 8)) - 1)
                    hot = (<MmioState>self.win_ptr[w]).c_write_hot(offset, req.size, value)
            pthread_mutex_unlock(&self.lock)
            if w < 0:
                # Not an access virtio-mmio can be asked for on Arm: answer, never hang the vCPU.
                xvf_count(&self.bad_requests)
                if is_read:
                    req.data = ~(<uint64_t>0)
            elif not hot:
                if post and self.posted_fd >= 0:
                    xvf_set_u8(&self.posted[vcpu])
                    write(self.posted_fd, &one, 8)
                    return SERVE_POSTED
                return SERVE_SLOW
        else:
            xvf_count(&self.bad_requests)
            if is_read:
                req.data = ~(<uint64_t>0)
        xvf_release()
        xvf_store_flags(&req.flags, (flags & ~XVF_IOREQ_STATE_MASK) | XVF_STATE_IORESP_READY)
        return SERVED

    cdef bint c_serve_slow(self, uint32_t vcpu) noexcept:
        """Serve, with the GIL, the access c_service_hot claimed and left (the slot is
        INPROCESS); True if a response was posted, False if it is deferred or gone."""
        cdef xvf_ioreq_t *req
        cdef uint8_t flags
        cdef uint64_t offset = 0, value, token
        cdef int w
        cdef bint is_read
        cdef MmioState device
        if self.slots == NULL or vcpu >= self.nr_vcpus:
            return False
        req = &self.slots[vcpu]
        flags = xvf_load_flags(&req.flags)
        if (flags & XVF_IOREQ_STATE_MASK) != XVF_STATE_IOREQ_INPROCESS:
            return False
        is_read = (flags & XVF_IOREQ_DIR_BIT) != 0
        with nogil:
            pthread_mutex_lock(&self.lock)
            w = self.c_window(req.addr)
            if w >= 0:
                offset = req.addr - self.win_base[w]
            pthread_mutex_unlock(&self.lock)
        if w < 0:  # the window went away since the access was claimed
            xvf_count(&self.bad_requests)
            if is_read:
                req.data = ~(<uint64_t>0)
        else:
            # Windows change only on this (the daemon's) thread: index w is still valid.
            device = <MmioState>self._win_dev[w]
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

    cdef bint c_service(self, uint32_t vcpu) noexcept:
        """Serve the slot of `vcpu` if it holds a request; True if a response was posted."""
        cdef int done
        with nogil:
            done = self.c_service_hot(vcpu, False)
        if done == SERVE_SLOW:
            return self.c_serve_slow(vcpu)
        return done == SERVED

    def service(self, uint32_t vcpu) -> bool:
        return self.c_service(vcpu)


cdef class FdHandler:
    """C work a ServiceLoop runs for one of the handler's fds (see _ioreq.pxd)."""

    cdef void c_ready(self, int fd) noexcept nogil:
        pass


cdef class ServiceLoop:
    """epoll over an event channel, backends' call fds, FdHandlers and Python callbacks.

    `run_once` serves it from the calling thread (the daemon's loop); `serve_forever`
    on a thread of its own, GIL-free (a guest's service thread: no Python callbacks,
    and its servers post what needs Python to the daemon's thread)."""

    def __cinit__(self, EventChannel evtchn):
        pthread_mutex_init(&self.lock, NULL)
        self._wake_fd = -1
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.evtchn = evtchn
        self._route_server = []
        self._route_srv = NULL
        self._route_vcpu = NULL
        self._route_slot = NULL
        self._route_len = 0
        self._poll_ports = NULL
        self._poll_len = 0
        self._poll_next = 0
        self._masked = NULL
        self._masked_len = 0
        self._slow_ports = NULL
        self._slow_len = 0
        self._fd_kind = NULL
        self._fd_obj = NULL
        self._fd_cap = 0
        self._fds = {}
        self._add(evtchn.fd, KIND_EVTCHN, None)

    def __dealloc__(self):
        free(self._route_srv)
        free(self._route_vcpu)
        free(self._route_slot)
        free(self._poll_ports)
        free(self._masked)
        free(self._slow_ports)
        free(self._fd_kind)
        free(self._fd_obj)
        if self._wake_fd >= 0:
            close(self._wake_fd)
        if self.epfd >= 0:
            close(self.epfd)
        pthread_mutex_destroy(&self.lock)

    cdef _add(self, int fd, int kind, object obj):
        cdef epoll_event ev
        cdef int n, i
        if fd < 0:
            raise XvfError(f"cannot watch fd {fd}")
        if kind == KIND_PYTHON and self.own_thread:
            raise XvfError("a loop on its own thread runs no Python callbacks")
        if fd in self._fds:
            raise XvfError(f"fd {fd} is watched already")
        if fd >= self._fd_cap:
            n = fd + 64
            with nogil:
                pthread_mutex_lock(&self.lock)
                if (regrow(<void **>&self._fd_kind, n * sizeof(uint8_t))
                        and regrow(<void **>&self._fd_obj, n * sizeof(PyObject *))):
                    for i in range(self._fd_cap, n):
                        self._fd_kind[i] = KIND_NONE
                        self._fd_obj[i] = NULL
                    self._fd_cap = n
                pthread_mutex_unlock(&self.lock)
            if fd >= self._fd_cap:
                raise MemoryError()
        self._fds[fd] = (kind, obj)  # owns obj for as long as the table points at it
        cdef bint other = kind != KIND_EVTCHN and kind != KIND_WAKE
        with nogil:
            pthread_mutex_lock(&self.lock)
            self._fd_kind[fd] = kind
            self._fd_obj[fd] = <PyObject *>obj
            if other:
                self._other_fds += 1
            pthread_mutex_unlock(&self.lock)
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            err = errno
            self._forget(fd)
            raise OSError(err, f"epoll_ctl(ADD, fd {fd}) failed")
        if other:
            self._poke()  # a thread reading the channel directly must watch this fd too

    cdef void _forget(self, int fd) noexcept:
        entry = self._fds.get(fd)
        cdef bint other = entry is not None and entry[0] not in (KIND_EVTCHN, KIND_WAKE)
        with nogil:
            pthread_mutex_lock(&self.lock)
            if fd < self._fd_cap:
                self._fd_kind[fd] = KIND_NONE
                self._fd_obj[fd] = NULL
            if other:
                self._other_fds -= 1
            pthread_mutex_unlock(&self.lock)
        self._fds.pop(fd, None)

    def remove_fd(self, int fd) -> None:
        """Stop watching `fd`. Once this returns the loop no longer touches it (even
        from its own thread), so the caller may close it."""
        if fd in self._fds:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
            self._forget(fd)

    def add_call_fd(self, int fd, MmioState device) -> None:
        """A backend's call eventfd: each signal sets the used-buffer interrupt."""
        self._add(fd, KIND_CALL, device)

    def add_handler(self, int fd, FdHandler handler) -> None:
        """Run `handler.c_ready(fd)` (C, no GIL, on the loop's thread) whenever `fd` is
        readable or hung up. Once remove_fd returns the loop no longer calls it."""
        self._add(fd, KIND_HANDLER, handler)

    def add_reader(self, int fd, callback) -> None:
        """Run `callback()` (Python) whenever `fd` is readable or hung up."""
        self._add(fd, KIND_PYTHON, callback)

    def add_route(self, uint32_t port, IoreqServer server, uint32_t vcpu) -> None:
        """Ioreq notifications arriving on local `port` are for `vcpu` of `server`."""
        cdef uint32_t n
        if vcpu >= server.nr_vcpus or server.slots == NULL:
            raise XvfError(f"vCPU {vcpu} has no slot in this ioreq page")
        if self.own_thread and not server.posting:
            raise XvfError("a loop on its own thread serves only servers that post")
        if port >= self._route_len:
            n = port + 64
            self._route_server.extend([None] * (n - self._route_len))
            with nogil:
                pthread_mutex_lock(&self.lock)
                n = self._grow_routes(n)
                pthread_mutex_unlock(&self.lock)
            if n == 0:
                raise MemoryError()
        self._route_server[port] = server  # the reference the borrowed pointers rely on
        with nogil:
            pthread_mutex_lock(&self.lock)
            self._route_srv[port] = <PyObject *>server
            self._route_vcpu[port] = vcpu
            # The server holds its page until release(), which callers do only after
            # remove_route: the slot pointer stays valid while routed.
            self._route_slot[port] = &server.slots[vcpu]
            self._index_polled()
            pthread_mutex_unlock(&self.lock)

    cdef uint32_t _grow_routes(self, uint32_t n) noexcept nogil:
        """Grow every per-port table to n entries (lock held); 0 if out of memory."""
        cdef uint32_t i
        if not (regrow(<void **>&self._route_srv, n * sizeof(PyObject *))
                and regrow(<void **>&self._route_vcpu, n * sizeof(uint32_t))
                and regrow(<void **>&self._route_slot, n * sizeof(xvf_ioreq_t *))
                and regrow(<void **>&self._poll_ports, n * sizeof(uint32_t))
                and regrow(<void **>&self._masked, n * sizeof(uint32_t))
                and regrow(<void **>&self._slow_ports, n * sizeof(uint32_t))):
            return 0
        for i in range(self._route_len, n):
            self._route_srv[i] = NULL
            self._route_slot[i] = NULL
        self._route_len = n
        return n

    def remove_route(self, uint32_t port) -> None:
        """Once this returns the loop no longer reads the port's slot."""
        if port < self._route_len:
            with nogil:
                pthread_mutex_lock(&self.lock)
                self._unmask_deferred()  # before the port can be unbound and reused
                self._route_srv[port] = NULL
                self._route_slot[port] = NULL
                self._index_polled()
                pthread_mutex_unlock(&self.lock)
            self._route_server[port] = None

    cdef void _unmask_deferred(self) noexcept nogil:
        if self._masked_len:
            self.evtchn.c_unmask_many(self._masked, self._masked_len)
            self._masked_len = 0

    cdef void _index_polled(self) noexcept nogil:
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
        with nogil:
            pthread_mutex_lock(&self.lock)
            self._unmask_deferred()
            self.poll_ns = <uint64_t>(poll_us * 1000)
            pthread_mutex_unlock(&self.lock)
            self._poke()  # a thread blocked reading the channel starts spinning

    cdef void _serve_port(self, uint32_t port, bint polled) noexcept nogil:
        """Serve the slot routed to `port` (lock held): answered ones are notified, ones
        that need Python are queued for the GIL pass (a loop of the daemon's thread)."""
        cdef PyObject *server
        cdef int done
        if port >= self._route_len:
            return
        server = self._route_srv[port]
        if server == NULL:
            return
        done = (<IoreqServer>server).c_service_hot(self._route_vcpu[port], True)
        if done == SERVED:
            if polled:
                self.polled += 1
            self.evtchn.c_notify(port)
        elif done == SERVE_SLOW and self._slow_len < self._route_len:
            self._slow_ports[self._slow_len] = port
            self._slow_len += 1
            self._slow_polled = polled
        elif done == SERVE_POSTED and polled:
            self.polled += 1  # found by the spin; the daemon's thread answers it

    cdef void _on_evtchn(self) noexcept nogil:
        cdef uint32_t ports[64]
        cdef int n
        while True:
            n = self.evtchn.c_read_pending(ports, 64)
            if n < 0:
                self.evtchn_errors += 1
                self._evtchn_errno = -n
                if -n in (EBADF, EFAULT, EINVAL, ECONNRESET, ENOTCONN):
                    self.evtchn_lost = True  # it will not get better: the daemon stops
                return
            if n == 0:
                return
            self._on_ports(ports, n)
            # Fewer than asked for: nothing more to read. A channel left blocking (the
            # thread switched to epoll since) is read once per wake-up: epoll reports
            # the rest, where a second read could block.
            if n < 64 or self._evtchn_blocking:
                return

    cdef void _on_ports(self, uint32_t *ports, int n) noexcept nogil:
        """Serve the slots of `n` ports read from the channel (lock held)."""
        cdef int i
        cdef uint32_t port
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
            # The wake ports have no route: unmasked above, nothing to serve.
            self._serve_port(port, False)

    cdef int _spin(self) noexcept nogil:
        """Watch the routed slots for a READY request for up to poll_ns; its port, or -1.
        The lock is taken per pass, so the daemon can change routes meanwhile."""
        cdef timespec ts
        cdef uint64_t now, deadline
        cdef uint32_t i, k, port
        cdef int hit
        clock_gettime(CLOCK_MONOTONIC, &ts)
        deadline = <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec + self.poll_ns
        while True:
            hit = -1
            pthread_mutex_lock(&self.lock)
            # From the slot after the last one served: a vCPU that keeps its slot busy
            # cannot keep the others' requests waiting.
            for k in range(self._poll_len):
                i = (self._poll_next + k) % self._poll_len
                port = self._poll_ports[i]
                if (xvf_load_flags(&self._route_slot[port].flags)
                        & XVF_IOREQ_STATE_MASK) == XVF_STATE_IOREQ_READY:
                    self._poll_next = i + 1
                    hit = <int>port
                    break
            pthread_mutex_unlock(&self.lock)
            if hit >= 0:
                return hit
            clock_gettime(CLOCK_MONOTONIC, &ts)
            now = <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec
            if now >= deadline:
                return -1
            xvf_cpu_relax()

    cdef void _on_call(self, int fd, PyObject *device) noexcept nogil:
        cdef uint64_t count
        if read(fd, &count, 8) == 8:
            (<MmioState>device).c_raise(XVF_VIRTIO_MMIO_INT_VRING)

    cdef int _wait_and_dispatch(self, int timeout_ms, int *python_fds,
                                int *n_python) noexcept nogil:
        """One wait and everything it found that needs no GIL; fds with Python
        callbacks go to `python_fds` (MAX_EVENTS). Returns events handled, or -errno."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n = 0, i, fd
        cdef int hit = -1
        cdef bint spun = False
        cdef uint8_t kind
        n_python[0] = 0
        if self.poll_ns and self._poll_len and timeout_ms != 0:
            # Polling: what is already there first, then the spin, then the sleep.
            n = epoll_wait(self.epfd, events, MAX_EVENTS, 0)
            if n != 0:
                # Busy with other fds, so no spin this time: the ports kept masked
                # for the spin are unmasked, or a guest whose request is only
                # pending would wait for as long as the others keep the loop busy.
                pthread_mutex_lock(&self.lock)
                self._unmask_deferred()
                pthread_mutex_unlock(&self.lock)
            else:
                hit = self._spin()
                spun = hit < 0
                if spun:
                    # Unmasked now, a port with a request that raced the end of the
                    # spin fires at once: the sleep below returns for it.
                    self.idle_spins += 1
                    pthread_mutex_lock(&self.lock)
                    self._unmask_deferred()
                    pthread_mutex_unlock(&self.lock)
                    n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
        else:
            pthread_mutex_lock(&self.lock)
            self._unmask_deferred()  # never sleep with a port masked
            pthread_mutex_unlock(&self.lock)
            n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout_ms)
        pthread_mutex_lock(&self.lock)
        if hit >= 0:
            self._serve_port(<uint32_t>hit, True)
            pthread_mutex_unlock(&self.lock)
            return 1
        if n < 0:
            pthread_mutex_unlock(&self.lock)
            return -errno
        self.wakeups += 1
        for i in range(n):
            fd = <int>events[i].data.u64
            # An fd removed since the wait returned reads as KIND_NONE: never touched.
            kind = self._fd_kind[fd] if fd < self._fd_cap else KIND_NONE
            if kind == KIND_EVTCHN:
                if events[i].events & (EPOLLHUP | EPOLLERR):
                    self.evtchn_lost = True
                else:
                    self._on_evtchn()
            elif kind == KIND_CALL:
                self._on_call(fd, self._fd_obj[fd])
            elif kind == KIND_HANDLER:
                (<FdHandler>self._fd_obj[fd]).c_ready(fd)
            elif kind == KIND_WAKE:
                self._stopping = True
            elif kind == KIND_PYTHON:
                python_fds[n_python[0]] = fd
                n_python[0] += 1
        pthread_mutex_unlock(&self.lock)
        return n

    cdef bint _choose_direct(self) noexcept nogil:
        """Whether the next wait is a blocking read of the channel, with the channel's
        O_NONBLOCK set to match (only this thread reads it)."""
        cdef bint direct
        cdef int rc
        pthread_mutex_lock(&self.lock)
        direct = (self._has_wake_ports and not self._direct_broken
                  and self.poll_ns == 0 and self._other_fds == 0)
        pthread_mutex_unlock(&self.lock)
        if direct != self._evtchn_blocking:
            rc = self.evtchn.c_set_blocking(direct)
            if rc < 0:
                self._direct_broken = True
                self._evtchn_errno = -rc
                return False
            self._evtchn_blocking = direct
        return direct

    cdef int _read_and_dispatch(self) noexcept nogil:
        """One blocking read of the channel and the slots it names; returns 1, or 0 when
        the read gave nothing (the loop then waits with epoll, which says why)."""
        cdef uint32_t ports[64]
        cdef int n = self.evtchn.c_read_pending(ports, 64)
        pthread_mutex_lock(&self.lock)
        self.wakeups += 1
        self.direct_waits += 1
        if n > 0:
            self._on_ports(ports, n)
        else:
            # 0 is end of file (or a channel made non-blocking behind our back), an
            # error is counted and logged; epoll tells a lost channel from the rest.
            if n < 0:
                self.evtchn_errors += 1
                self._evtchn_errno = -n
            self._direct_broken = True
        pthread_mutex_unlock(&self.lock)
        return 1 if n > 0 else 0

    cdef void _poke(self) noexcept nogil:
        """Wake a thread blocked reading the channel (the loopback's other end)."""
        if self._has_wake_ports:
            self.evtchn.c_notify(self._wake_send)

    def set_wake_ports(self, uint32_t listen, uint32_t send) -> None:
        """A loopback channel on this loop's handle: notifying `send` makes `listen`
        pending. With it serve_forever may wait in a read of the channel itself."""
        if not self.own_thread:
            raise XvfError("wake ports are for a loop on its own thread (prepare_thread)")
        with nogil:
            pthread_mutex_lock(&self.lock)
            self._wake_listen = listen
            self._wake_send = send
            self._has_wake_ports = True
            pthread_mutex_unlock(&self.lock)

    @property
    def waits_on_channel(self) -> bool:
        """serve_forever's next wait is a read of the channel, not epoll_wait."""
        return (self._has_wake_ports and not self._direct_broken and self.poll_ns == 0
                and self._other_fds == 0)

    cdef void _log_errors(self) noexcept:
        if self._evtchn_errno:
            log.error("reading the event channel failed: errno %d", self._evtchn_errno)
            self._evtchn_errno = 0

    def run_once(self, int timeout_ms) -> int:
        """Wait up to timeout_ms for events and handle them; returns the number handled."""
        cdef int python_fds[MAX_EVENTS]
        cdef int n_python = 0
        cdef int n, i
        cdef uint32_t k, port
        cdef IoreqServer server
        if self.own_thread:
            raise XvfError("this loop runs on its own thread (serve_forever)")
        with nogil:
            n = self._wait_and_dispatch(timeout_ms, python_fds, &n_python)
        self._log_errors()
        # Accesses the GIL-free pass claimed for Python, served in the order they came.
        for k in range(self._slow_len):
            port = self._slow_ports[k]
            obj = self._route_server[port] if port < self._route_len else None
            if obj is not None:
                server = <IoreqServer>obj
                if server.c_serve_slow(self._route_vcpu[port]):
                    if self._slow_polled:  # the one access a spin found
                        self.polled += 1
                    self.evtchn.c_notify(port)
        self._slow_len = 0
        self._slow_polled = False
        if n < 0:
            if -n == EINTR:
                return 0
            raise OSError(-n, "epoll_wait failed")
        for i in range(n_python):
            entry = self._fds.get(python_fds[i])
            if entry is None:  # removed by a callback before it
                continue
            # One failing handler must not take the daemon (and every
            # other guest's device) down with it.
            try:
                entry[1]()
            except Exception:
                log.exception("handler for fd %d failed", python_fds[i])
        return n

    def prepare_thread(self) -> None:
        """Make this loop one that `serve_forever` runs: no Python callbacks, and only
        servers that post what needs Python. Call before adding routes."""
        if self._route_server and any(s is not None for s in self._route_server):
            raise XvfError("prepare the loop for its thread before routing to it")
        for kind, _ in self._fds.values():
            if kind == KIND_PYTHON:
                raise XvfError("a loop with Python callbacks cannot run on its own thread")
        if self._wake_fd < 0:
            self._wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if self._wake_fd < 0:
                raise OSError(errno, "eventfd failed")
            self._add(self._wake_fd, KIND_WAKE, None)
        self.own_thread = True

    def serve_forever(self) -> None:
        """Serve until `stop_serving()` (or the event channel is lost), without the GIL
        (except to log an error). Run it on the loop's own thread."""
        cdef int python_fds[MAX_EVENTS]
        cdef int n_python = 0
        cdef int n = 0
        if not self.own_thread:
            raise XvfError("prepare_thread() first")
        with nogil:
            while not self._stopping and not self.evtchn_lost:
                if self._choose_direct():
                    n = self._read_and_dispatch()
                else:
                    n = self._wait_and_dispatch(-1, python_fds, &n_python)
                if self._evtchn_errno:
                    with gil:
                        self._log_errors()
                if n < 0 and -n != EINTR:
                    self.thread_errno = -n
                    break
        if self.thread_errno:
            log.error("a service thread's epoll_wait failed: errno %d", self.thread_errno)

    def stop_serving(self) -> None:
        """Make serve_forever return (from any thread); it stays stopped."""
        cdef uint64_t one = 1
        self._stopping = True
        if self._wake_fd >= 0:
            write(self._wake_fd, &one, 8)
        self._poke()

    @property
    def stopped(self) -> bool:
        return self._stopping
