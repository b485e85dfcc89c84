"""The one exception hierarchy of xvf. Every error xvf raises on purpose is an XvfError."""

from __future__ import annotations

import errno as _errno
import os


class XvfError(Exception):
    """Base of every error xvf raises on purpose."""


class OsCallError(XvfError):
    """A system call or hypercall failed; carries the errno."""

    def __init__(self, message: str, err: int | None = 0) -> None:
        err = err or 0  # OSError.errno may be None
        self.errno = err
        if err:
            name = _errno.errorcode.get(err, str(err))
            message = f"{message}: {os.strerror(err)} ({name})"
        super().__init__(message)


class EventChannelError(OsCallError):
    """An event-channel operation failed."""


class HypercallError(OsCallError):
    """A dm_op or other privcmd operation failed."""


class GrantError(OsCallError):
    """Mapping or unmapping granted pages failed, or a grant was invalid."""


class PlatformUnavailable(XvfError):
    """The Xen interfaces (/dev/xen/*) or the simulator are not there."""


class XenStoreError(XvfError):
    """A xenstore request failed or the connection broke."""


class ConfigError(XvfError):
    """Bad configuration: command line, xenstore entries or device parameters."""


class VhostUserError(XvfError):
    """The vhost-user backend broke the protocol, refused a request or went away."""


class GuestError(XvfError):
    """The guest did something the device model must refuse (bad register use, bad descriptors)."""


class RelayError(GuestError):
    """A guest descriptor chain the grant relay refuses (completed with used len 0)."""


class SimulatorError(XvfError):
    """The software Xen was used wrongly or detected a stuck guest."""
