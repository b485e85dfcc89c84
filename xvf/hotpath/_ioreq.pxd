from cpython.buffer cimport Py_buffer
from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from xvf.hotpath._evtchn cimport EventChannel
from xvf.hotpath.includes.xen_dmop cimport xvf_dm_op_t
from xvf.hotpath.includes.system cimport pthread_mutex_t
from xvf.hotpath.includes.xen_ioreq cimport xvf_ioreq_t

cdef enum:
    MAX_QUEUES = 64
    MAX_WINDOWS = 32  # devices per IOREQ server (libxl gives a guest at most 11)


cdef class IrqLine:
    cdef readonly int fd
    cdef uint16_t domid
    cdef readonly uint32_t irq
    cdef readonly int level
    cdef readonly uint64_t changes
    # c_set builds the set_irq_level dm_op and hands it to c_issue (IOCTL_PRIVCMD_DM_OP),
    # which the simulator's subclass overrides; both return 0 or -errno.
    cdef int c_set(self, int level) noexcept nogil
    cdef int c_issue(self, xvf_dm_op_t *op) noexcept nogil


cdef class MmioState:
    # Python (the register file, on the daemon's thread) writes status; the hot path,
    # possibly on a guest's own service thread, reads it.
    cdef public uint32_t status
    cdef public uint32_t int_status
    cdef public object handler
    cdef public IrqLine irq
    # With kernel irqfd the used-buffer interrupt bypasses xvf, which cannot
    # know when it fired: InterruptStatus then always shows the vring bit (a
    # spurious ring scan is harmless; a missed one is not).
    cdef public bint vring_sticky
    # That irqfd, when xvf raises the interrupt itself (a relayed queue's completions):
    # a write to it is the interrupt, the kernel injects it (-1: the dm_op line).
    cdef int irq_fd
    cdef int kick_fds[MAX_QUEUES]
    cdef public uint32_t num_queues
    # counters, readable from Python for stats and tests
    cdef readonly uint64_t notifies
    cdef readonly uint64_t ignored_notifies
    cdef readonly uint64_t hot_accesses
    cdef readonly uint64_t slow_accesses
    cdef readonly uint64_t interrupts
    # Accesses whose answer waits for a backend (a reset waits for the rings to stop):
    # token -> (server, vcpu, is_read). The vCPU stays in its slot; nothing else waits.
    cdef uint64_t _defer_next
    cdef uint64_t _deferring
    cdef dict _deferred
    cdef object _handler_errors  # a guest can trigger these at will: rate-limited
    # int_status with the line level it implies, and kick_fds against their use: the
    # guest's service thread and the daemon's change them. Taken with the GIL released.
    cdef pthread_mutex_t lock

    cdef void c_raise(self, uint32_t bits) noexcept nogil
    cdef void c_ack(self, uint32_t bits) noexcept nogil
    cdef bint c_read_hot(self, uint64_t offset, uint32_t size, uint64_t *value) noexcept nogil
    cdef bint c_write_hot(self, uint64_t offset, uint32_t size, uint64_t value) noexcept nogil
    cdef void c_begin(self) noexcept
    cdef uint64_t c_end(self) noexcept
    cdef uint64_t c_read(self, uint64_t offset, uint32_t size) noexcept
    cdef void c_write(self, uint64_t offset, uint32_t size, uint64_t value) noexcept


cdef class IoreqServer:
    cdef Py_buffer view
    cdef bint have_view
    cdef xvf_ioreq_t *slots
    cdef readonly uint32_t nr_vcpus
    cdef uint64_t win_base[MAX_WINDOWS]
    cdef uint64_t win_size[MAX_WINDOWS]
    cdef list _win_dev      # MmioState of each window, same index as win_base
    cdef PyObject *win_ptr[MAX_WINDOWS]  # the same, borrowed, for the GIL-free hot path
    # The windows: changed on the daemon's thread, read by the service thread.
    cdef pthread_mutex_t lock
    # A guest served on its own thread hands every access the hot path does not answer
    # to the daemon's thread (where all Python runs): flagged per vCPU, signalled on
    # an eventfd (enable_posting).
    cdef int posted_fd
    cdef uint8_t *posted
    cdef uint32_t nr_windows
    cdef uint32_t last_hit  # the window of the previous access: usually the next one's too
    cdef readonly uint64_t requests
    cdef readonly uint64_t bad_requests
    # Xen broadcasts IOREQ_TYPE_INVALIDATE to every server when the guest's p2m drops a
    # RAM page (on Arm: p2m_put_l3_page; Linux's balloon and grant-table set-up do it).
    cdef readonly uint64_t invalidates
    # Called with the vCPU number once a deferred access is answered (Guest: notify its port).
    cdef public object notify_vcpu

    cdef int c_window(self, uint64_t addr) noexcept nogil
    cdef bint c_answer(self, uint32_t vcpu, uint64_t value, bint is_read) except -1
    cdef int c_service_hot(self, uint32_t vcpu, bint post) noexcept nogil
    cdef bint c_serve_slow(self, uint32_t vcpu) noexcept
    cdef bint c_service(self, uint32_t vcpu) noexcept


cdef class FdHandler:
    # What a ServiceLoop runs, without the GIL, when `fd` (one of the handler's) is
    # readable: C work a guest's service thread can do itself (the grant relay's
    # kicks and calls). Called with the loop's lock held.
    cdef void c_ready(self, int fd) noexcept nogil


cdef class ServiceLoop:
    cdef int epfd
    cdef readonly EventChannel evtchn
    # All of the loop's tables below: changed on the daemon's thread, read by the
    # thread that runs the loop. Taken with the GIL released.
    cdef pthread_mutex_t lock
    # port -> (server, vcpu); ports are small integers, a flat table keeps lookups in C
    cdef list _route_server
    cdef PyObject **_route_srv  # the same servers, borrowed, for the GIL-free path
    cdef uint32_t *_route_vcpu
    cdef uint32_t _route_len
    # Opt-in polling (set_polling): each routed port's slot, and the routed ports in a
    # compact array, so that the spin before sleeping reads the page without the GIL.
    cdef xvf_ioreq_t **_route_slot
    cdef uint32_t *_poll_ports
    cdef uint32_t _poll_len
    cdef uint32_t _poll_next  # where the next spin starts: round robin, so no guest starves
    # While polling, ports whose event was read stay masked (Xen then only marks them
    # pending: no more events to read) and are unmasked together before the loop sleeps.
    cdef uint32_t *_masked
    cdef uint32_t _masked_len
    # Accesses the GIL-free pass claimed but must leave to Python (ports, in order).
    cdef uint32_t *_slow_ports
    cdef uint32_t _slow_len
    cdef bint _slow_polled  # the queued access is the one a spin found
    cdef readonly uint64_t poll_ns
    cdef readonly uint64_t polled       # requests served because a spin found them
    cdef readonly uint64_t idle_spins   # spins that found nothing, then slept
    # fd -> kind and object: the C table the dispatch reads, the dict that owns them
    cdef uint8_t *_fd_kind
    cdef PyObject **_fd_obj
    cdef int _fd_cap
    cdef dict _fds
    cdef readonly uint64_t wakeups
    cdef readonly uint64_t evtchn_errors
    cdef int _evtchn_errno  # the last read error, logged once the lock is dropped
    # The event channel's other end went away (the simulator died; on Xen, the
    # device broke): the daemon then serves nothing and must say so and stop.
    cdef readonly bint evtchn_lost
    # serve_forever: the loop on a thread of its own, without the GIL
    cdef readonly bint own_thread
    cdef int _wake_fd
    cdef bint _stopping
    cdef readonly int thread_errno  # why serve_forever ended early (0: it was stopped)
    # Waiting by a blocking read of the event channel itself (serve_forever with wake
    # ports): the three syscalls of a plain C device model per access instead of four,
    # while the channel is all there is to watch (no backend call fds, no handlers)
    # and polling is off. A loopback channel on the same handle (set_wake_ports) is
    # what wakes the read when that changes or the loop is to stop.
    cdef bint _has_wake_ports
    cdef uint32_t _wake_listen
    cdef uint32_t _wake_send
    cdef int _other_fds  # watched fds other than the channel and the wake eventfd
    cdef bint _evtchn_blocking
    cdef bint _direct_broken  # a read failed: epoll from now on (it reports why)
    cdef readonly uint64_t direct_waits

    cdef _add(self, int fd, int kind, object obj)
    cdef void _forget(self, int fd) noexcept
    cdef uint32_t _grow_routes(self, uint32_t n) noexcept nogil
    cdef void _on_evtchn(self) noexcept nogil
    cdef void _on_ports(self, uint32_t *ports, int n) noexcept nogil
    cdef bint _choose_direct(self) noexcept nogil
    cdef int _read_and_dispatch(self) noexcept nogil
    cdef void _poke(self) noexcept nogil
    cdef int _spin(self) noexcept nogil
    cdef void _serve_port(self, uint32_t port, bint polled) noexcept nogil
    cdef void _index_polled(self) noexcept nogil
    cdef void _unmask_deferred(self) noexcept nogil
    cdef void _on_call(self, int fd, PyObject *device) noexcept nogil
    cdef int _wait_and_dispatch(self, int timeout_ms, int *python_fds, int *n_python) noexcept nogil
    cdef void _log_errors(self) noexcept
