"""The software Xen's event channels behave like Linux /dev/xen/evtchn over Xen's ports."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from xvf.hotpath._evtchn import DOMID_SELF
from xvf.platform.sim._hotpath import SimEventChannel
from xvf.platform.sim.evtchn import EventChannels

GUEST = 5


@pytest.fixture
def chans():
    ec = EventChannels()
    ec.add_domain(0)
    ec.add_domain(GUEST)
    yield ec
    ec.close()


def read_ports(channel: SimEventChannel, timeout: float = 2.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ports = channel.read_pending()
        if ports:
            return ports
        time.sleep(0.005)
    return []


def open_channel(ec: EventChannels) -> tuple[int, SimEventChannel, socket.socket]:
    hid, sock = ec.open_handle()
    sock.setblocking(False)
    return hid, SimEventChannel(sock.fileno()), sock


def test_a_bind_makes_the_new_port_pending_once_as_xen_does(chans):
    """Xen's evtchn_bind_interdomain always sets the new local port pending (a send on
    the unbound remote port may have been lost), so a device model reads each port it
    binds once before any guest notification: it must take that as a spurious event."""
    remote = chans.alloc_unbound(GUEST, 0, lambda: None)
    hid, chan, sock = open_channel(chans)
    local = chans.bind_interdomain(hid, GUEST, remote)
    assert read_ports(chan) == [local]
    chan.unmask(local)
    assert read_ports(chan, 0.2) == []  # once, not again on unmask
    sock.close()


def test_a_loopback_channel_wakes_its_own_handle(chans):
    """IOCTL_EVTCHN_BIND_UNBOUND_PORT for DOMID_SELF, then BIND_INTERDOMAIN to that port
    from the same handle: a notify on the second port reads as the first."""
    hid, chan, sock = open_channel(chans)
    listen = chans.bind_unbound(hid, DOMID_SELF)
    send = chans.bind_interdomain(hid, DOMID_SELF, listen)
    assert listen != send
    assert read_ports(chan) == [send]  # the bind's own event (see above)
    chan.unmask(send)
    chan.notify(send)
    assert read_ports(chan) == [listen]
    chan.notify(send)  # masked until unmasked: kept pending
    assert read_ports(chan, 0.2) == []
    chan.unmask(listen)
    assert read_ports(chan) == [listen]
    with pytest.raises(OSError):
        chans.bind_interdomain(hid, DOMID_SELF, listen)  # bound already
    sock.close()


def test_guest_notify_reaches_handle_and_masks_until_unmasked(chans):
    woke = threading.Event()
    remote = chans.alloc_unbound(GUEST, 0, woke.set)
    hid, chan, sock = open_channel(chans)
    local = chans.bind_interdomain(hid, GUEST, remote)
    assert read_ports(chan) == [local]  # the bind's event
    chan.unmask(local)
    chans.notify(GUEST, remote)
    assert read_ports(chan) == [local]
    # masked: a second event is kept pending, not delivered
    chans.notify(GUEST, remote)
    assert read_ports(chan, 0.2) == []
    chan.unmask(local)
    assert read_ports(chan) == [local]
    # the device model's notify reaches the guest port
    chan.notify(local)
    assert woke.wait(2)
    sock.close()


def test_binding_rules(chans):
    remote = chans.alloc_unbound(GUEST, 0, lambda: None)
    hid, _chan, sock = open_channel(chans)
    with pytest.raises(OSError):
        chans.bind_interdomain(hid, GUEST, remote + 100)  # no such port
    chans.bind_interdomain(hid, GUEST, remote)
    with pytest.raises(OSError):
        chans.bind_interdomain(hid, GUEST, remote)  # already bound
    with pytest.raises(OSError):
        chans.bind_interdomain(hid + 1, GUEST, remote)  # bad handle
    other = chans.alloc_unbound(GUEST, 7, lambda: None)  # reserved for domain 7
    with pytest.raises(OSError):
        chans.bind_interdomain(hid, GUEST, other)
    sock.close()


def test_unbind_and_reuse(chans):
    remote = chans.alloc_unbound(GUEST, 0, lambda: None)
    hid, chan, sock = open_channel(chans)
    local = chans.bind_interdomain(hid, GUEST, remote)
    assert read_ports(chan) == [local]  # the bind's event
    chans.unbind(hid, local)
    chans.notify(GUEST, remote)  # unbound again: dropped silently
    assert read_ports(chan, 0.2) == []
    assert chans.bind_interdomain(hid, GUEST, remote) > 0
    sock.close()


def test_garbage_and_foreign_ports_do_not_hurt(chans):
    woke = threading.Event()
    remote = chans.alloc_unbound(GUEST, 0, woke.set)
    hid, _chan, sock = open_channel(chans)
    local = chans.bind_interdomain(hid, GUEST, remote)
    os.write(sock.fileno(), b"\x01\x02\x03")  # partial word
    os.write(sock.fileno(), struct.pack("<I", 0x80000000 | 999))  # notify on a port not ours
    os.write(sock.fileno(), struct.pack("<I", 0x80000000 | local))
    assert woke.wait(2)
    sock.close()


def test_closing_the_handle_unbinds(chans):
    remote = chans.alloc_unbound(GUEST, 0, lambda: None)
    hid, _chan, sock = open_channel(chans)
    chans.bind_interdomain(hid, GUEST, remote)
    sock.close()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        hid2, _c2, s2 = open_channel(chans)
        try:
            chans.bind_interdomain(hid2, GUEST, remote)
            s2.close()
            return
        except OSError:
            s2.close()
            time.sleep(0.02)
    pytest.fail("the port stayed bound after its handle closed")
