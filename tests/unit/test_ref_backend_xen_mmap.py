"""The reference backends map guest memory themselves over the Xen mmap extension, on the
software Xen: FOREIGN regions and GRANT regions (rings in advance, the rest on demand), with the
region fd a connection to the simulator's privcmd.sock.

The guest side is the simulator's own (guest RAM, grant table, Linux-style grant DMA ops, split
virtqueues); the backend is the real subprocess; the front-end is the raw one in
tests/backends/frontend.py sending the Xen-mmap memory table the way xvf does.
"""

from __future__ import annotations

import array
import ctypes
import errno
import logging
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import frontend as fe
from tests.backends import gpio, i2c, pages
from tests.backends import guest_memory as gm
from tests.backends import protocol as p
from tests.backends import xen_devices as xd
from tests.backends.guest_memory import XEN_MMAP_FOREIGN, XEN_MMAP_GRANT, XEN_MMAP_NO_ADVANCE_MAP
from tests.unit.test_ref_backends import Backend
from xvf.errors import VhostUserError
from xvf.platform.sim.dma import DirectDma, GrantDma, dma_to_grant
from xvf.platform.sim.grant_table import GTF_READING, GTF_WRITING
from xvf.platform.sim.virtqueue import SplitVirtqueue
from xvf.protocols.grant_layout import grant_regions, ring_spans
from xvf.protocols.virtqueue import GRANT_DMA_ADDR_OFF, PAGE_SHIFT, PAGE_SIZE, ring_layout

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
        pages = ring_layout(QUEUE_SIZE)[2] // PAGE_SIZE + 1
        return {
            ref
            for q in self.queues
            for ref in range(dma_to_grant(q.desc_dma), dma_to_grant(q.desc_dma) + pages)
            if ref_mapped(self.dom, ref)
        }

    def kick(self, qi: int) -> None:
        os.eventfd_write(self.kicks[qi], 1)

    def kick_and_wait_taken(self, qi: int) -> None:
        """Kick, then wait until the backend has read the kick. It is single-threaded and
        processes the queue right after, so a later kick of another queue is handled after
        this one (epoll alone does not promise that order)."""
        self.kick(qi)
        wait_for(lambda: not select.select([self.kicks[qi]], [], [], 0)[0], "kick never taken")

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
        g.kick_and_wait_taken(gpio.EVENT_QUEUE)  # held before the line rises, not after
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
    gpa = dom.ram.regions[0].gpa if flags == XEN_MMAP_FOREIGN else GRANT_DMA_ADDR_OFF
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
            gpa, flags = GRANT_DMA_ADDR_OFF, XEN_MMAP_GRANT | XEN_MMAP_NO_ADVANCE_MAP
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


# ---- real Xen: privcmd / gntdev ABI against Debian's headers --------------------------------

LAYOUT_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/types.h>
#include <linux/ioctl.h>
#include <xen/xen.h>
#include <xen/grant_table.h> /* grant_ref_t, which gntdev.h uses without including */
#include <xen/privcmd.h>
#include <xen/gntdev.h>

#define NUM(x) printf(#x " %lx\n", (unsigned long)(x))
#define OFF(s, f) printf("offsetof(" #s "." #f ") %lx\n", (unsigned long)offsetof(struct s, f))

static void hex(const char *name, const void *p, size_t n)
{
    const unsigned char *b = p;
    printf("%s ", name);
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
    printf("\n");
}

int main(void)
{
    NUM(sizeof(struct privcmd_mmapbatch_v2));
    OFF(privcmd_mmapbatch_v2, num);
    OFF(privcmd_mmapbatch_v2, dom);
    OFF(privcmd_mmapbatch_v2, addr);
    OFF(privcmd_mmapbatch_v2, arr);
    OFF(privcmd_mmapbatch_v2, err);
    NUM(sizeof(xen_pfn_t));
    NUM(sizeof(int));
    NUM(IOCTL_PRIVCMD_MMAPBATCH_V2);
    NUM(sizeof(struct privcmd_dm_op));
    OFF(privcmd_dm_op, dom);
    OFF(privcmd_dm_op, num);
    OFF(privcmd_dm_op, ubufs);
    NUM(IOCTL_PRIVCMD_DM_OP);
    NUM(DOMID_INVALID);
    NUM(sizeof(struct ioctl_gntdev_grant_ref));
    OFF(ioctl_gntdev_grant_ref, domid);
    OFF(ioctl_gntdev_grant_ref, ref);
    NUM(sizeof(struct ioctl_gntdev_map_grant_ref));
    OFF(ioctl_gntdev_map_grant_ref, count);
    OFF(ioctl_gntdev_map_grant_ref, pad);
    OFF(ioctl_gntdev_map_grant_ref, index);
    OFF(ioctl_gntdev_map_grant_ref, refs);
    NUM(IOCTL_GNTDEV_MAP_GRANT_REF);
    NUM(sizeof(struct ioctl_gntdev_unmap_grant_ref));
    OFF(ioctl_gntdev_unmap_grant_ref, index);
    OFF(ioctl_gntdev_unmap_grant_ref, count);
    OFF(ioctl_gntdev_unmap_grant_ref, pad);
    NUM(IOCTL_GNTDEV_UNMAP_GRANT_REF);

    struct privcmd_mmapbatch_v2 b;
    memset(&b, 0, sizeof(b));
    b.num = 0x11223344;
    b.dom = 0x5566;
    b.addr = 0x0102030405060708ULL;
    b.arr = (const xen_pfn_t *)0x1112131415161718ULL;
    b.err = (int *)0x2122232425262728ULL;
    hex("mmapbatch_v2", &b, sizeof(b));

    /* two refs: the header's refs[1] plus one more */
    size_t n = sizeof(struct ioctl_gntdev_map_grant_ref) + sizeof(struct ioctl_gntdev_grant_ref);
    struct ioctl_gntdev_map_grant_ref *m = calloc(1, n);
    m->count = 2;
    m->index = 0xa1a2a3a4a5a6a7a8ULL;
    m->refs[0].domid = 7;
    m->refs[0].ref = 0x100;
    ((struct ioctl_gntdev_grant_ref *)&m->refs[1])->domid = 7;
    ((struct ioctl_gntdev_grant_ref *)&m->refs[1])->ref = 0x101;
    hex("map_grant_ref", m, n);
    free(m);

    struct ioctl_gntdev_unmap_grant_ref u;
    memset(&u, 0, sizeof(u));
    u.index = 0xb1b2b3b4b5b6b7b8ULL;
    u.count = 0x12345678;
    hex("unmap_grant_ref", &u, sizeof(u));
    return 0;
}
"""


# (compiler, how to run its output, where its Linux uapi headers are)
TARGETS = {
    "native": ("gcc", [], Path("/usr/include")),
    # the rig's Dom0 is arm64: the cross headers (linux-libc-dev-arm64-cross), run under qemu-user
    "aarch64": (
        "aarch64-linux-gnu-gcc",
        ["qemu-aarch64-static"],
        Path("/usr/aarch64-linux-gnu/include"),
    ),
}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def c_layout(request, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> value printed by a C program built against Debian's xen/{privcmd,gntdev}.h."""
    cc_name, runner, inc = TARGETS[request.param]
    cc = shutil.which(cc_name)
    if cc is None or (runner and shutil.which(runner[0]) is None):
        pytest.skip(f"no {cc_name} {' '.join(runner)} on PATH")
    for h in (inc / "xen/privcmd.h", inc / "xen/gntdev.h", Path("/usr/include/xen/xen.h")):
        if not h.exists():
            pytest.skip(
                f"{h} is absent: apt-get install linux-libc-dev libxen-dev (or -arm64-cross)"
            )
    tmp = tmp_path_factory.mktemp(f"xen_devices_{request.param}")
    shim = tmp / "shim" / "xen"
    (shim / "interface").mkdir(parents=True)
    # Xen's own headers (libxen-dev) pick the architecture from the compiler's defines.
    xen_h = '#include "/usr/include/xen/xen.h"\n'
    (shim / "interface" / "xen.h").write_text(xen_h)  # what Linux's privcmd.h includes
    (shim / "xen.h").write_text(xen_h)
    (shim / "grant_table.h").write_text('#include "/usr/include/xen/grant_table.h"\n')
    (tmp / "layout.c").write_text(LAYOUT_C)
    exe = tmp / "layout"
    build = subprocess.run(
        [
            cc,
            *(["-static"] if runner else []),  # qemu-user then needs no arm64 sysroot
            "-Wall",
            "-Werror",
            "-I",
            str(tmp / "shim"),
            str(tmp / "layout.c"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    out = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())


def test_privcmd_layout_matches_the_header(c_layout: dict[str, str]) -> None:
    n = {k: int(v, 16) for k, v in c_layout.items() if not k.startswith(("mmap", "map", "unmap"))}
    assert n["sizeof(struct privcmd_mmapbatch_v2)"] == xd.MMAPBATCH_V2.size == 32
    fields = ("num", "dom", "addr", "arr", "err")
    offs = [n[f"offsetof(privcmd_mmapbatch_v2.{f})"] for f in fields]
    assert offs == [0, 4, 8, 16, 24]
    # the gfn and error arrays are array.array("Q") and ("i")
    assert n["sizeof(xen_pfn_t)"] == array.array("Q").itemsize == 8
    assert n["sizeof(int)"] == array.array("i").itemsize == 4
    assert n["IOCTL_PRIVCMD_MMAPBATCH_V2"] == xd.IOCTL_PRIVCMD_MMAPBATCH_V2 == 0x205004
    assert n["sizeof(struct privcmd_dm_op)"] == xd.PRIVCMD_DM_OP.size == 16
    assert [n[f"offsetof(privcmd_dm_op.{f})"] for f in ("dom", "num", "ubufs")] == [0, 2, 8]
    assert n["IOCTL_PRIVCMD_DM_OP"] == xd.IOCTL_PRIVCMD_DM_OP == 0x105005
    assert n["DOMID_INVALID"] == xd.DOMID_INVALID
    packed = xd.pack_mmapbatch_v2(
        0x11223344, 0x5566, 0x0102030405060708, 0x1112131415161718, 0x2122232425262728
    )
    assert packed.hex() == c_layout["mmapbatch_v2"]


def test_gntdev_layout_matches_the_header(c_layout: dict[str, str]) -> None:
    n = {k: int(v, 16) for k, v in c_layout.items() if not k.startswith(("mmap", "map", "unmap"))}
    assert n["sizeof(struct ioctl_gntdev_grant_ref)"] == xd.GRANT_REF.size == 8
    assert [n[f"offsetof(ioctl_gntdev_grant_ref.{f})"] for f in ("domid", "ref")] == [0, 4]
    # sizeof includes the declared refs[1]; the refs start right after the 16-byte header
    assert n["sizeof(struct ioctl_gntdev_map_grant_ref)"] == xd.MAP_GRANT_REF.size + 8 == 24
    offs = [
        n[f"offsetof(ioctl_gntdev_map_grant_ref.{f})"] for f in ("count", "pad", "index", "refs")
    ]
    assert offs == [0, 4, 8, xd.MAP_GRANT_REF.size]
    assert n["IOCTL_GNTDEV_MAP_GRANT_REF"] == xd.IOCTL_GNTDEV_MAP_GRANT_REF == 0x184700
    assert n["sizeof(struct ioctl_gntdev_unmap_grant_ref)"] == xd.UNMAP_GRANT_REF.size == 16
    offs = [n[f"offsetof(ioctl_gntdev_unmap_grant_ref.{f})"] for f in ("index", "count", "pad")]
    assert offs == [0, 8, 12]
    assert n["IOCTL_GNTDEV_UNMAP_GRANT_REF"] == xd.IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x104701
    packed = xd.pack_map_grant_ref(7, 0x100, 2, index=0xA1A2A3A4A5A6A7A8)
    assert packed.hex() == c_layout["map_grant_ref"]
    assert (
        xd.pack_unmap_grant_ref(0xB1B2B3B4B5B6B7B8, 0x12345678).hex() == c_layout["unmap_grant_ref"]
    )


# ---- real Xen: what a region's fd is ----------------------------------------------------------


@pytest.fixture
def no_xen_nodes(monkeypatch, tmp_path: Path) -> None:
    """As on this host (and on a Xen host, deterministically): no /dev/xen nodes to compare."""
    monkeypatch.setattr(
        xd, "NODES", {xd.PRIVCMD: str(tmp_path / "privcmd"), xd.GNTDEV: str(tmp_path / "gntdev")}
    )


def test_a_socket_is_the_software_xen() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        assert gm.xen_backend_of(a.fileno(), "region") == gm.SOFTWARE_XEN
    finally:
        a.close()
        b.close()


def test_dev_null_is_refused_not_mapped(no_xen_nodes) -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        assert xd.identify(fd) is None  # both probes say ENOTTY
        msg = "character device 1:3, neither /dev/xen/privcmd nor /dev/xen/gntdev"
        with pytest.raises(VhostUserError, match=msg):
            gm.xen_backend_of(fd, "region")
        for kind, gpa in ((gm.MAP_FOREIGN, 0x40000000), (gm.MAP_GRANT, GRANT_DMA_ADDR_OFF)):
            with pytest.raises(VhostUserError, match=msg):
                gm.map_xen_region(kind, fd, gpa, 0x1000, gpa, 0, 1)
    finally:
        os.close(fd)


def test_files_and_pipes_are_refused() -> None:
    memfd = os.memfd_create("not-xen", os.MFD_CLOEXEC)
    r, w = os.pipe()
    try:
        with pytest.raises(VhostUserError, match="a regular file: not a connection to a software"):
            gm.xen_backend_of(memfd, "region")
        with pytest.raises(VhostUserError, match="a pipe: not a connection"):
            gm.xen_backend_of(r, "region")
    finally:
        for fd in (memfd, r, w):
            os.close(fd)


def test_device_nodes_decide_by_st_rdev(monkeypatch) -> None:
    def no_probe(*args) -> None:
        raise AssertionError("a device whose node exists must not be probed")

    monkeypatch.setattr(xd, "ioctl", no_probe)
    monkeypatch.setattr(xd, "NODES", {xd.PRIVCMD: "/dev/zero", xd.GNTDEV: "/dev/null"})
    null, zero = os.open("/dev/null", os.O_RDWR), os.open("/dev/zero", os.O_RDWR)
    try:
        assert xd.identify(null) == xd.GNTDEV
        assert xd.identify(zero) == xd.PRIVCMD
        with pytest.raises(VhostUserError, match="is /dev/null, this region needs /dev/zero"):
            gm.map_xen_region(gm.MAP_FOREIGN, null, 0x40000000, 0x1000, 0, 0, 1)
        tty = os.open("/dev/full", os.O_RDWR)
        try:
            assert xd.identify(tty) is None
        finally:
            os.close(tty)
    finally:
        os.close(null)
        os.close(zero)


@pytest.mark.parametrize(
    "answers, kind",
    [
        ({xd.IOCTL_PRIVCMD_DM_OP: 0}, xd.PRIVCMD),
        ({xd.IOCTL_PRIVCMD_DM_OP: errno.EPERM}, xd.PRIVCMD),  # restricted to another domain
        ({xd.IOCTL_GNTDEV_UNMAP_GRANT_REF: errno.ENOENT}, xd.GNTDEV),
        ({xd.IOCTL_GNTDEV_UNMAP_GRANT_REF: 0}, None),
        ({}, None),
    ],
)
def test_without_device_nodes_a_harmless_ioctl_asks(monkeypatch, no_xen_nodes, answers, kind):
    asked = []

    def fake_ioctl(fd: int, request: int, arg: bytearray) -> None:
        asked.append((request, bytes(arg)))
        err = answers.get(request, errno.ENOTTY)
        if err:
            raise OSError(err, os.strerror(err))

    monkeypatch.setattr(xd, "ioctl", fake_ioctl)
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        assert xd.identify(fd) == kind
    finally:
        os.close(fd)
    probes = dict(asked)
    # a dm_op with no buffers, and an unmap of an index gntdev never hands out
    assert probes[xd.IOCTL_PRIVCMD_DM_OP] == xd.PRIVCMD_DM_OP.pack(xd.DOMID_INVALID, 0, 0)
    if xd.IOCTL_GNTDEV_UNMAP_GRANT_REF in probes:
        index, count, _ = xd.UNMAP_GRANT_REF.unpack(probes[xd.IOCTL_GNTDEV_UNMAP_GRANT_REF])
        assert index >= 1 << 62 and count == 1


def test_the_backend_refuses_a_character_device_that_is_no_xen_device(gpio_backend) -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        for flags, gpa in ((XEN_MMAP_FOREIGN, 0x40000000), (XEN_MMAP_GRANT, GRANT_DMA_ADDR_OFF)):
            refused(gpio_backend, None, None, fe.XenRegion(gpa, 1 << 20, gpa, fd, flags, 1))
    finally:
        os.close(fd)
    assert gpio_backend.alive()
    log = gpio_backend.stop()
    assert log.count("neither /dev/xen/privcmd nor /dev/xen/gntdev") == 2


# ---- real Xen: the mapping paths, against a stand-in for the kernel -------------------------


def maps_of(fd: int) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of this process's mappings of the file `fd` is open on."""
    ino = os.fstat(fd).st_ino
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[4] == str(ino) and "memfd:" in line:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, int(parts[2], 16)))
    return out


class FakePrivcmd:
    """privcmd's kernel side for MMAPBATCH_V2: the guest's frames are pages of a RAM memfd
    (gfn `base` first); the ioctl puts them over the caller's privcmd mapping with MAP_FIXED.
    The "privcmd" fd itself is another (zero) memfd, so only what the ioctl maps shows."""

    def __init__(self, base_gfn: int, frames: int, domid: int) -> None:
        self.base, self.frames, self.domid = base_gfn, frames, domid
        self.ram = os.memfd_create("fake-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram, frames * pages.PAGE)
        self.fd = os.memfd_create("fake-privcmd", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 4 * frames * pages.PAGE)
        self.calls: list[tuple[int, int, int]] = []
        self.frame_error: dict[int, int] = {}  # gfn -> errno put in the err array
        self.ioctl_error = 0

    def ioctl(self, fd: int, request: int, arg: bytearray) -> None:
        assert request == xd.IOCTL_PRIVCMD_MMAPBATCH_V2
        assert os.fstat(fd).st_ino == os.fstat(self.fd).st_ino
        num, dom, addr, arr, err = xd.MMAPBATCH_V2.unpack(arg)
        self.calls.append((num, dom, addr))
        # the kernel insists on the whole VMA in the first call
        assert (addr, addr + num * pages.PAGE, 0) in maps_of(self.fd)
        gfns = (ctypes.c_uint64 * num).from_address(arr)
        errs = (ctypes.c_int * num).from_address(err)
        for i, gfn in enumerate(gfns):
            if gfn in self.frame_error or not self.base <= gfn < self.base + self.frames:
                errs[i] = -self.frame_error.get(gfn, errno.EINVAL)
                continue
            at = addr + i * pages.PAGE
            got = pages._libc.mmap(
                at,
                pages.PAGE,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_SHARED | pages.MAP_FIXED,
                self.ram,
                (gfn - self.base) * pages.PAGE,
            )
            assert got == at
        if self.ioctl_error:
            raise OSError(self.ioctl_error, os.strerror(self.ioctl_error))

    def close(self) -> None:
        os.close(self.ram)
        os.close(self.fd)


class FakeGntdev:
    """gntdev's kernel side: grant ref r of the domain is page r of a memfd that the "gntdev"
    fd is open on, so MAP_GRANT_REF hands out index = first ref * PAGE. UNMAP_GRANT_REF checks
    that the caller unmapped the pages first."""

    def __init__(self, refs: int, domid: int) -> None:
        self.domid = domid
        self.fd = os.memfd_create("fake-gntdev", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, refs * pages.PAGE)
        self.maps: dict[int, list[int]] = {}  # index -> refs
        self.log: list[tuple[str, int, int]] = []
        self.map_error = 0
        self.bad_index = False

    def ioctl(self, fd: int, request: int, arg: bytearray) -> None:
        assert os.fstat(fd).st_ino == os.fstat(self.fd).st_ino
        if request == xd.IOCTL_GNTDEV_MAP_GRANT_REF:
            count, pad, _ = xd.MAP_GRANT_REF.unpack_from(arg)
            assert pad == 0 and len(arg) == xd.MAP_GRANT_REF.size + count * xd.GRANT_REF.size
            grefs = [xd.GRANT_REF.unpack_from(arg, 16 + 8 * i) for i in range(count)]
            assert {d for d, _ in grefs} == {self.domid}
            refs = [r for _, r in grefs]
            assert refs == list(range(refs[0], refs[0] + count))
            if self.map_error:
                raise OSError(self.map_error, os.strerror(self.map_error))
            index = refs[0] * pages.PAGE + (1 if self.bad_index else 0)
            self.maps[index] = refs
            self.log.append(("map", index, count))
            struct.pack_into("=Q", arg, 8, index)
        elif request == xd.IOCTL_GNTDEV_UNMAP_GRANT_REF:
            index, count, _ = xd.UNMAP_GRANT_REF.unpack(arg)
            if len(self.maps.get(index, ())) != count:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            assert not [m for m in maps_of(self.fd) if m[2] == index], "unmap ioctl before munmap"
            del self.maps[index]
            self.log.append(("unmap", index, count))
        else:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def page(self, ref: int) -> bytes:
        return os.pread(self.fd, pages.PAGE, ref * pages.PAGE)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def fake_privcmd(monkeypatch) -> Iterator[FakePrivcmd]:
    dev = FakePrivcmd(0x40000, 64, domid=5)
    monkeypatch.setattr(xd, "ioctl", dev.ioctl)
    monkeypatch.setattr(gm, "xen_backend_of", lambda fd, what: xd.PRIVCMD)
    yield dev
    dev.close()


@pytest.fixture
def fake_gntdev(monkeypatch) -> Iterator[FakeGntdev]:
    dev = FakeGntdev(64, domid=7)
    monkeypatch.setattr(xd, "ioctl", dev.ioctl)
    monkeypatch.setattr(gm, "xen_backend_of", lambda fd, what: xd.GNTDEV)
    yield dev
    dev.close()


def test_foreign_region_through_privcmd(fake_privcmd: FakePrivcmd, caplog) -> None:
    dev = fake_privcmd
    os.pwrite(dev.ram, b"frame 3", 3 * pages.PAGE)
    gpa, size = 0x40000000 + 0x800, 0x3000  # not page aligned: frames 0..3
    with caplog.at_level(logging.INFO, logger=gm.__name__):
        region = gm.map_xen_region(gm.MAP_FOREIGN, dev.fd, gpa, size, UVA_BASE, 0, dev.domid)
    assert dev.calls == [(4, dev.domid, dev.calls[0][2])]  # one call for the whole mapping
    mem = gm.GuestMemory([region])
    assert mem.read(0x40003000, 7) == b"frame 3"
    mem.write(0x40001000, b"from the backend")
    assert os.pread(dev.ram, 16, pages.PAGE) == b"from the backend"
    assert mem.uva_to_gpa(UVA_BASE + 0x10, 4) == gpa + 0x10
    with pytest.raises(gm.GuestMemoryError, match="runs past"):
        mem.slice(gpa + size - 2, 4)
    assert "foreign region via privcmd: gpa 0x40000800..0x400037ff (gfn 0x40000..0x40003)" in (
        caplog.text
    )
    mem.close()
    assert not maps_of(dev.fd) and not maps_of(dev.ram)


def test_foreign_frames_that_fail_refuse_the_region(fake_privcmd: FakePrivcmd) -> None:
    dev = fake_privcmd
    dev.frame_error = {0x40002: errno.EFAULT, 0x40005: errno.EFAULT}
    # the ioctl itself succeeds: only the err array tells (such frames would SIGBUS)
    with pytest.raises(gm.GuestMemoryError) as e:
        gm.map_xen_region(gm.MAP_FOREIGN, dev.fd, 0x40000000, 0x8000, 0, 0, dev.domid)
    assert e.value.errno == errno.EFAULT
    assert "2 frames failed, the first gfn 0x40002" in str(e.value)
    assert "foreign region 0x40000000+0x8000 of domain 5" in str(e.value)
    dev.frame_error, dev.ioctl_error = {0x40001: errno.ENOENT}, errno.ENOENT  # paged out
    with pytest.raises(gm.GuestMemoryError, match=r"first gfn 0x40001 \(ioctl: ENOENT\)"):
        gm.map_xen_region(gm.MAP_FOREIGN, dev.fd, 0x40000000, 0x8000, 0, 0, dev.domid)
    dev.frame_error, dev.ioctl_error = {}, errno.EINVAL
    with pytest.raises(gm.GuestMemoryError, match=r"MMAPBATCH_V2 of 8 frames.*Invalid argument"):
        gm.map_xen_region(gm.MAP_FOREIGN, dev.fd, 0x40000000, 0x8000, 0, 0, dev.domid)
    assert not maps_of(dev.fd) and not maps_of(dev.ram)  # nothing left mapped


def test_grant_region_through_gntdev(fake_gntdev: FakeGntdev, caplog) -> None:
    dev = fake_gntdev
    addr = GRANT_DMA_ADDR_OFF | 3 << PAGE_SHIFT | 0x10
    with caplog.at_level(logging.INFO, logger=gm.__name__):
        region = gm.map_xen_region(gm.MAP_GRANT, dev.fd, addr, 0x2000, addr, 0, dev.domid)
    assert dev.log == [("map", 3 * pages.PAGE, 3)]  # refs 3, 4, 5
    assert "grant region via gntdev: grant refs 3..5 (from offset 0x10 in the first)" in caplog.text
    mem = gm.GuestMemory([region])
    mem.write(addr + 0x1000, b"ring")
    assert dev.page(4)[0x10:0x14] == b"ring"
    assert mem.uva_to_gpa(addr, 16) == addr
    mem.close()
    assert dev.log[-1] == ("unmap", 3 * pages.PAGE, 3) and not dev.maps
    assert not maps_of(dev.fd)


def test_on_demand_grants_through_gntdev(fake_gntdev: FakeGntdev) -> None:
    dev = fake_gntdev
    base = GRANT_DMA_ADDR_OFF
    region = gm.map_xen_region(
        gm.MAP_GRANT_ON_DEMAND, dev.fd, base, 64 * pages.PAGE, base, 0, dev.domid
    )
    assert not dev.log  # nothing mapped up front
    mem = gm.GuestMemory([region])
    os.pwrite(dev.fd, b"request", 9 * pages.PAGE + 0xFFC)
    held: list[gm.HeldBuffer] = []
    out = mem.buffer(base | 9 << PAGE_SHIFT | 0xFFC, 7, False, held)  # spans refs 9 and 10
    assert bytes(out) == b"request" and out.readonly
    inp = mem.buffer(base | 12 << PAGE_SHIFT, 5, True, held)
    inp[:] = b"reply"
    assert sorted(dev.maps) == [9 * pages.PAGE, 12 * pages.PAGE]
    assert dev.page(12)[:5] == b"\0" * 5  # the device works on a copy until completion
    for hb in held:
        hb.release()
    assert dev.page(12)[:5] == b"reply" and not dev.maps and not maps_of(dev.fd)
    # an indirect table (read): mapped and unmapped at once
    assert mem.read(base | 9 << PAGE_SHIFT | 0xFFC, 7) == b"request" and not dev.maps
    with pytest.raises(gm.GuestMemoryError, match="mapped only on demand"):
        mem.slice(base, 16)
    mem.close()


def test_on_demand_failures_refuse_the_buffer_and_leak_nothing(fake_gntdev: FakeGntdev) -> None:
    dev = fake_gntdev
    base = GRANT_DMA_ADDR_OFF
    region = gm.map_xen_region(gm.MAP_GRANT_ON_DEMAND, dev.fd, base, 0x10000, base, 0, 7)
    mem, held = gm.GuestMemory([region]), []
    dev.map_error = errno.EINVAL
    with pytest.raises(gm.GuestMemoryError) as e:
        mem.buffer(base | 5 << PAGE_SHIFT, 8, True, held)
    assert e.value.errno == errno.EINVAL
    assert "grant refs 5..5 of domain 7 (writable): IOCTL_GNTDEV_MAP_GRANT_REF" in str(e.value)
    dev.map_error, dev.bad_index = 0, True  # the mmap at the index fails: the refs go again
    with pytest.raises(gm.GuestMemoryError, match="writable mmap of 1 grants at gntdev index"):
        mem.buffer(base | 5 << PAGE_SHIFT, 8, True, held)
    assert not held and not dev.maps and dev.log == [("map", 0x5001, 1), ("unmap", 0x5001, 1)]
    mem.close()


def test_gntdev_fd_stays_open_while_a_buffer_is_held(fake_gntdev: FakeGntdev) -> None:
    dev = fake_gntdev
    base = GRANT_DMA_ADDR_OFF
    region = gm.map_xen_region(gm.MAP_GRANT_ON_DEMAND, dev.fd, base, 0x10000, base, 0, 7)
    assert isinstance(region, gm.OnDemandGrantRegion)
    mapper = region.mapper
    held: list[gm.HeldBuffer] = []
    gm.GuestMemory([region]).buffer(base | 2 << PAGE_SHIFT, 4, True, held)[:] = b"late"
    region.close()  # the table goes first (a gpio irq buffer still held)
    assert mapper.fd is not None and os.fstat(mapper.fd).st_ino == os.fstat(dev.fd).st_ino
    held[0].release()
    assert mapper.fd is None and not dev.maps and dev.page(2)[:4] == b"late"
