"""The software Xen's IOREQ servers, driven through the same platform client and
Cython service loop that xvf uses, with a minimal in-test device behind them."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from xvf.hotpath._ioreq import IoreqServer, MmioState, ServiceLoop
from xvf.hotpath._layout import IOREQ_SIZE
from xvf.platform.sim.ioreq import GuestDataAbort, VcpuStuck
from xvf.platform.sim.platform import SimPlatform

BASE = 0x2000000


class Scratch:
    """32 bytes of registers a guest can write and read back."""

    def __init__(self) -> None:
        self.mem = bytearray(0x200)
        self.accesses: list[tuple] = []

    def mmio_read(self, off: int, size: int) -> int:
        self.accesses.append(("r", off, size))
        return int.from_bytes(self.mem[off : off + size], "little")

    def mmio_write(self, off: int, size: int, value: int) -> None:
        self.accesses.append(("w", off, size, value))
        self.mem[off : off + size] = value.to_bytes(size, "little")


@pytest.fixture
def served(hypervisor):
    """A domain with 4 vCPUs and a device model serving BASE..BASE+0x1ff."""
    dom = hypervisor.create_domain("ioreq", memory_mib=4, vcpus=4)
    plat = SimPlatform(hypervisor.run_dir)
    evtchn = plat.open_event_channel()
    loop = ServiceLoop(evtchn.channel)
    server = plat.create_ioreq_server(dom.domid)
    assert server.nr_vcpus == 4
    scratch = Scratch()
    state = MmioState()
    state.handler = scratch
    ioreq = IoreqServer(server.page, server.nr_vcpus, BASE, 0x200, state)
    # Xen's order: enable (Xen writes vp_eport now), bind, then claim the range.
    server.set_enabled(True)
    for vcpu in range(4):
        port = evtchn.bind_interdomain(dom.domid, ioreq.vp_eport(vcpu))
        loop.add_route(port, ioreq, vcpu)
    server.map_mmio_range(BASE, BASE + 0x1FF)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [loop.run_once(50) for _ in iter(stop.is_set, True)])
    thread.start()
    yield dom, scratch, ioreq, server
    stop.set()
    thread.join()
    ioreq.release()
    server.destroy()
    evtchn.close()
    plat.close()


def test_reads_and_writes_of_every_width(served):
    dom, scratch, ioreq, _ = served
    dom.mmio(0, BASE + 0x10, 8, True, 0x1122334455667788)
    assert dom.mmio(1, BASE + 0x10, 8, False) == 0x1122334455667788
    assert dom.mmio(2, BASE + 0x10, 4, False) == 0x55667788
    assert dom.mmio(3, BASE + 0x12, 2, False) == 0x5566
    assert dom.mmio(0, BASE + 0x17, 1, False) == 0x11
    assert ("w", 0x10, 8, 0x1122334455667788) in scratch.accesses
    assert ioreq.requests == 5


def test_slot_layout_and_state_machine(served):
    dom, _, _, server = served
    dom.mmio(2, BASE + 0x20, 4, True, 0xCAFE)
    slot = bytes(server.page[2 * IOREQ_SIZE : 3 * IOREQ_SIZE])
    addr, data, count, size, port = struct.unpack_from("<QQIII", slot)
    assert (addr, data, count, size) == (BASE + 0x20, 0xCAFE, 1, 4)
    assert port == dom.servers[server.id].ports[2]
    assert slot[30] & 0xF == 0  # back to STATE_IOREQ_NONE after completion
    assert slot[31] == 1  # IOREQ_TYPE_COPY


def test_concurrent_vcpus(served):
    dom, _scratch, ioreq, _ = served
    errors: list[BaseException] = []

    def worker(vcpu: int) -> None:
        try:
            for i in range(100):
                off = 0x100 + 8 * vcpu  # clear of the hot registers (0x50, 0x60, 0x64)
                dom.mmio(vcpu, BASE + off, 4, True, i)
                assert dom.mmio(vcpu, BASE + off, 4, False) == i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ioreq.requests == 4 * 200


def test_unclaimed_address_is_a_data_abort(served):
    dom, *_ = served
    with pytest.raises(GuestDataAbort):
        dom.mmio(0, BASE + 0x200, 4, False)


def test_disabled_server_claims_nothing(served):
    dom, _, _, server = served
    server.set_enabled(False)
    with pytest.raises(GuestDataAbort):
        dom.mmio(0, BASE, 4, False)
    server.set_enabled(True)
    assert dom.mmio(0, BASE, 4, False) == 0


def test_overlaps_are_refused_per_server_and_the_highest_id_takes_the_access(hypervisor, served):
    """As Xen 4.20 (xen/common/ioreq.c): ioreq_server_map_io_range refuses an overlap
    with the server's own ranges only; ioreq_server_select walks the servers from the
    highest id down. A device model restarted after SIGKILL gets a second server whose
    windows overlap the dead one's; it is served only if its id is higher."""
    dom, _, _, first = served
    plat = SimPlatform(hypervisor.run_dir)
    other = plat.create_ioreq_server(dom.domid)
    assert other.id > first.id  # the lowest free slot, as Xen allocates them
    other.map_mmio_range(BASE + 0x100, BASE + 0x2FF)  # overlaps `first`: accepted
    with pytest.raises(Exception, match=r"EEXIST|File exists"):
        other.map_mmio_range(BASE + 0x200, BASE + 0x3FF)  # overlaps its own range
    other.set_enabled(True)
    assert dom.servers_claiming(BASE + 0x100) == [other.id, first.id]
    other.destroy()
    assert dom.servers_claiming(BASE + 0x100) == [first.id]
    reused = plat.create_ioreq_server(dom.domid)
    assert reused.id == other.id  # its slot is free again
    reused.destroy()
    plat.close()


def test_no_device_model_means_a_stuck_vcpu(hypervisor):
    dom = hypervisor.create_domain("nodm", memory_mib=4, vcpus=1)
    plat = SimPlatform(hypervisor.run_dir)
    server = plat.create_ioreq_server(dom.domid)
    server.map_mmio_range(BASE, BASE + 0x1FF)
    server.set_enabled(True)
    dom.access_timeout = 0.3
    with pytest.raises(VcpuStuck):
        dom.mmio(0, BASE, 4, False)
    server.destroy()
    plat.close()


def test_bad_control_requests_get_errors(hypervisor):
    from xvf.platform.sim import control as C

    client = C.ControlClient(hypervisor.control_path)
    with pytest.raises(OSError):
        client.call(99)  # unknown operation
    with pytest.raises(OSError):
        client.call(C.OP_DM_OP, b"\x01")  # truncated
    with pytest.raises(OSError):
        client.call(C.OP_FOREIGN_MAP, struct.pack("<H", 4242))  # no such domain
    # still serving
    _reply, fds = client.call(C.OP_EVTCHN_OPEN)
    assert len(fds) == 1
    os.close(fds[0])
    client.close()


def test_ports_are_written_only_when_the_server_is_enabled(hypervisor):
    """Xen (ioreq_server_enable -> ioreq_server_update_evtchn) writes each vCPU's
    vp_eport into a freshly cleared page only at enable: a device model that reads
    the ports first reads 0, and binding port 0 fails (what xvf did before)."""
    dom = hypervisor.create_domain("ports", memory_mib=4, vcpus=2)
    plat = SimPlatform(hypervisor.run_dir)
    evtchn = plat.open_event_channel()
    server = plat.create_ioreq_server(dom.domid)
    ioreq = IoreqServer(server.page, server.nr_vcpus)
    try:
        assert [ioreq.vp_eport(v) for v in range(2)] == [0, 0]
        with pytest.raises(Exception, match=r"EINVAL|Invalid argument"):
            evtchn.bind_interdomain(dom.domid, ioreq.vp_eport(0))
        server.set_enabled(True)
        ports = [ioreq.vp_eport(v) for v in range(2)]
        assert all(ports) and len(set(ports)) == 2
        for port in ports:
            evtchn.unbind(evtchn.bind_interdomain(dom.domid, port))
    finally:
        ioreq.release()
        server.destroy()
        evtchn.close()
        plat.close()


def test_at_most_eight_ioreq_servers_per_domain(hypervisor):
    dom = hypervisor.create_domain("eight", memory_mib=4, vcpus=1)
    plat = SimPlatform(hypervisor.run_dir)
    servers = [plat.create_ioreq_server(dom.domid) for _ in range(8)]
    try:
        with pytest.raises(Exception, match=r"ENOSPC|No space"):
            plat.create_ioreq_server(dom.domid)
    finally:
        for server in servers:
            server.destroy()
    plat.create_ioreq_server(dom.domid).destroy()  # a slot is free again
    plat.close()


def test_one_guest_server_routes_eleven_devices_by_address(hypervisor):
    """libxl gives a guest up to 11 virtio devices; xvf serves them all on ONE
    IOREQ server (xvf.guest.guest.Guest), each window answered by its own device."""
    from xvf.guest.guest import Guest

    dom = hypervisor.create_domain("eleven", memory_mib=4, vcpus=2)
    plat = SimPlatform(hypervisor.run_dir)
    evtchn = plat.open_event_channel()
    loop = ServiceLoop(evtchn.channel)
    guest = Guest(dom.domid, plat, loop, evtchn)
    guest.start()
    scratches = []
    for i in range(11):
        scratch = Scratch()
        state = MmioState()
        state.handler = scratch
        scratches.append((scratch, state))
        guest.attach(BASE + i * 0x200, 0x200, state)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [loop.run_once(50) for _ in iter(stop.is_set, True)])
    thread.start()
    try:
        assert len(dom.servers) == 1 and guest.device_count == 11
        for i in range(11):
            dom.mmio(i % 2, BASE + i * 0x200 + 0x10, 4, True, 0x1000 + i)
        for i in range(11):
            assert dom.mmio(0, BASE + i * 0x200 + 0x10, 4, False) == 0x1000 + i
            assert scratches[i][0].accesses == [("w", 0x10, 4, 0x1000 + i), ("r", 0x10, 4)]
        guest.detach(BASE + 5 * 0x200, 0x200)
        with pytest.raises(GuestDataAbort):
            dom.mmio(0, BASE + 5 * 0x200, 4, False)
        assert dom.mmio(1, BASE + 6 * 0x200 + 0x10, 4, False) == 0x1006
    finally:
        stop.set()
        thread.join()
        guest.stop()
        evtchn.close()
        plat.close()
    assert dom.servers == {}


def test_mapcache_invalidate_broadcast_reaches_the_server_and_is_answered(served):
    """The simulator now sends what real Xen sends on Arm when the guest's p2m drops a
    RAM page (found on the rig): an INVALIDATE broadcast, which xvf must answer."""
    dom, scratch, ioreq, _ = served
    assert dom.invalidate_mapcache(0) == 1
    assert (ioreq.invalidates, ioreq.bad_requests) == (1, 0)
    assert scratch.accesses == []
    dom.mmio(0, BASE + 0x10, 4, True, 0x1234)  # the vCPU runs on
    assert dom.mmio(1, BASE + 0x10, 4, False) == 0x1234


@pytest.mark.kernel_eventfds
def test_an_irqfd_injection_is_an_edge_not_a_level_held_high(hypervisor) -> None:
    """privcmd irqfd issues set_irq_level(irq, 1) per signal and nothing lowers the
    line; Xen's Arm vGIC takes each as one injection and keeps no level. The software
    Xen once held the line high after the first, so a driver waiting for the next
    interrupt never waited again (an interrupt storm of InterruptStatus reads)."""
    dom = hypervisor.create_domain("irqfd", memory_mib=16, vcpus=1)
    platform = SimPlatform(hypervisor.run_dir)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        platform.assign_irqfd(dom.domid, 40, efd)
        os.eventfd_write(efd, 1)
        assert dom.wait_irq(40, 5.0)  # the injection
        assert dom.irq_level(40) == 0
        assert not dom.wait_irq(40, 0.2)  # and no second one without a second signal
        os.eventfd_write(efd, 1)
        assert dom.wait_irq(40, 5.0)
        assert dom.irqfd_hits == 2
        platform.assign_irqfd(dom.domid, 40, efd, deassign=True)
    finally:
        os.close(efd)
        platform.close()
