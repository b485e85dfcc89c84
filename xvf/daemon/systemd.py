"""sd_notify(3) without libsystemd: one datagram per state change to $NOTIFY_SOCKET.

Nothing is sent when NOTIFY_SOCKET is unset (not started by systemd with
Type=notify); a failing send is logged at debug level and otherwise ignored,
since the daemon must serve guests whether or not systemd hears about it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("xvf.daemon.systemd")


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to the service manager; True if it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":  # an abstract socket name
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), addr)
    except OSError as exc:
        log.debug("sd_notify %r to %s: %s", message, addr, exc)
        return False
    return True


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'s' if count != 1 else ''}"


class Notifier:
    """READY once, STATUS whenever the served counts change, STOPPING once."""

    def __init__(self) -> None:
        self.ready = False
        self.stopping = False
        self._served: tuple[int, int] | None = None

    def served(self, guests: int, devices: int) -> None:
        """Called after each loop round: READY=1 the first time, STATUS= on every change."""
        if (guests, devices) == self._served:
            return  # the common case, kept cheap: this runs once per loop round
        self._served = (guests, devices)
        status = f"{_n(guests, 'guest')}, {_n(devices, 'device')} served"
        if not self.ready:
            self.ready = True
            notify(f"READY=1\nSTATUS={status}")
        else:
            notify(f"STATUS={status}")

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            notify("STOPPING=1")
