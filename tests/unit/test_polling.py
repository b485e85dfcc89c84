"""Opt-in polling (`--poll-us`): the service loop spins on the routed ioreq slots before
it sleeps, so an access published meanwhile is served without waiting for its event.
Driven on the software Xen with both hot paths (Cython and its Python reference)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from xvf.errors import XvfError
from xvf.hotpath import _ioreq
from xvf.hotpath import ioreq_reference as _ioreq_py
from xvf.platform.sim.platform import SimPlatform

BASE = 0x2000000
IMPLS = [_ioreq, _ioreq_py]


class Scratch:
    def __init__(self) -> None:
        self.mem = bytearray(0x200)

    def mmio_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.mem[off : off + size], "little")

    def mmio_write(self, off: int, size: int, value: int) -> None:
        self.mem[off : off + size] = value.to_bytes(size, "little")


@pytest.fixture(params=IMPLS, ids=["cython", "python"])
def served(request, hypervisor):
    """A 2-vCPU domain served by `mod`'s loop on its own thread; yields (dom, loop, ioreq)."""
    mod = request.param
    dom = hypervisor.create_domain(f"poll-{mod.__name__}", memory_mib=4, vcpus=2)
    plat = SimPlatform(hypervisor.run_dir)
    evtchn = plat.open_event_channel()
    loop = mod.ServiceLoop(evtchn.channel)
    server = plat.create_ioreq_server(dom.domid)
    state = mod.MmioState()
    state.handler = Scratch()
    ioreq = mod.IoreqServer(server.page, server.nr_vcpus, BASE, 0x200, state)
    server.set_enabled(True)
    ports = []
    for vcpu in range(2):
        port = evtchn.bind_interdomain(dom.domid, ioreq.vp_eport(vcpu))
        loop.add_route(port, ioreq, vcpu)
        ports.append(port)
    server.map_mmio_range(BASE, BASE + 0x1FF)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [loop.run_once(50) for _ in iter(stop.is_set, True)])
    yield dom, loop, ioreq, thread
    stop.set()
    if thread.is_alive():
        thread.join()
    for port in ports:
        loop.remove_route(port)
    ioreq.release()
    server.destroy()
    evtchn.close()
    plat.close()


def accesses(dom, vcpu: int, n: int) -> None:
    for i in range(n):
        off = 0x100 + 8 * vcpu
        dom.mmio(vcpu, BASE + off, 4, True, i)
        assert dom.mmio(vcpu, BASE + off, 4, False) == i


def test_the_default_never_spins(served):
    dom, loop, ioreq, thread = served
    thread.start()
    accesses(dom, 0, 50)
    assert loop.poll_ns == 0
    assert (loop.polled, loop.idle_spins) == (0, 0)
    assert ioreq.requests == 100


def test_a_spinning_loop_serves_accesses_before_their_event_and_each_only_once(served):
    dom, loop, ioreq, thread = served
    # Long enough that the guest's next access lands within the spin after the last one.
    loop.set_polling(20_000)
    assert loop.poll_ns == 20_000_000
    thread.start()
    workers = [threading.Thread(target=accesses, args=(dom, v, 100)) for v in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    # Every access answered with the right value (accesses() asserts it) and counted
    # once, although most were served by the spin and their event was read later.
    assert ioreq.requests == 400
    assert loop.polled > 40, f"only {loop.polled} of 400 ioreqs were found by spinning"


def test_an_idle_spin_gives_up_and_sleeps_on_the_event_channel(served):
    dom, loop, ioreq, thread = served
    loop.set_polling(1000)
    thread.start()
    accesses(dom, 0, 1)
    time.sleep(0.3)  # nothing arrives: each spin ends after 1 ms, then the loop sleeps
    spins = loop.idle_spins
    assert spins >= 1
    accesses(dom, 1, 1)  # and an access after the sleep is served as usual
    assert ioreq.requests == 4


@pytest.mark.parametrize("mod", IMPLS, ids=["cython", "python"])
@pytest.mark.parametrize("bad", [-1, 1e6 + 1, float("nan")])
def test_poll_times_outside_the_range_are_refused(mod, bad):
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        from xvf.platform.sim._hotpath import SimEventChannel

        loop = mod.ServiceLoop(SimEventChannel(a.fileno()))
        with pytest.raises(XvfError, match="outside"):
            loop.set_polling(bad)
        assert loop.poll_ns == 0
    finally:
        a.close()
        b.close()


def test_a_route_to_a_slot_the_page_lacks_is_refused(served):
    _dom, loop, ioreq, _thread = served
    with pytest.raises(XvfError, match="no slot"):
        loop.add_route(999, ioreq, 2)  # the domain has 2 vCPUs: slots 0 and 1


@pytest.mark.parametrize("mod", IMPLS, ids=["cython", "python"])
def test_a_vcpu_that_keeps_its_slot_busy_does_not_starve_the_others(mod):
    """The spin starts after the slot it served last: with vCPU 0 READY again at every
    look, vCPUs 1 and 2 are still served in turn (both implementations)."""
    import mmap
    import socket
    import struct

    from xvf.hotpath._layout import IOREQ_FLAGS, IOREQ_SIZE, STATE_IOREQ_READY
    from xvf.platform.sim._hotpath import SimEventChannel

    page = mmap.mmap(-1, 4096)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    try:
        state = mod.MmioState()
        state.handler = Scratch()
        ioreq = mod.IoreqServer(page, 3, BASE, 0x200, state)
        loop = mod.ServiceLoop(SimEventChannel(ours.fileno()))
        for vcpu in range(3):
            loop.add_route(vcpu + 1, ioreq, vcpu)
        loop.set_polling(100_000)

        def arm(vcpu: int) -> None:  # an InterruptStatus read, as Xen publishes it
            base = vcpu * IOREQ_SIZE
            struct.pack_into("<QQIII", page, base, BASE + 0x60, 0, 1, 4, vcpu + 1)
            page[base + 31] = 1  # IOREQ_TYPE_COPY
            page[base + IOREQ_FLAGS] = STATE_IOREQ_READY | 0x20  # a read

        def state_of(vcpu: int) -> int:
            return page[vcpu * IOREQ_SIZE + IOREQ_FLAGS] & 0x0F

        for vcpu in range(3):
            arm(vcpu)
        served = []
        for _ in range(3):
            before = [state_of(v) for v in range(3)]
            assert loop.run_once(1000) == 1
            (vcpu,) = [v for v in range(3) if before[v] == STATE_IOREQ_READY != state_of(v)]
            served.append(vcpu)
            arm(0)  # vCPU 0 is READY again at once, every time
        assert sorted(served) == [0, 1, 2], served
        assert loop.polled == 3
        for vcpu in range(3):
            loop.remove_route(vcpu + 1)
        ioreq.release()
    finally:
        ours.close()
        theirs.close()
        page.close()


@pytest.mark.parametrize("mod", IMPLS, ids=["cython", "python"])
def test_a_loop_kept_busy_by_other_fds_does_not_keep_a_port_masked(mod):
    """A port read while polling stays masked for the spin; when other fds keep the loop
    from spinning, it is unmasked at once, so the guest's next notification is not held
    back behind them (both implementations)."""
    import mmap
    import socket
    import struct

    from xvf.hotpath._layout import IOREQ_FLAGS, STATE_IOREQ_READY
    from xvf.platform.sim._hotpath import SimEventChannel
    from xvf.platform.sim.evtchn import NOTIFY_BIT

    page = mmap.mmap(-1, 4096)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    r, w = os.pipe()
    try:
        state = mod.MmioState()
        state.handler = Scratch()
        ioreq = mod.IoreqServer(page, 1, BASE, 0x200, state)
        loop = mod.ServiceLoop(SimEventChannel(ours.fileno()))
        loop.add_route(1, ioreq, 0)
        loop.set_polling(1000)
        struct.pack_into("<QQIII", page, 0, BASE + 0x60, 0, 1, 4, 1)
        page[31] = 1
        page[IOREQ_FLAGS] = STATE_IOREQ_READY | 0x20
        theirs.send(struct.pack("<I", 1))  # the event of that request
        assert loop.run_once(1000) >= 1
        words = []
        while True:
            try:
                words += struct.unpack("<I", theirs.recv(4))
            except BlockingIOError:
                break
        assert words == [1 | NOTIFY_BIT]  # answered, and port 1 kept masked for the spin
        os.write(w, b"x")  # another fd that stays readable: no spin from now on
        loop.add_reader(r, lambda: None)
        loop.run_once(1000)
        assert struct.unpack("<I", theirs.recv(4)) == (1,)  # unmasked without a spin
        loop.remove_fd(r)
        loop.remove_route(1)
        ioreq.release()
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()
        page.close()
