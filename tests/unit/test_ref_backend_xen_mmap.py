"""The reference backends map guest memory themselves over the Xen mmap extension, on the
software Xen: FOREIGN regions and GRANT regions (rings in advance, the rest on demand), with the
region fd a connection to the simulator's privcmd.sock.

The guest side is the simulator's own (guest RAM, grant table, Linux-style grant DMA ops, split
virtqueues); the backend is the real subprocess; the front-end is the raw one in
tests/backends/frontend.py sending the Xen-mmap memory table the way xvf does.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import frontend as fe
from tests.backends import gpio, i2c
from tests.backends import protocol as p
from tests.backends.guest_memory import XEN_MMAP_FOREIGN, XEN_MMAP_GRANT, XEN_MMAP_NO_ADVANCE_MAP
from tests.unit.test_ref_backends import Backend
from xvf.errors import VhostUserError
from xvf.grant_layout import grant_regions, ring_spans
from xvf.sim.dma import DirectDma, GrantDma, dma_to_grant
from xvf.sim.grant_table import GTF_READING, GTF_WRITING
from xvf.sim.memory import XEN_PAGE_SIZE
from xvf.sim.virtqueue import SplitVirtqueue, ring_layout

UVA_BASE = 0x7F00_0000_0000  # foreign mode: front-end addresses differ from guest-physical ones
QUEUE_SIZE = 64
FEATURES = (
    p.bit(p.F_VERSION_1) | p.bit(p.F_PROTOCOL_FEATURES) | p.bit(p.F_INDIRECT_DESC) | 1
)  # bit 0: i2c ZERO_LENGTH_REQUEST / gpio IRQ
PROTOCOL = p.bit(p.PF_MQ) | p.bit(p.PF_REPLY_ACK) | p.bit(p.PF_CONFIG)
TIMEOUT = 5.0


class HostileGrantDma(GrantDma):
    """Grant DMA ops that record each mapping and can grant device-writable buffers read-only
    (a guest bug the backend must survive)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.maps: dict[int, int] = {}  # gpa -> dma address
        self.readonly_writes = False

    def map(self, gpa: int, length: int, device_writes: bool) -> int:
        dma = super().map(gpa, length, device_writes and not self.readonly_writes)
        self.maps[gpa] = dma
        return dma


class XenGuest:
    """A guest of the software Xen driving a backend whose memory table carries Xen mmap
    descriptions, the way xvf sends it on the simulator."""

    def __init__(self, hv, dom, backend: Backend, nqueues: int, mode: str, indirect=False) -> None:
        self.dom, self.mode = dom, mode
        self.dma = (
            HostileGrantDma(dom.ram, dom.grants, 0) if mode == "grant" else DirectDma(dom.ram)
        )
        self.fe = fe.Frontend(backend.sock)
        features, _ = self.fe.handshake(
            FEATURES & ~(0 if indirect else p.bit(p.F_INDIRECT_DESC)), PROTOCOL
        )
        self.queues = [
            SplitVirtqueue(
                dom.ram,
                self.dma,
                QUEUE_SIZE,
                index=i,
                indirect=bool(features & p.bit(p.F_INDIRECT_DESC)),
            )
            for i in range(nqueues)
        ]
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        self.calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        ctl = connect_control(hv)
        try:
            self.fe.set_mem_table_xen(self.regions(ctl.fileno()))
        finally:
            ctl.close()  # the backend's copy is the only one: its close ends the session
        for q in self.queues:
            self.fe.setup_ring(
                q.index,
                q.size,
                self.uva(q.desc_dma),
                self.uva(q.avail_dma),
                self.uva(q.used_dma),
                self.kicks[q.index],
                self.calls[q.index],
            )
        # i2c has no REPLY_ACK: a reply to a later request shows everything before it was taken.
        self.fe.get_u64(p.GET_FEATURES)

    def regions(self, fd: int) -> list[fe.XenRegion]:
        if self.mode == "grant":
            spans = [
                s
                for q in self.queues
                for s in ring_spans(q.desc_dma, q.avail_dma, q.used_dma, q.size)
            ]
            return [
                fe.XenRegion(r.gpa, r.size, r.uva, fd, r.xen_mmap_flags, r.domid)
                for r in grant_regions(spans, self.dom.ram.size, self.dom.domid, fd)
            ]
        bank = self.dom.ram.regions[0]
        return [
            fe.XenRegion(
                bank.gpa, bank.size, self.uva(bank.gpa), fd, XEN_MMAP_FOREIGN, self.dom.domid
            )
        ]

    def uva(self, addr: int) -> int:
        # Grant regions: userspace_addr == guest_phys_addr (the grant address).
        return addr if self.mode == "grant" else UVA_BASE + addr - self.dom.ram.regions[0].gpa

    def ring_refs(self) -> set[int]:
        if self.mode != "grant":
            return set()
        pages = ring_layout(QUEUE_SIZE)[2] // XEN_PAGE_SIZE + 1
        return {
            ref
            for q in self.queues
            for ref in range(dma_to_grant(q.desc_dma), dma_to_grant(q.desc_dma) + pages)
            if ref_mapped(self.dom, ref)
        }

    def kick(self, qi: int) -> None:
        os.eventfd_write(self.kicks[qi], 1)

    def wait_used(self, qi: int, count: int) -> list[tuple[object, int]]:
        q, done = self.queues[qi], []
        deadline = time.monotonic() + TIMEOUT
        while len(done) < count:
            done += q.get_used()
            if len(done) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.calls[qi]], [], [], left)[0]:
                raise TimeoutError(f"queue {qi}: {len(done)} of {count} requests came back")
            os.eventfd_read(self.calls[qi])
        return done

    def close(self) -> None:
        self.fe.close()
        for fd in self.kicks + self.calls:
            os.close(fd)

    def free_rings(self) -> None:
        for q in self.queues:
            q.close()


def connect_control(hv) -> socket.socket:
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    ctl.connect(hv.control_path)
    return ctl


def ref_mapped(dom, ref: int) -> bool:
    return bool(dom.grants.flags(ref) & (GTF_READING | GTF_WRITING))


def mapped_refs(dom) -> set[int]:
    return {ref for ref in range(dom.grants.nr_entries) if ref_mapped(dom, ref)}


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


@pytest.fixture
def dom(hypervisor):
    return hypervisor.create_domain("guest", memory_mib=8)


@pytest.fixture
def i2c_backend(tmp_path: Path) -> Iterator[Backend]:
    b = Backend("i2c", tmp_path / "i2c.sock0", "--require-xen-mmap")
    yield b
    b.stop()


@pytest.fixture
def gpio_backend(tmp_path: Path) -> Iterator[Backend]:
    b = Backend("gpio", tmp_path / "gpio.sock0", "--require-xen-mmap")
    yield b
    b.stop()


# ---- i2c ------------------------------------------------------------------------------------


def i2c_transfer(g: XenGuest, msgs: list[tuple[int, bool, bytes | int]]) -> list[tuple]:
    """One I2C transfer (one chain per message, one kick). Returns [(status, data, used len)]."""
    ram, q, made = g.dom.ram, g.queues[0], []
    for addr, read, data in msgs:
        hdr = ram.alloc(8)
        ram.write(hdr, i2c.OUT_HDR.pack(addr << 1, 0, i2c.FLAGS_M_RD if read else 0))
        status = ram.alloc(1)
        ram.write(status, b"\xee")
        n = data if read else len(data)
        buf = ram.alloc(n)
        if not read:
            ram.write(buf, data)
        if read:
            outs, ins = [(hdr, 8)], [(buf, n), (status, 1)]
        else:
            outs, ins = [(hdr, 8), (buf, n)], [(status, 1)]
        head = q.add(outs, ins, token=len(made))
        made.append((head, hdr, status, buf, n))
    g.kick(0)
    used = dict(g.wait_used(0, len(made)))
    out = []
    for i, (_head, hdr, status, buf, n) in enumerate(made):
        out.append((ram.read(status, 1)[0], ram.read(buf, n), used[i]))
        for gpa in (hdr, status, buf):
            ram.free(gpa)
    return out


@pytest.mark.parametrize("mode", ["foreign", "grant"])
@pytest.mark.parametrize("indirect", [False, True])
def test_i2c_eeprom_through_xen_regions(hypervisor, dom, i2c_backend, mode, indirect) -> None:
    g = XenGuest(hypervisor, dom, i2c_backend, 1, mode, indirect)
    try:
        ring_refs = g.ring_refs()
        assert bool(ring_refs) == (mode == "grant")  # rings mapped in advance, nothing else
        assert mapped_refs(dom) == ring_refs
        [(status, _, length)] = i2c_transfer(g, [(i2c.EEPROM_ADDR, False, b"\x10xen-mmap")])
        assert (status, length) == (i2c.MSG_OK, 1 + 9)
        [(st1, _, _), (st2, data, length)] = i2c_transfer(
            g, [(i2c.EEPROM_ADDR, False, b"\x10"), (i2c.EEPROM_ADDR, True, 8)]
        )
        assert (st1, st2, data, length) == (i2c.MSG_OK, i2c.MSG_OK, b"xen-mmap", 1 + 8)
        # Every buffer grant was unmapped before the guest saw its used entry.
        assert mapped_refs(dom) == ring_refs
        if mode == "grant":
            assert not g.dma.broken and g.dma.outstanding() == len(ring_refs)
        # An absent device: the error status travels back through the same mappings.
        [(status, _, length)] = i2c_transfer(g, [(0x11, True, 2)])
        assert (status, length) == (i2c.MSG_ERR, 1)
    finally:
        g.close()
    # The backend's control connection closes with the front-end: the ring grants go too.
    wait_for(lambda: not mapped_refs(dom), "ring grants still mapped after the disconnect")
    g.free_rings()
    if mode == "grant":
        assert not g.dma.broken


@pytest.mark.parametrize("hostile", ["revoked", "read-only"])
def test_bad_grants_fail_the_request_and_the_backend_keeps_serving(
    hypervisor, dom, i2c_backend, hostile
) -> None:
    g = XenGuest(hypervisor, dom, i2c_backend, 1, "grant")
    ram, q = dom.ram, g.queues[0]
    try:
        ring_refs = g.ring_refs()
        i2c_transfer(g, [(i2c.EEPROM_ADDR, False, b"\x20ok")])
        hdr, buf, status = ram.alloc(8), ram.alloc(4), ram.alloc(1)
        ram.write(hdr, i2c.OUT_HDR.pack(i2c.EEPROM_ADDR << 1, 0, i2c.FLAGS_M_RD))
        ram.write(buf, b"\xaa" * 4)
        ram.write(status, b"\xee")
        g.dma.readonly_writes = hostile == "read-only"
        q.add([(hdr, 8)], [(buf, 4), (status, 1)], token="bad")
        g.dma.readonly_writes = False
        if hostile == "revoked":  # the guest pulls the status grant before the device runs
            assert dom.grants.end_access(dma_to_grant(g.dma.maps[status]))
        g.kick(0)
        assert g.wait_used(0, 1) == [("bad", 0)]  # refused, untouched
        assert ram.read(buf, 4) == b"\xaa" * 4 and ram.read(status, 1) == b"\xee"
        assert mapped_refs(dom) == ring_refs  # the header grant it did map went back too
        assert not g.dma.broken
        # The same backend, same connection, serves the next request.
        [(st1, _, _), (st2, data, _)] = i2c_transfer(
            g, [(i2c.EEPROM_ADDR, False, b"\x20"), (i2c.EEPROM_ADDR, True, 2)]
        )
        assert (st1, st2, data) == (i2c.MSG_OK, i2c.MSG_OK, b"ok")
        assert mapped_refs(dom) == ring_refs and not g.dma.broken
    finally:
        g.close()
    assert i2c_backend.alive()


# ---- gpio -----------------------------------------------------------------------------------


def gpio_request(g: XenGuest, rtype: int, line: int, value: int = 0) -> tuple[int, int]:
    ram = g.dom.ram
    req, resp = ram.alloc(8), ram.alloc(2)
    ram.write(req, gpio.REQUEST.pack(rtype, line, value))
    g.queues[gpio.REQUEST_QUEUE].add([(req, 8)], [(resp, 2)], token=rtype)
    g.kick(gpio.REQUEST_QUEUE)
    [(_, length)] = g.wait_used(gpio.REQUEST_QUEUE, 1)
    status, data = ram.read(resp, 2)
    ram.free(req)
    ram.free(resp)
    assert length == 2
    return status, data


@pytest.mark.parametrize("mode", ["foreign", "grant"])
def test_gpio_requests_and_a_held_irq_buffer(hypervisor, dom, gpio_backend, mode) -> None:
    g = XenGuest(hypervisor, dom, gpio_backend, 2, mode)
    ram = dom.ram
    try:
        ring_refs = g.ring_refs()
        assert gpio_request(g, gpio.MSG_SET_VALUE, 3, 0) == (gpio.STATUS_OK, 0)
        assert gpio_request(g, gpio.MSG_IRQ_TYPE, 3, gpio.IRQ_TYPE_EDGE_RISING)[0] == 0
        assert gpio_request(g, gpio.MSG_GET_VALUE, 3) == (gpio.STATUS_OK, 0)
        assert mapped_refs(dom) == ring_refs
        # An eventq buffer waits in the backend until the line rises: its grants stay mapped,
        # the request read-only and the status writable.
        req, status = ram.alloc(2), ram.alloc(1)
        ram.write(req, gpio.IRQ_REQUEST.pack(3))
        ram.write(status, b"\xee")
        g.queues[gpio.EVENT_QUEUE].add([(req, 2)], [(status, 1)], token="irq")
        g.kick(gpio.EVENT_QUEUE)
        if mode == "grant":
            req_ref, status_ref = (dma_to_grant(g.dma.maps[a]) for a in (req, status))
            wait_for(lambda: ref_mapped(dom, status_ref), "irq buffer never mapped")
            assert dom.grants.flags(req_ref) & (GTF_READING | GTF_WRITING) == GTF_READING
            assert dom.grants.flags(status_ref) & GTF_WRITING
            assert mapped_refs(dom) == ring_refs | {req_ref, status_ref}
        assert gpio_request(g, gpio.MSG_SET_VALUE, 3, 1) == (gpio.STATUS_OK, 0)
        assert g.wait_used(gpio.EVENT_QUEUE, 1) == [("irq", 1)]
        assert ram.read(status, 1)[0] == gpio.IRQ_STATUS_VALID
        assert mapped_refs(dom) == ring_refs
        # Another held buffer, then the front-end goes away: everything is unmapped.
        g.queues[gpio.EVENT_QUEUE].add([(req, 2)], [(status, 1)], token="irq2")
        g.kick(gpio.EVENT_QUEUE)
        if mode == "grant":
            wait_for(lambda: len(mapped_refs(dom)) > len(ring_refs), "irq buffer never mapped")
    finally:
        g.close()
    wait_for(lambda: not mapped_refs(dom), "grants still mapped after the disconnect")
    g.free_rings()
    if mode == "grant":
        assert not g.dma.broken and g.dma.outstanding() == 0
    assert gpio_backend.alive()


# ---- refusals -------------------------------------------------------------------------------


def refused(g_backend: Backend, hv, dom, region) -> None:
    f = fe.Frontend(g_backend.sock)
    try:
        f.handshake(FEATURES, PROTOCOL)
        with pytest.raises(VhostUserError, match="NAKed"):
            f.set_mem_table_xen([region])
    finally:
        f.close()


def test_foreign_region_outside_one_ram_bank_is_refused(hypervisor, dom, gpio_backend) -> None:
    bank = dom.ram.regions[0]
    with connect_control(hypervisor) as ctl:
        region = fe.XenRegion(
            bank.gpa + bank.size - 0x1000,
            0x2000,
            UVA_BASE,
            ctl.fileno(),
            XEN_MMAP_FOREIGN,
            dom.domid,
        )
        refused(gpio_backend, hypervisor, dom, region)
    assert gpio_backend.alive()
    assert "not inside one RAM bank" in gpio_backend.stop()


@pytest.mark.parametrize(
    "flags", [XEN_MMAP_FOREIGN, XEN_MMAP_GRANT, XEN_MMAP_GRANT | XEN_MMAP_NO_ADVANCE_MAP]
)
def test_xen_region_whose_fd_is_not_a_software_xen_is_refused(
    hypervisor, dom, gpio_backend, flags
) -> None:
    gpa = dom.ram.regions[0].gpa if flags == XEN_MMAP_FOREIGN else 1 << 63
    memfd = os.memfd_create("not-xen", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 1 << 20)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.close()  # a seqpacket socket, but nobody answers
    try:
        refused(
            gpio_backend, hypervisor, dom, fe.XenRegion(gpa, 1 << 20, gpa, memfd, flags, dom.domid)
        )
        refused(
            gpio_backend,
            hypervisor,
            dom,
            fe.XenRegion(gpa, 1 << 20, gpa, a.fileno(), flags, dom.domid),
        )
        # Still serving: a good table on the next connection works.
        g = XenGuest(hypervisor, dom, gpio_backend, 2, "foreign")
        try:
            assert gpio_request(g, gpio.MSG_SET_VALUE, 1, 1) == (gpio.STATUS_OK, 0)
        finally:
            g.close()
        g.free_rings()
    finally:
        os.close(memfd)
        a.close()
    log = gpio_backend.stop()
    assert "not a connection to a software Xen" in log
    assert "did not answer" in log


def test_rings_in_an_on_demand_region_are_refused(hypervisor, dom, gpio_backend) -> None:
    with connect_control(hypervisor) as ctl:
        f = fe.Frontend(gpio_backend.sock)
        try:
            f.handshake(FEATURES, PROTOCOL)
            gpa, flags = 1 << 63, XEN_MMAP_GRANT | XEN_MMAP_NO_ADVANCE_MAP
            f.set_mem_table_xen([fe.XenRegion(gpa, 1 << 20, gpa, ctl.fileno(), flags, dom.domid)])
            kick, call = os.eventfd(0), os.eventfd(0)
            try:
                with pytest.raises(VhostUserError, match="NAKed"):
                    f.setup_ring(0, QUEUE_SIZE, gpa, gpa + 0x1000, gpa + 0x2000, kick, call)
            finally:
                os.close(kick)
                os.close(call)
        finally:
            f.close()
    assert "mapped only on demand" in gpio_backend.stop()
    assert not mapped_refs(dom)
