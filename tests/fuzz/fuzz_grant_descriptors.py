"""Fuzz target: hostile descriptor tables and avail rings relayed in grant mode.

A software-Xen guest grants its three rings and four buffers (two
device-writable, two read-only; one read-only buffer holds an indirect table
the input fills) to dom0. The input writes any descriptors (addresses inside
or around those buffers, other grant refs, non-grant addresses; any length,
flags, next) and any avail ring, then kicks a fresh `GrantRelayQueue`. A small
backend completes every shadow chain it is given (filling the writable
segments) until nothing is left. Oracle:

- no exception leaves the relay; every avail entry before the ring breaks
  is completed exactly once (used idx), with len 0 (refused) or at most the
  chain's writable bytes; an avail index more than the queue size ahead, or a
  head outside the queue, breaks the ring (nothing from there on is relayed);
- every shadow descriptor the backend sees lies inside shadow memory;
- guest RAM outside the device-writable buffers and the used ring is
  unchanged byte for byte (read-only grants, the descriptor table, the
  avail ring and every ungranted page included);
- after stop(), no grant is still mapped.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile

from tests.fuzz._common import Bytes, run_atheris, tmp_root
from xvf.hotpath._ioreq import MmioState
from xvf.platform.sim.dma import GrantDma
from xvf.platform.sim.grant_table import GTF_READING, GTF_WRITING
from xvf.platform.sim.hypervisor import Hypervisor
from xvf.platform.sim.platform import SimPlatform
from xvf.protocols.grant_relay import GrantRelayQueue, ShadowMemory
from xvf.protocols.virtqueue import (
    AVAIL_IDX_H,
    AVAIL_RING_H,
    DESC,
    DESC_SIZE,
    GRANT_DMA_ADDR_OFF,
    PAGE_SHIFT,
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
from xvf.protocols.virtqueue import PAGE_SIZE as PAGE

NUM = 8
FILL = 0xA5
# buffer name -> (pages, device-writable)
BUFFERS = {"w0": (1, True), "w1": (2, True), "r0": (1, False), "table": (1, False)}
KINDS = ("w0", "w1", "r0", "table", "ref", "plain", "raw")


class GrantRelayHarness:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xvf-fzg-", dir=tmp_root())
        self.hv = Hypervisor(os.path.join(self.dir, "xen")).start()
        self.dom = self.hv.create_domain("fuzz", memory_mib=4, vcpus=1)
        self.platform = SimPlatform(self.hv.run_dir)
        self.mapper = self.platform.open_grant_mapper(self.dom.domid)
        self.dma = GrantDma(self.dom.ram, self.dom.grants)
        # The device only reads desc and avail: granted read-only, so no hostile
        # descriptor can make the relay write over them. The used ring's page
        # is writable (and so a legitimate, if silly, DMA target).
        self.rings: dict[str, tuple[int, int]] = {}
        for name, size in (("desc", desc_bytes(NUM)), ("avail", avail_bytes(NUM))):
            gpa = self.dom.ram.alloc(PAGE)
            self.rings[name] = (gpa, self.dma.map(gpa, size, False))
        self.rings["used"] = self.dma.alloc_coherent(used_bytes(NUM))
        self.used_ref = (self.rings["used"][1] & ~GRANT_DMA_ADDR_OFF) >> PAGE_SHIFT
        self.bufs: dict[str, tuple[int, int, int]] = {}  # name -> (gpa, dma, length)
        for name, (pages, writable) in BUFFERS.items():
            gpa = self.dom.ram.alloc(pages * PAGE)
            self.bufs[name] = (gpa, self.dma.map(gpa, pages * PAGE, writable), pages * PAGE)
        self.shadow = ShadowMemory(1 << 20)
        self.state = MmioState()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def close(self) -> None:
        os.close(self.kick)
        self.shadow.close()
        self.platform.close()
        self.hv.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def address(self, kind: int, off: int) -> int:
        name = KINDS[kind % len(KINDS)]
        if name in self.bufs:
            return self.bufs[name][1] + off % (3 * PAGE) - PAGE // 2  # may stray past either end
        if name == "ref":
            return (
                GRANT_DMA_ADDR_OFF | (off << PAGE_SHIFT) | (off & (PAGE - 1))
            )  # any ref, granted or not
        if name == "plain":
            return self.bufs["w0"][0] + off  # the buffer's gpa: not a grant address
        return off * 0x9E3779B97F4A7C15 & (2**64 - 1)

    def check(
        self,
        descs: list[tuple[int, int, int, int, int]],
        table: list[tuple[int, int, int, int, int]],
        avail_idx: int,
        heads: list[int],
        written: int,
    ) -> None:
        """descs/table entries: (addr kind, addr offset, len, flags, next)."""
        ram = self.dom.ram
        desc_gpa, desc_dma = self.rings["desc"]
        avail_gpa, avail_dma = self.rings["avail"]
        used_gpa, used_dma = self.rings["used"]
        table_bytes = b"".join(
            DESC.pack(self.address(k, o), n, f, x) for k, o, n, f, x in table[: PAGE // DESC_SIZE]
        )
        ram.write(self.bufs["table"][0], table_bytes.ljust(self.bufs["table"][2], b"\0"))
        ring = b"".join(DESC.pack(self.address(k, o), n, f, x) for k, o, n, f, x in descs)
        ram.write(desc_gpa, ring.ljust(desc_bytes(NUM), b"\0")[: desc_bytes(NUM)])
        heads = (heads + [0] * NUM)[:NUM]
        ram.write(avail_gpa, struct.pack(f"<HH{NUM}HH", 0, avail_idx, *heads, 0))
        ram.write(used_gpa, bytes(used_bytes(NUM)))
        for name, (pages, writable) in BUFFERS.items():
            if writable:
                ram.write(self.bufs[name][0], bytes(pages * PAGE))
        before = os.pread(ram.fd, ram.size, 0)

        self.backend_last = 0  # the backend's next shadow avail slot
        relay = GrantRelayQueue(
            0, NUM, desc_dma, avail_dma, used_dma, self.mapper, self.shadow, self.state, self.kick
        )
        try:
            os.write(relay.guest_kick_fd, (1).to_bytes(8, "little"))
            relay.on_guest_kick()
            for _ in range(avail_idx + 2):
                if not self.serve(relay, written):
                    break
            assert relay.in_flight() == 0 and not relay.stalled
        finally:
            relay.stop()

        # An avail index further ahead than the queue is long, or a head outside the
        # queue, breaks the ring: the relay stops there (the device needs a reset).
        taken = 0 if avail_idx > NUM else avail_idx
        for i in range(taken):
            if heads[i % NUM] >= NUM:
                taken = i
                break
        broken = taken != avail_idx
        assert relay.broken == broken, f"broken {relay.broken}, expected {broken}"
        expected = taken
        (used_idx,) = struct.unpack_from("<H", ram.read(used_gpa + 2, 2))
        assert used_idx == expected & 0xFFFF, f"used idx {used_idx}, {expected} requests"
        # A chain may name the used ring's own page as a buffer: then the backend's
        # bytes land on used entries and only the index (written last) is checked.
        if expected <= NUM and not self.targets_used_page(descs + table):
            got = sorted(
                struct.unpack_from("<I", ram.read(used_gpa + 4 + 8 * i, 4))[0]
                for i in range(expected)
            )
            want = sorted(heads[i % NUM] for i in range(taken))
            assert got == want, f"used ids {got}, avail heads {want}"
            limit = sum(BUFFERS[n][0] * PAGE for n in BUFFERS) + 3 * PAGE
            for i in range(expected):
                (n,) = struct.unpack_from("<I", ram.read(used_gpa + 8 + 8 * i, 4))
                assert n <= min(written, limit), f"used len {n}"
        self.assert_only_writable_changed(before, os.pread(ram.fd, ram.size, 0))
        g = self.dom.grants
        mapped = [r for r in range(g.nr_entries) if g.flags(r) & (GTF_READING | GTF_WRITING)]
        assert not mapped, f"grants still mapped: {mapped[:8]}"

    def targets_used_page(self, entries: list[tuple[int, int, int, int, int]]) -> bool:
        for kind, off, length, _, _ in entries:
            addr = self.address(kind, off)
            if addr & GRANT_DMA_ADDR_OFF and length:
                first = (addr & ~GRANT_DMA_ADDR_OFF) >> PAGE_SHIFT
                last = ((addr & ~GRANT_DMA_ADDR_OFF) + length - 1) >> PAGE_SHIFT
                if first <= self.used_ref <= last:
                    return True
        return False

    def serve(self, relay: GrantRelayQueue, written: int) -> bool:
        """The backend: complete every chain on the shadow ring; False if there was none."""
        mem, n = self.shadow.mem, NUM
        avail = mem[relay.shadow_avail : relay.shadow_avail + avail_bytes(n)].cast("H")
        used = mem[relay.shadow_used : relay.shadow_used + used_bytes(n)]
        used_h, used_i = used.cast("H"), used[: used_elems_bytes(n)].cast("I")
        try:
            done = 0
            last = self.backend_last
            while last != avail[AVAIL_IDX_H]:
                head = avail[AVAIL_RING_H + last % n]
                last = (last + 1) & 0xFFFF
                i, chain, left = head, 0, written
                while True:
                    addr, length, flags, nxt = DESC.unpack_from(
                        mem, relay.shadow_desc + DESC_SIZE * i
                    )
                    assert 0 < addr and addr + length <= self.shadow.size, "descriptor escapes"
                    if flags & VRING_DESC_F_WRITE and left > 0:
                        k = min(left, length)
                        mem[addr : addr + k] = bytes([FILL]) * k
                        left -= k
                    chain += 1
                    assert chain <= n, "shadow chain loops"
                    if not flags & VRING_DESC_F_NEXT:
                        break
                    i = nxt
                elem = USED_ELEM_I * (used_h[USED_IDX_H] % n)
                used_i[USED_ID_I + elem] = head
                used_i[USED_LEN_I + elem] = written - max(left, 0)
                used_h[USED_IDX_H] = (used_h[USED_IDX_H] + 1) & 0xFFFF
                done += 1
            self.backend_last = last
        finally:
            for v in (avail, used_h, used_i, used):
                v.release()
        if done:
            relay.on_backend_call()
        return bool(done)

    def assert_only_writable_changed(self, before: bytes, after: bytes) -> None:
        ram = self.dom.ram
        used = ram.gpa_to_offset(self.rings["used"][0])
        spans = [(used, used + PAGE, False)]  # the whole writable used-ring page
        spans += [(ram.gpa_to_offset(gpa), ram.gpa_to_offset(gpa) + length, True)
                  for name, (gpa, _, length) in self.bufs.items() if BUFFERS[name][1]]  # fmt: skip
        pos = 0
        for start, end, fill_only in sorted(spans):
            assert before[pos:start] == after[pos:start], first_diff(before, after, pos, start)
            if fill_only:  # writable buffers: only the backend's bytes land there
                for k in range(start, end):
                    if after[k] != before[k]:
                        assert after[k] == FILL, f"byte {k:#x}: {after[k]:#x}"
            pos = end
        assert before[pos:] == after[pos:], first_diff(before, after, pos, len(before))


def first_diff(a: bytes, b: bytes, lo: int, hi: int) -> str:
    for k in range(lo, hi):
        if a[k] != b[k]:
            return f"guest RAM at memfd offset {k:#x} changed ({a[k]:#x} -> {b[k]:#x})"
    return ""


_harness: GrantRelayHarness | None = None


def decode_desc(b: Bytes) -> tuple[int, int, int, int, int]:
    kind, off, sel, flags, nxt = b.u8(), b.u16(), b.u8(), b.u8(), b.u8()
    lengths = (16, 512, PAGE, 2 * PAGE, 0, 1, 0xFFFFFFFF, 3 * PAGE + 1)
    length = lengths[sel % len(lengths)] if sel < 0xF0 else b.u32()
    return kind, off, length, flags & 7 if flags < 0xF0 else flags << 8, nxt % (NUM + 2)


def one_input(data: bytes) -> None:
    """NUM descriptors, then avail idx and heads, then an indirect table, 7 bytes per entry."""
    global _harness
    if _harness is None:
        _harness = GrantRelayHarness()
    b = Bytes(data)
    descs = [decode_desc(b) for _ in range(NUM)]
    avail_idx = b.u8() % (3 * NUM)
    heads = [h % (NUM + 3) for h in b.take(NUM)]
    written = (0, 1, 100, PAGE, 3 * PAGE, 2**32 - 1)[b.u8() % 6]
    table = [decode_desc(b) for _ in range(min(NUM, b.left() // 7))]
    _harness.check(descs, table, avail_idx, heads, written)


if __name__ == "__main__":
    run_atheris(one_input)
