"""The shadow-virtqueue relay between a grant-mode guest and a backend without grant mapping.

The guest side is the simulator's real driver stack (GuestRam, GrantTable,
GrantDma, SplitVirtqueue) and the relay maps the rings and copies the data through
the software Xen's real gntdev equivalent (grant copy). The backend side is a small
consumer reading the shadow ring straight out of ShadowMemory, as a vhost-user
backend would after SET_MEM_TABLE (the e2e test runs the relay against qemu-storage-daemon).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from xvf.errors import GrantError
from xvf.guest.service_thread import ServiceThread
from xvf.hotpath import _layout as L
from xvf.hotpath._ioreq import MmioState
from xvf.platform.sim.dma import GrantDma, dma_to_grant, grant_to_dma
from xvf.platform.sim.grant_table import GTF_READING, GTF_WRITING
from xvf.platform.sim.platform import SimPlatform
from xvf.platform.sim.virtqueue import SplitVirtqueue
from xvf.protocols.grant_relay import (
    GUEST_FEATURE_MASK,
    GrantRelayQueue,
    ShadowMemory,
    relay_guest_features,
)
from xvf.protocols.virtqueue import (
    AVAIL_IDX_H,
    AVAIL_RING_H,
    DESC,
    DESC_SIZE,
    GRANT_DMA_ADDR_OFF,
    PAGE_SHIFT,
    PAGE_SIZE,
    USED_ELEM_I,
    USED_ID_I,
    USED_IDX_H,
    USED_LEN_I,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    avail_bytes,
    desc_bytes,
    used_bytes,
    used_elems_bytes,
)

QSIZE = 8


@dataclass
class Taken:
    head: int
    readable: bytes
    writable: list[tuple[int, int]]  # (shadow gpa, length)


class ShadowBackend:
    """The device side of the shadow ring: what a vhost-user backend does with it."""

    def __init__(self, relay: GrantRelayQueue) -> None:
        n = relay.num
        self.mem = relay.shadow.mem
        self.n = n
        self.desc = relay.shadow_desc
        self.avail = self.mem[relay.shadow_avail : relay.shadow_avail + avail_bytes(n)].cast("H")
        used = self.mem[relay.shadow_used : relay.shadow_used + used_bytes(n)]
        self.used_h = used.cast("H")
        self.used_i = used[: used_elems_bytes(n)].cast("I")
        used.release()
        self.last_avail = 0
        self.used_idx = 0

    def take(self) -> list[Taken]:
        out = []
        while self.last_avail != self.avail[AVAIL_IDX_H]:
            head = self.avail[AVAIL_RING_H + self.last_avail % self.n]
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            readable = bytearray()
            writable = []
            i = head
            while True:
                addr, length, flags, nxt = DESC.unpack_from(self.mem, self.desc + DESC_SIZE * i)
                assert addr + length <= len(self.mem)  # shadow gpas only
                if flags & VRING_DESC_F_WRITE:
                    writable.append((addr, length))
                else:
                    readable += self.mem[addr : addr + length]
                if not flags & VRING_DESC_F_NEXT:
                    break
                i = nxt
            out.append(Taken(head, bytes(readable), writable))
        return out

    def complete(self, t: Taken) -> None:
        """Echo the readable bytes XOR 0x5A into the writable segments."""
        reply = bytes(b ^ 0x5A for b in t.readable)
        written = 0
        for addr, length in t.writable:
            chunk = reply[written : written + length]
            self.mem[addr : addr + len(chunk)] = chunk
            written += len(chunk)
        elem = USED_ELEM_I * (self.used_idx % self.n)
        self.used_i[USED_ID_I + elem] = t.head
        self.used_i[USED_LEN_I + elem] = written
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.used_h[USED_IDX_H] = self.used_idx

    def close(self) -> None:
        for v in (self.avail, self.used_h, self.used_i):
            v.release()


class Env:
    def __init__(
        self, hv, indirect: bool = False, shadow_size: int = 1 << 20, event_idx: bool = False
    ) -> None:
        self.dom = hv.create_domain("t", memory_mib=16, vcpus=1)
        self.platform = SimPlatform(hv.run_dir)
        self.mapper = self.platform.open_grant_mapper(self.dom.domid)
        self.dma = GrantDma(self.dom.ram, self.dom.grants)
        self.vq = SplitVirtqueue(
            self.dom.ram, self.dma, QSIZE, indirect=indirect, event_idx=event_idx
        )
        self.shadow = ShadowMemory(shadow_size)
        self.state = MmioState()
        self.backend_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.relay = GrantRelayQueue(
            0,
            QSIZE,
            self.vq.desc_dma,
            self.vq.avail_dma,
            self.vq.used_dma,
            self.mapper,
            self.shadow,
            self.state,
            self.backend_kick,
        )
        self.backend = ShadowBackend(self.relay)
        self.bufs: list[int] = []

    def buf(self, data: bytes | int) -> int:
        size = data if isinstance(data, int) else len(data)
        gpa = self.dom.ram.alloc(size)
        self.bufs.append(gpa)
        if not isinstance(data, int):
            self.dom.ram.write(gpa, data)
        return gpa

    def submit(self, out: bytes, in_len: int, token: object) -> tuple[int, int, int]:
        """One request: `out` device-readable, `in_len` device-writable bytes."""
        o = self.buf(out)
        i = self.buf(in_len)
        head = self.vq.add([(o, len(out))], [(i, in_len)], token)
        return head, o, i

    def kick(self) -> None:
        # What MmioState's hot path does on QueueNotify, then the service loop.
        os.write(self.relay.guest_kick_fd, (1).to_bytes(8, "little"))
        self.relay.on_guest_kick()

    def backend_kicked(self) -> bool:
        try:
            return int.from_bytes(os.read(self.backend_kick, 8), "little") > 0
        except BlockingIOError:
            return False

    def mapped_refs(self) -> list[int]:
        g = self.dom.grants
        return [r for r in range(g.nr_entries) if g.flags(r) & (GTF_READING | GTF_WRITING)]

    def descs(self) -> memoryview:
        return self.dom.ram.view(self.vq.ring_gpa, desc_bytes(QSIZE))

    def close(self) -> None:
        self.backend.close()
        self.relay.stop()
        self.vq.close()
        assert not self.dma.broken
        assert self.dma.outstanding() == 0
        for gpa in self.bufs:
            self.dom.ram.free(gpa)
        self.platform.close()
        self.shadow.close()
        os.close(self.backend_kick)


@pytest.fixture
def env(hypervisor):
    e = Env(hypervisor)
    yield e
    e.close()


def roundtrip(env: Env, out: bytes, in_len: int, token: object) -> tuple[object, int, bytes]:
    _, _, i = env.submit(out, in_len, token)
    env.kick()
    assert env.backend_kicked()
    (t,) = env.backend.take()
    assert t.readable == out  # the backend saw the guest's bytes
    env.backend.complete(t)
    env.relay.on_backend_call()
    (got,) = env.vq.get_used()
    return got[0], got[1], env.dom.ram.read(i, in_len)


def test_feature_mask() -> None:
    offered = (1 << 28) | (1 << 29) | (1 << 35) | (1 << 32) | 0x7
    assert relay_guest_features(offered) == (1 << 28) | (1 << 29) | (1 << 32) | 0x7
    assert GUEST_FEATURE_MASK & (1 << 35) == 0


def test_data_both_directions(env: Env) -> None:
    out = os.urandom(3000)
    token, written, data = roundtrip(env, out, 3000, "r1")
    assert (token, written) == ("r1", 3000)
    assert data == bytes(b ^ 0x5A for b in out)
    assert env.state.int_status & 1
    # Only the three ring mappings remain; every data grant was unmapped.
    assert env.relay.in_flight() == 0
    ring_refs = set(env.mapped_refs())
    assert len(ring_refs) <= 2  # the 8-entry rings fit in two pages


def test_a_short_write_reports_its_len_and_leaves_the_rest_as_the_guest_had_it(
    env: Env,
) -> None:
    """The whole writable area goes back (backends under-report `len`), but what the
    backend did not write is the guest's own bytes, never stale bounce-buffer ones."""
    stale = os.urandom(8192)  # a request before leaves the bounce space dirty
    roundtrip(env, stale, 8192, "dirty")
    out = b"abcd"
    _, _, i = env.submit(out, PAGE_SIZE + 100, "short")
    guest_had = os.urandom(PAGE_SIZE + 100)
    env.dom.ram.write(i, guest_had)
    env.kick()
    (t,) = env.backend.take()
    env.backend.complete(t)
    env.relay.on_backend_call()
    assert env.vq.get_used() == [("short", 4)]
    data = env.dom.ram.read(i, PAGE_SIZE + 100)
    assert data[:4] == bytes(b ^ 0x5A for b in out)
    assert data[4:] == guest_had[4:]


def test_a_status_byte_after_an_under_reported_len_reaches_the_guest(env: Env) -> None:
    """rust-vmm's vhost-device-i2c answers a failed read with len 1 while the status
    byte it wrote trails the read buffer; Linux's i2c-virtio reads that status and
    ignores the length. The relay copied back only `len` bytes of the first buffer,
    so a NACKed read looked like a successful read of 0x00."""
    hdr = env.buf(b"\x01" * 8)
    data_buf = env.buf(4)
    status = env.buf(b"\x00")  # VIRTIO_I2C_MSG_OK as the guest left it
    env.vq.add([(hdr, 8)], [(data_buf, 4), (status, 1)], "nack")
    env.kick()
    (t,) = env.backend.take()
    (_, _), (status_addr, _) = t.writable
    env.backend.mem[status_addr] = 1  # VIRTIO_I2C_MSG_ERR, after an untouched read buffer
    elem = USED_ELEM_I * (env.backend.used_idx % env.backend.n)
    env.backend.used_i[USED_ID_I + elem] = t.head
    env.backend.used_i[USED_LEN_I + elem] = 1  # the length vhost-device-i2c reports
    env.backend.used_idx += 1
    env.backend.used_h[USED_IDX_H] = env.backend.used_idx
    env.relay.on_backend_call()
    assert env.vq.get_used() == [("nack", 1)]
    assert env.dom.ram.read(status, 1) == b"\x01"


def test_several_in_flight_completed_out_of_order(env: Env) -> None:
    payloads = {f"r{k}": os.urandom(512 + 1000 * k) for k in range(4)}
    ins = {}
    for tok, p in payloads.items():
        _, _, i = env.submit(p, len(p), tok)
        ins[tok] = i
    env.kick()
    taken = env.backend.take()
    assert len(taken) == 4 and env.relay.in_flight() == 4
    assert [t.readable for t in taken] == list(payloads.values())
    for t in reversed(taken):
        env.backend.complete(t)
    env.relay.on_backend_call()
    done = env.vq.get_used()
    assert [tok for tok, _ in done] == [f"r{k}" for k in reversed(range(4))]
    for tok, written in done:
        p = payloads[tok]
        assert written == len(p)
        assert env.dom.ram.read(ins[tok], len(p)) == bytes(b ^ 0x5A for b in p)
    # The queue wraps around its 8 entries many times and keeps working.
    for k in range(20):
        out = os.urandom(64)
        assert roundtrip(env, out, 64, k)[2] == bytes(b ^ 0x5A for b in out)


def _second(descs: memoryview, head: int) -> int:
    return DESC.unpack_from(descs, DESC_SIZE * head)[3]


def _patch(descs: memoryview, i: int, **kw: int) -> None:
    addr, length, flags, nxt = DESC.unpack_from(descs, DESC_SIZE * i)
    vals = {"addr": addr, "length": length, "flags": flags, "nxt": nxt} | kw
    DESC.pack_into(descs, DESC_SIZE * i, vals["addr"], vals["length"], vals["flags"], vals["nxt"])


CORRUPTIONS = {
    "no_bit63": lambda d, h, s: _patch(
        d, h, addr=DESC.unpack_from(d, DESC_SIZE * h)[0] & ~GRANT_DMA_ADDR_OFF
    ),
    "ungranted_ref": lambda d, h, s: _patch(d, h, addr=grant_to_dma(4000)),
    "loop": lambda d, h, s: _patch(d, s, flags=VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, nxt=h),
    "next_out_of_range": lambda d, h, s: _patch(d, h, nxt=100),
    "overflowing_length": lambda d, h, s: _patch(d, s, length=0xFFFFFFFF),
    "huge_ref_range": lambda d, h, s: _patch(
        d, s, addr=GRANT_DMA_ADDR_OFF | (0xFFFFFFFF << PAGE_SHIFT)
    ),
    # A device-writable descriptor pointing at a read-only grant: the map is refused.
    "write_to_readonly_grant": lambda d, h, s: _patch(
        d, s, addr=DESC.unpack_from(d, DESC_SIZE * h)[0]
    ),
    "zero_length": lambda d, h, s: _patch(d, h, length=0),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_malformed_chain_completes_with_len_0(env: Env, kind: str) -> None:
    head, _, _ = env.submit(b"x" * 100, 100, "bad")
    descs = env.descs()
    CORRUPTIONS[kind](descs, head, _second(descs, head))
    descs.release()
    env.kick()
    assert env.relay.bad_requests == 1
    assert env.backend.take() == []  # never reached the backend
    assert not env.backend_kicked()
    assert env.vq.get_used() == [("bad", 0)]
    assert env.state.int_status & 1
    assert env.relay.in_flight() == 0
    # The relay keeps working afterwards.
    out = os.urandom(200)
    token, written, data = roundtrip(env, out, 200, "good")
    assert (token, written) == ("good", 200)
    assert data == bytes(b ^ 0x5A for b in out)


def test_indirect_descriptors(hypervisor) -> None:
    e = Env(hypervisor, indirect=True)
    try:
        o1, o2 = os.urandom(700), os.urandom(5000)
        a, b = e.buf(o1), e.buf(o2)
        i1, i2 = e.buf(100), e.buf(8000)
        e.vq.add([(a, len(o1)), (b, len(o2))], [(i1, 100), (i2, 8000)], "ind")
        e.kick()
        (t,) = e.backend.take()
        assert t.readable == o1 + o2 and [n for _, n in t.writable] == [100, 8000]
        e.backend.complete(t)
        e.relay.on_backend_call()
        assert e.vq.get_used() == [("ind", 5700)]
        reply = bytes(x ^ 0x5A for x in o1 + o2)
        assert e.dom.ram.read(i1, 100) + e.dom.ram.read(i2, 5600) == reply
        # An indirect table whose length is not a multiple of 16 is refused.
        head = e.vq.add([(a, 10), (b, 10)], [(i1, 10)], "badtable")
        descs = e.descs()
        _patch(descs, head, length=20)
        descs.release()
        e.kick()
        assert e.vq.get_used() == [("badtable", 0)] and e.relay.bad_requests == 1
    finally:
        e.close()


def test_full_shadow_memory_stalls_then_resumes(hypervisor) -> None:
    # 4 pages: 1 reserved, 1 shadow ring, 2 for bounce buffers.
    e = Env(hypervisor, shadow_size=4 * PAGE_SIZE)
    try:
        p1, p2 = os.urandom(2100), os.urandom(2100)
        e.submit(p1, 2100, "a")
        e.submit(p2, 2100, "b")
        e.kick()
        first = e.backend.take()
        assert [t.readable for t in first] == [p1] and e.relay.stalled
        e.backend.complete(first[0])
        e.relay.on_backend_call()  # frees space: the stalled request goes out
        assert e.vq.get_used() == [("a", 2100)]
        second = e.backend.take()
        assert [t.readable for t in second] == [p2] and not e.relay.stalled
        e.backend.complete(second[0])
        e.relay.on_backend_call()
        assert e.vq.get_used() == [("b", 2100)]
        assert e.relay.bad_requests == 0
    finally:
        e.close()


def test_a_queue_stalled_for_space_another_held_resumes_when_that_one_stops(hypervisor) -> None:
    """Two queues share the shadow; the second stalls for space the first's request
    holds. Stopping the first (its ring reset, off the guest's thread) kicks the
    second, whose own thread then relays its request."""
    # 5 pages: 1 reserved, 2 shadow rings, 2 for bounce buffers (one request's worth).
    e = Env(hypervisor, shadow_size=5 * PAGE_SIZE)
    vq2 = SplitVirtqueue(e.dom.ram, e.dma, QSIZE)
    kick2 = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    q2 = GrantRelayQueue(
        1, QSIZE, vq2.desc_dma, vq2.avail_dma, vq2.used_dma,
        e.mapper, e.shadow, e.state, kick2,
    )  # fmt: skip
    backend2 = ShadowBackend(q2)
    try:
        e.submit(os.urandom(2100), 2100, "held")
        e.kick()
        assert len(e.backend.take()) == 1
        p2 = os.urandom(2100)
        o, i = e.buf(p2), e.buf(2100)
        vq2.add([(o, 2100)], [(i, 2100)], "waits")
        os.write(q2.guest_kick_fd, (1).to_bytes(8, "little"))
        q2.on_guest_kick()
        assert q2.stalled and e.shadow.waiting_queues == 1 and backend2.take() == []
        e.relay.stop()  # the first queue's reset: its bounce space is free again
        assert e.shadow.waiting_queues == 0
        assert select.select([q2.guest_kick_fd], [], [], 0)[0], "the waiting queue was not kicked"
        q2.on_guest_kick()  # what its guest's thread does with that kick
        (t,) = backend2.take()
        assert t.readable == p2 and not q2.stalled
        backend2.complete(t)
        q2.on_backend_call()
        assert vq2.get_used() == [("waits", 2100)]
        assert e.vq.detach_unused() == ["held"]
    finally:
        backend2.close()
        q2.stop()
        vq2.close()
        os.close(kick2)
        e.close()


def test_stop_releases_every_grant_mapping(env: Env) -> None:
    rings = set(env.mapped_refs())
    env.submit(os.urandom(100), 9000, "x")
    env.submit(os.urandom(5000), 100, "y")
    env.kick()
    assert len(env.backend.take()) == 2
    # The data is copied, never mapped: with requests in flight only the rings are.
    assert set(env.mapped_refs()) == rings
    assert env.relay.stop() == 2
    assert env.mapped_refs() == []
    # The guest can now revoke everything (Env.close checks GrantDma is not broken).
    assert sorted(env.vq.detach_unused()) == ["x", "y"]


def test_event_idx_guest_keeps_kicking(hypervisor) -> None:
    # With EVENT_IDX the guest kicks only when avail idx passes avail_event: the
    # relay must keep it at "every buffer", or the guest stops notifying.
    e = Env(hypervisor, event_idx=True)
    try:
        for k in range(3 * QSIZE):
            out = os.urandom(100 + k)
            _, _, i = e.submit(out, len(out), k)
            assert e.vq.kick_needed(), f"guest would not kick request {k}"
            e.kick()
            (t,) = e.backend.take()
            e.backend.complete(t)
            e.relay.on_backend_call()
            assert e.vq.get_used() == [(k, len(out))]
            assert e.dom.ram.read(i, len(out)) == bytes(b ^ 0x5A for b in out)
    finally:
        e.close()


def test_one_kick_copies_its_requests_in_one_call(env: Env) -> None:
    copier = env.relay.copier  # counts its calls and their segments
    rings = set(env.mapped_refs())  # the relay maps the guest's rings, nothing else
    payloads = [os.urandom(300 + 100 * k) for k in range(4)]  # the 8-entry queue's room
    for k, p in enumerate(payloads):
        env.submit(p, 64, k)
    env.kick()
    taken = env.backend.take()
    assert [t.readable for t in taken] == payloads
    # One call: per request its readable page, its writable page and that page's
    # write probe (each buffer fits one page).
    assert (copier.calls, copier.segments) == (1, 4 * 3)
    assert set(env.mapped_refs()) == rings
    for t in taken[:2]:
        env.backend.complete(t)
    env.relay.on_backend_call()
    # Both completions' writable bytes went back in one call, before the guest saw them.
    assert (copier.calls, copier.segments) == (2, 14)
    assert len(env.vq.get_used()) == 2
    for t in taken[2:]:
        env.backend.complete(t)
    env.relay.on_backend_call()
    assert (copier.calls, copier.segments) == (3, 16) and len(env.vq.get_used()) == 2
    assert set(env.mapped_refs()) == rings


def test_a_grant_ended_before_completion_loses_only_that_request(env: Env) -> None:
    """A guest that ends its grant while the device still has the request (a broken
    or hostile driver): the bytes cannot go back, the request completes with len 0
    and the others in the same completion batch are untouched."""
    heads = [env.submit(os.urandom(100), 100, k) for k in range(2)]
    env.kick()
    taken = env.backend.take()
    _, _, in_gpa = heads[0]
    ref = _grant_of(env, in_gpa)
    assert env.dom.grants.end_access(ref)  # nothing maps it: copies pin only while they run
    for t in taken:
        env.backend.complete(t)
    env.relay.on_backend_call()
    assert sorted(env.vq.get_used()) == [(0, 0), (1, 100)]
    assert env.relay.bad_requests == 1


@pytest.mark.parametrize("kind", ["ungranted_ref", "write_to_readonly_grant"])
def test_a_bad_grant_in_a_batch_refuses_only_its_own_request(env: Env, kind: str) -> None:
    rings = len(env.mapped_refs())
    heads = [env.submit(os.urandom(100), 100, k)[0] for k in range(4)]
    descs = env.descs()
    CORRUPTIONS[kind](descs, heads[1], _second(descs, heads[1]))
    descs.release()
    env.kick()
    assert env.relay.bad_requests == 1
    taken = env.backend.take()
    assert len(taken) == 3  # the other three reached the backend
    assert env.vq.get_used() == [(1, 0)]  # refused at once, with used len 0
    for t in taken:
        env.backend.complete(t)
    env.relay.on_backend_call()
    assert sorted(tok for tok, _ in env.vq.get_used()) == [0, 2, 3]
    assert len(env.mapped_refs()) == rings and env.relay.in_flight() == 0


def test_a_batch_refused_whole_does_not_leave_the_queue_stalled(env: Env) -> None:
    """Found by fuzz_grant_descriptors: a guest lists the same heads again (hostile)
    so the batch holds every shadow descriptor when the next entry needs one; when
    the batch's grants are all refused nothing is in flight to wake a stalled queue."""
    heads = [env.submit(os.urandom(100), 100, k)[0] for k in range(4)]  # 8 descriptors
    descs = env.descs()
    for h in heads:
        CORRUPTIONS["ungranted_ref"](descs, h, _second(descs, h))
    descs.release()
    avail = env.dom.ram.view(env.vq.ring_gpa + (env.vq.avail_dma - env.vq.desc_dma), 4 + 2 * QSIZE)
    ring = avail.cast("H")
    for k in range(3):  # three more entries naming the first heads again
        ring[AVAIL_RING_H + 4 + k] = heads[k]
    ring[AVAIL_IDX_H] = 7
    ring.release()
    avail.release()
    env.kick()
    assert env.relay.bad_requests == 7 and not env.relay.stalled
    assert env.relay.last_avail == 7 and env.relay.in_flight() == 0
    (used_idx,) = struct.unpack(
        "<H", env.dom.ram.read(env.vq.ring_gpa + env.vq.used_dma - env.vq.desc_dma + 2, 2)
    )
    assert used_idx == 7


def _grant_of(env: Env, gpa: int) -> int:
    """The grant ref the guest's DMA layer gave for the page at `gpa`."""
    g = env.dom.grants
    frame = gpa >> PAGE_SHIFT
    refs = [r for r in range(g.nr_entries) if g.flags(r) and g.entry(r)[2] == frame]
    assert len(refs) == 1
    return refs[0]


def _copy(copier, segments: list[tuple]) -> list[int]:
    """Run grant copies through a copier of the platform's mapper; their statuses."""
    seg = L.GRANT_COPY_SEGMENT
    buf = bytearray(seg.size * len(segments))
    for k, (src, dst, length, flags) in enumerate(segments):
        seg.pack_into(buf, k * seg.size, src, dst, length, flags, 0)
    c = (ctypes.c_char * len(buf)).from_buffer(buf)
    copier.copy(ctypes.addressof(c), len(segments))
    out = [seg.unpack_from(buf, k * seg.size)[4] for k in range(len(segments))]
    del c
    return out


def test_the_software_xens_grant_copy_is_gnttabop_copys(env: Env) -> None:
    """Copies in and out of granted pages, each refused with Xen's status when the
    grant does not allow it, and a call refused whole for what gntdev refuses whole."""
    a, b = env.buf(b"A" * 4096), env.buf(b"B" * 100)
    ra = dma_to_grant(env.dma.map(a, 4096, False))  # device-readable: read-only grant
    rb = dma_to_grant(env.dma.map(b, 100, True))
    copier = env.mapper.copier(env.shadow.uva, env.shadow.size)
    local = env.shadow.alloc(8192)
    virt = L.GRANT_COPY_VIRT.pack(env.shadow.uva + local)
    virt2 = L.GRANT_COPY_VIRT.pack(env.shadow.uva + local + 4096)

    def gref(ref: int, offset: int = 0, domid: int = env.dom.domid) -> bytes:
        return L.GRANT_COPY_FOREIGN.pack(ref, offset, domid)

    before = set(env.mapped_refs())
    assert _copy(
        copier,
        [
            (gref(ra), virt, 4096, L.GNTCOPY_SOURCE_GREF),
            (gref(rb), virt2, 100, L.GNTCOPY_SOURCE_GREF),
        ],
    ) == [0, 0]
    assert bytes(env.shadow.mem[local : local + 4]) == b"AAAA"
    assert bytes(env.shadow.mem[local + 4096 : local + 4100]) == b"BBBB"
    env.shadow.mem[local + 4096 : local + 4097] = b"b"
    assert _copy(copier, [(virt2, gref(rb), 1, L.GNTCOPY_DEST_GREF)]) == [0]
    assert env.dom.ram.read(b, 2) == b"bB"  # the writable grant took it
    assert set(env.mapped_refs()) == before  # a copy pins only while it runs
    # Read-only grant as a destination, an ungranted ref, another domain's grant: a
    # status each, the others of the call done.
    statuses = _copy(copier, [
        (virt, gref(ra), 1, L.GNTCOPY_DEST_GREF),
        (gref(4000), virt, 1, L.GNTCOPY_SOURCE_GREF),
        (gref(rb, domid=77), virt, 1, L.GNTCOPY_SOURCE_GREF),
        (gref(rb), virt, 1, L.GNTCOPY_SOURCE_GREF),
    ])  # fmt: skip
    assert statuses == [L.GNTST_GENERAL_ERROR, L.GNTST_GENERAL_ERROR, L.GNTST_BAD_DOMAIN, 0]
    assert env.dom.ram.read(a, 1) == b"A"
    # Across the grant's page, or to memory that was not shared: the call fails.
    with pytest.raises(GrantError):
        _copy(copier, [(gref(rb, offset=100), virt, 4000, L.GNTCOPY_SOURCE_GREF)])
    with pytest.raises(GrantError):
        _copy(copier, [(gref(rb), L.GRANT_COPY_VIRT.pack(4096), 1, L.GNTCOPY_SOURCE_GREF)])
    with pytest.raises(GrantError):
        _copy(copier, [(virt, virt2, 1, 0)])
    assert set(env.mapped_refs()) == before
    copier.close()
    env.dma.unmap(grant_to_dma(ra), 4096)
    env.dma.unmap(grant_to_dma(rb), 100)


def test_a_grant_copy_is_xens_work_in_the_callers_process(env: Env, hypervisor) -> None:
    """The copy runs where the hypercall would, in the caller: it holds the guest's
    grant lock, which a guest ending access waits for, and a copier killed while it
    holds the lock does not wedge the guest. A destroyed guest's grants answer
    GNTST_bad_domain."""
    a = env.buf(b"A" * 64)
    ra = dma_to_grant(env.dma.map(a, 64, False))
    copier = env.mapper.copier(env.shadow.uva, env.shadow.size)
    local = env.shadow.alloc(4096)
    virt = L.GRANT_COPY_VIRT.pack(env.shadow.uva + local)
    src = L.GRANT_COPY_FOREIGN.pack(ra, 0, env.dom.domid)
    assert _copy(copier, [(src, virt, 64, L.GNTCOPY_SOURCE_GREF)]) == [0]
    # A process holding the lock makes the guest's end-access wait; its death frees it.
    lock_fd = env.dom.grants.lock.fd
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_DIE, str(lock_fd)], pass_fds=[lock_fd],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    ended = threading.Event()

    def end_access() -> None:
        env.dma.unmap(grant_to_dma(ra), 64)
        ended.set()

    t = threading.Thread(target=end_access)
    t.start()
    assert not ended.wait(0.3)  # waits for the holder
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert ended.wait(10), "a copier that died holding the grant lock wedged the guest"
    t.join()
    assert _copy(copier, [(src, virt, 64, L.GNTCOPY_SOURCE_GREF)]) == [L.GNTST_GENERAL_ERROR]
    # A guest that is gone: its grants, valid in its table to the end, are no more.
    other = hypervisor.create_domain("gone", memory_mib=16, vcpus=1)
    gpa = other.ram.alloc(PAGE_SIZE)
    other.ram.write(gpa, b"B" * 64)
    rb = dma_to_grant(GrantDma(other.ram, other.grants).map(gpa, 64, False))
    srcb = L.GRANT_COPY_FOREIGN.pack(rb, 0, other.domid)
    assert _copy(copier, [(srcb, virt, 64, L.GNTCOPY_SOURCE_GREF)]) == [0]
    assert bytes(env.shadow.mem[local : local + 64]) == b"B" * 64
    hypervisor.destroy_domain(other.domid)
    assert _copy(copier, [(srcb, virt, 64, L.GNTCOPY_SOURCE_GREF)]) == [L.GNTST_BAD_DOMAIN]
    copier.close()
    with pytest.raises(GrantError):
        _copy(copier, [(srcb, virt, 64, L.GNTCOPY_SOURCE_GREF)])


# Takes a grant lock (its fd in argv) in another process, says so, and waits to die.
HOLD_AND_DIE = """
import sys, time
from xvf.platform.sim._grant_copy import GrantLock
lock = GrantLock(int(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def _wait_for(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _on_a_service_thread(env: Env) -> tuple[GrantRelayQueue, int, ServiceThread]:
    """env's queue again, with a backend call fd, added to a guest's service thread."""
    env.backend.close()
    env.relay.stop()
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    relay = env.relay = GrantRelayQueue(
        0, QSIZE, env.vq.desc_dma, env.vq.avail_dma, env.vq.used_dma,
        env.mapper, env.shadow, env.state, env.backend_kick, call,
    )  # fmt: skip
    env.backend = ShadowBackend(relay)
    thread = ServiceThread(env.platform, "test guest")
    thread.loop.add_handler(relay.guest_kick_fd, relay)
    thread.loop.add_handler(call, relay)
    return relay, call, thread


def _off_the_thread(relay: GrantRelayQueue, call: int, thread: ServiceThread) -> None:
    thread.loop.remove_fd(relay.guest_kick_fd)
    thread.loop.remove_fd(call)
    thread.stop()
    thread.close()
    os.close(call)


def test_a_relayed_queue_is_served_on_its_guests_service_thread(env: Env) -> None:
    """Added to a guest's ServiceLoop, the queue's kicks and calls are relayed by that
    loop's thread, without the GIL and without the daemon's loop; what needs Python (a
    broken ring for on_broken) waits on notice_fd for the daemon's thread."""
    relay, call, thread = _on_a_service_thread(env)
    broken: list[str] = []
    relay.on_broken = broken.append
    one = (1).to_bytes(8, "little")
    thread.start()
    try:
        out = os.urandom(100)
        _, _, i = env.submit(out, 100, "a")
        os.write(relay.guest_kick_fd, one)  # QueueNotify, as the hot path writes it
        _wait_for(env.backend_kicked, "the backend's kick")
        (t,) = env.backend.take()
        assert t.readable == out
        env.backend.complete(t)
        os.write(call, one)
        _wait_for(lambda: relay.in_flight() == 0, "the completion")
        assert env.vq.get_used() == [("a", 100)]
        assert env.dom.ram.read(i, 100) == bytes(b ^ 0x5A for b in out)
        assert env.state.int_status & 1  # the used-buffer interrupt, raised there too
        # The guest breaks its ring: the thread stops the queue at once, on_broken hears
        # of it only from the daemon's thread.
        avail = env.dom.ram.view(
            env.vq.ring_gpa + (env.vq.avail_dma - env.vq.desc_dma), 4 + 2 * QSIZE
        )
        ring = avail.cast("H")
        ring[AVAIL_IDX_H] = (ring[AVAIL_IDX_H] + QSIZE + 5) & 0xFFFF
        ring.release()
        avail.release()
        os.write(relay.guest_kick_fd, one)
        _wait_for(lambda: relay.broken, "the broken ring")
        assert broken == []
        assert select.select([relay.notice_fd], [], [], 5)[0]
        relay.drain_notices()
        assert len(broken) == 1 and "entries ahead" in broken[0]
    finally:
        _off_the_thread(relay, call, thread)


def test_a_backend_whose_used_index_runs_ahead_breaks_the_queue(env: Env) -> None:
    """A backend may not complete more than it was given: the entries past its real
    completions are stale, and taking one would complete a request it still holds."""
    broken: list[str] = []
    env.relay.on_broken = broken.append
    env.submit(os.urandom(100), 100, "a")
    env.submit(os.urandom(100), 100, "b")
    env.kick()
    first, second = env.backend.take()
    env.backend.complete(first)  # one real completion, made visible...
    env.relay.on_backend_call()
    assert env.vq.get_used() == [("a", 100)] and not broken
    env.backend.used_h[USED_IDX_H] = 5  # ...then an index 4 further on, with 1 in flight
    env.relay.on_backend_call()
    assert len(broken) == 1 and "backend broke its used ring" in broken[0]
    assert env.relay.broken
    # Nothing past the real completions is taken: which entry is real is not knowable.
    assert env.vq.get_used() == [] and env.relay.in_flight() == 1
    env.backend.complete(second)
    env.relay.on_backend_call()  # a lying backend is not read again
    assert env.vq.get_used() == [] and len(broken) == 1


def test_shadow_allocator_against_a_model() -> None:
    """The relay's C first-fit allocator: random allocations (various sizes and
    alignments) and frees in random order never overlap, stay inside the region
    (first page excluded), and coalesce back to one free extent."""
    import itertools
    import random

    rng = random.Random(5)
    size = 64 * PAGE_SIZE
    shadow = ShadowMemory(size)
    try:
        held: dict[int, int] = {}  # offset -> rounded length
        for _ in range(3000):
            if held and (rng.random() < 0.45 or len(held) > 40):
                off = rng.choice(list(held))
                shadow.free(off)
                del held[off]
            else:
                align = rng.choice((ShadowMemory.ALIGN, 256, PAGE_SIZE))
                length = rng.choice((1, 63, 64, 100, 2100, PAGE_SIZE, 3 * PAGE_SIZE + 5))
                off = shadow.alloc(length, align)
                if off is None:
                    continue
                rounded = max(align, -(-length // align) * align)
                assert off % align == 0 and off >= PAGE_SIZE and off + rounded <= size
                for o, n in held.items():
                    assert off + rounded <= o or o + n <= off, "overlap"
                held[off] = rounded
            extents = shadow.free_extents
            assert extents == sorted(extents)
            assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(extents))  # merged
            assert sum(n for _, n in extents) + sum(held.values()) == size - PAGE_SIZE
        for off in list(held):
            shadow.free(off)
        assert shadow.free_extents == [(PAGE_SIZE, size - PAGE_SIZE)]
    finally:
        shadow.close()
