# cython: language_level=3
"""The simulator's stand-ins for the hot path's kernel interfaces.

The software Xen has no /dev/xen/evtchn or privcmd for the hot path to ioctl:
its event-channel handle is a SOCK_SEQPACKET socket (a notify is a written port
number tagged with NOTIFY_BIT, see xvf.platform.sim.evtchn) and a dm_op is a
message on its control socket (xvf.platform.sim.control). These subclasses
override only the nogil methods that reach the kernel, so the hot path calls
them as it calls the real ones, through the class's C method table (a grant copy
has a module of its own, xvf.platform.sim._grant_copy). The wire layouts are the
simulator's Python modules'; they are read here once, at import.
"""

from libc.errno cimport EINTR, EIO, errno
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcpy

from xvf.hotpath._evtchn cimport EventChannel
from xvf.hotpath._ioreq cimport IrqLine
from xvf.hotpath.includes.system cimport close, recv, send, write
from xvf.hotpath.includes.xen_dmop cimport xvf_dm_op_t

from xvf.errors import EventChannelError
from xvf.platform.sim import control as C
from xvf.platform.sim.evtchn import NOTIFY_BIT

cdef enum:
    PREFIX_LEN = 16  # the request header and the dm_op prefix, checked below

cdef struct dm_op_request:
    uint8_t prefix[PREFIX_LEN]
    xvf_dm_op_t op

cdef struct dm_op_reply:  # only rc is read: room enough for {i32 rc, xen_dm_op}
    int32_t rc
    xvf_dm_op_t op

cdef uint32_t _notify_bit = NOTIFY_BIT
if (C.HEADER.size + C.DM_OP_PREFIX.size != PREFIX_LEN or C.DM_OP_SIZE != sizeof(xvf_dm_op_t)
        or C.RC.size != sizeof(int32_t)):
    raise ImportError("xvf.platform.sim.control's dm_op message is not what _hotpath sends")


cdef ssize_t _send(int fd, const void *buf, size_t n) noexcept nogil:
    """send, EINTR retried: a signal (the daemon's SIGHUP) must not split a control
    request from its reply, or the next request would read this one's."""
    cdef ssize_t got = send(fd, buf, n, 0)
    while got < 0 and errno == EINTR:
        got = send(fd, buf, n, 0)
    return got


cdef ssize_t _recv(int fd, void *buf, size_t n) noexcept nogil:
    """recv, EINTR retried (as _send)."""
    cdef ssize_t got = recv(fd, buf, n, 0)
    while got < 0 and errno == EINTR:
        got = recv(fd, buf, n, 0)
    return got


cdef class SimEventChannel(EventChannel):
    """The simulator's event-channel handle: notify is a tagged write."""

    cdef int c_notify(self, uint32_t port) noexcept nogil:
        cdef uint32_t tagged = port | _notify_bit
        if write(self.fd, &tagged, 4) != 4:
            return -errno
        return 0

    # Device ioctls: the simulator binds through its platform's control socket.
    def bind_interdomain(self, unsigned int remote_domain, unsigned int remote_port) -> int:
        raise _not_a_device("bind_interdomain")

    def bind_unbound_port(self, unsigned int remote_domain) -> int:
        raise _not_a_device("bind_unbound_port")

    def unbind(self, unsigned int port) -> None:
        raise _not_a_device("unbind")

    def reset(self) -> None:
        raise _not_a_device("reset")


def _not_a_device(what: str) -> EventChannelError:
    return EventChannelError(f"{what} is a device ioctl; the simulator binds via its platform")


cdef class SimIrqLine(IrqLine):
    """An interrupt line whose set_irq_level dm_op goes over the simulator's control
    socket (`fd`, a connection of its own) rather than IOCTL_PRIVCMD_DM_OP."""

    cdef dm_op_request request  # the prefix is fixed per line; the dm_op is filled per call
    # Set by take_fd: the line closes fd when it goes. Lines of guests served on
    # different threads must never share a connection (their replies would interleave).
    cdef bint owns_fd

    def __cinit__(self, int fd, unsigned int domid, unsigned int irq):
        prefix = (C.HEADER.pack(C.OP_DM_OP, C.DM_OP_PREFIX.size + C.DM_OP_SIZE)
                  + C.DM_OP_PREFIX.pack(domid, 0, 0))
        memcpy(self.request.prefix, <const char *>prefix, PREFIX_LEN)

    def take_fd(self) -> None:
        """The line owns its connection from now on and closes it when it goes."""
        self.owns_fd = True

    def __dealloc__(self):
        if self.owns_fd and self.fd >= 0:
            close(self.fd)

    cdef int c_issue(self, xvf_dm_op_t *op) noexcept nogil:
        cdef dm_op_reply reply
        cdef ssize_t got
        self.request.op = op[0]
        got = _send(self.fd, &self.request, sizeof(self.request))
        if got != sizeof(self.request):
            return -errno if got < 0 else -EIO
        got = _recv(self.fd, &reply, sizeof(reply))
        if got < <ssize_t>sizeof(reply.rc):
            return -errno if got < 0 else -EIO
        return reply.rc if reply.rc < 0 else 0
