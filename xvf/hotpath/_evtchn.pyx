# cython: language_level=3
"""Event-channel handle: Linux's /dev/xen/evtchn.

Reading yields 4-byte pending port numbers (each port stays masked until
unmasked by writing its number back). The simulator's handle, a socket with the
same read/write semantics, is a subclass in xvf.platform.sim._hotpath that
overrides `c_notify` and the device ioctls.
"""

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint32_t
from posix.fcntl cimport F_GETFL, F_SETFL, O_NONBLOCK, fcntl

from xvf.hotpath.includes.linux_xen cimport (
    XVF_DOMID_SELF, XVF_IOCTL_EVTCHN_BIND_INTERDOMAIN, XVF_IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    XVF_IOCTL_EVTCHN_NOTIFY, XVF_IOCTL_EVTCHN_RESET, XVF_IOCTL_EVTCHN_UNBIND,
    xvf_evtchn_bind_interdomain_t, xvf_evtchn_bind_unbound_port_t, xvf_evtchn_port_arg_t,
)
from xvf.hotpath.includes.system cimport close, ioctl, read, write

from xvf.errors import EventChannelError

DOMID_SELF = XVF_DOMID_SELF


cdef class EventChannel:
    """One open /dev/xen/evtchn handle."""

    def __cinit__(self, int fd):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    cdef int c_notify(self, uint32_t port) noexcept nogil:
        cdef xvf_evtchn_port_arg_t arg
        arg.port = port
        if ioctl(self.fd, XVF_IOCTL_EVTCHN_NOTIFY, &arg) < 0:
            return -errno
        return 0

    cdef int c_unmask(self, uint32_t port) noexcept nogil:
        if write(self.fd, &port, 4) != 4:
            return -errno
        return 0

    cdef int c_unmask_many(self, uint32_t *ports, int n) noexcept nogil:
        """Unmask `n` ports in one write: /dev/xen/evtchn takes an array of ports
        (evtchn_write), as the simulator's handle does."""
        if n <= 0:
            return 0
        if write(self.fd, ports, n * 4) != n * 4:
            return -errno
        return 0

    cdef int c_read_pending(self, uint32_t *ports, int max_ports) noexcept nogil:
        """Read up to max_ports pending ports; 0 when none, -errno on error."""
        cdef ssize_t n
        while True:
            n = read(self.fd, ports, max_ports * 4)
            if n >= 0:
                return <int>(n // 4)
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return 0
            return -errno

    cdef int c_set_blocking(self, bint blocking) noexcept nogil:
        """Make read() wait for a port (True) or return EAGAIN (False); -errno."""
        cdef int flags = fcntl(self.fd, F_GETFL)
        if flags < 0:
            return -errno
        flags = (flags & ~O_NONBLOCK) if blocking else (flags | O_NONBLOCK)
        if fcntl(self.fd, F_SETFL, flags) < 0:
            return -errno
        return 0

    def notify(self, uint32_t port) -> None:
        cdef int rc = self.c_notify(port)
        if rc < 0:
            raise EventChannelError(f"notify of port {port} failed", -rc)

    def unmask(self, uint32_t port) -> None:
        cdef int rc = self.c_unmask(port)
        if rc < 0:
            raise EventChannelError(f"unmask of port {port} failed", -rc)

    def read_pending(self, int max_ports=64) -> list:
        cdef uint32_t buf[256]
        if max_ports > 256:
            max_ports = 256
        cdef int n = self.c_read_pending(buf, max_ports)
        if n < 0:
            raise EventChannelError("reading pending ports failed", -n)
        return [buf[i] for i in range(n)]

    # The ioctls below exist only on the real device; the simulator's subclass
    # refuses them (it binds through its control socket, xvf.platform.sim.platform).
    def bind_interdomain(self, unsigned int remote_domain, unsigned int remote_port) -> int:
        cdef xvf_evtchn_bind_interdomain_t arg
        arg.remote_domain = remote_domain
        arg.remote_port = remote_port
        cdef int rc = ioctl(self.fd, XVF_IOCTL_EVTCHN_BIND_INTERDOMAIN, &arg)
        if rc < 0:
            raise EventChannelError(
                f"binding to port {remote_port} of domain {remote_domain} failed", errno)
        return rc

    def bind_unbound_port(self, unsigned int remote_domain) -> int:
        """A new port of ours that `remote_domain` may bind to, bound to this handle."""
        cdef xvf_evtchn_bind_unbound_port_t arg
        arg.remote_domain = remote_domain
        cdef int rc = ioctl(self.fd, XVF_IOCTL_EVTCHN_BIND_UNBOUND_PORT, &arg)
        if rc < 0:
            raise EventChannelError(
                f"allocating a port for domain {remote_domain} failed", errno)
        return rc

    def unbind(self, unsigned int port) -> None:
        cdef xvf_evtchn_port_arg_t arg
        arg.port = port
        if ioctl(self.fd, XVF_IOCTL_EVTCHN_UNBIND, &arg) < 0:
            raise EventChannelError(f"unbinding port {port} failed", errno)

    def reset(self) -> None:
        """IOCTL_EVTCHN_RESET: harmless on a fresh handle, so it tells the evtchn
        driver from any other character device."""
        if ioctl(self.fd, XVF_IOCTL_EVTCHN_RESET, NULL) < 0:
            raise EventChannelError("resetting the event-channel handle failed", errno)

    def close(self) -> None:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
