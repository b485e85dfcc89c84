"""Fuzz target: arbitrary ioreq slots served by the Cython IoreqServer.

The ioreq page is the middle page of a three-page anonymous mmap; the pages
around it are filled with a canary and must never change. Every slot of the
page is guest-controlled (on Xen the hypervisor fills it, but a hostile or
buggy peer on the simulator writes it directly), and the oracle per slot is:

- state != IOREQ_READY: the 32 bytes are untouched, service() says False;
- state == IOREQ_READY: service() says True, the state nibble becomes
  IORESP_READY with the other flag bits kept, addr/count/size/vp_eport/pad/type
  are unchanged; a read of anything but a single in-window COPY access of 1..8
  bytes answers all-ones; a good read answers the device's value masked to the
  access size; a write never changes `data`;
- the device sees exactly the accesses the good slots describe (offset, size,
  value masked to the size), and none for bad slots;
- a vCPU index past nr_vcpus touches nothing.
"""

from __future__ import annotations

import mmap
import struct

from tests.fuzz._common import Bytes, run_atheris
from xvf.hotpath._ioreq import IoreqServer, MmioState
from xvf.hotpath._layout import PAGE_SIZE as PAGE

SLOT = struct.Struct("<QQIIIHBB")  # addr, data, count, size, vp_eport, pad, flags, type
SLOT_SIZE = 32
NR_SLOTS = PAGE // SLOT_SIZE
BASE = 0x2000000
WINDOW = 0x200
CANARY = bytes(range(256)) * (PAGE // 256)

STATE_MASK = 0x0F
DATA_IS_PTR = 0x10
DIR_READ = 0x20  # Xen's dir bit: 1 = read (IOREQ_READ)
IOREQ_READY = 1
IORESP_READY = 3
TYPE_COPY = 1
HOT = {0x50, 0x60, 0x64}  # QueueNotify, InterruptStatus, InterruptACK: answered in Cython


def device_value(offset: int, size: int) -> int:
    """What the recording device answers: wider than any access, so masking shows."""
    return (0x0123_4567_89AB_CDEF ^ (offset * 0x1_0001_0001) ^ size) & (2**64 - 1)


class RecordingDevice:
    """The Python side of the register file: records accesses, answers device_value."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def mmio_read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return device_value(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


class IoreqHarness:
    """One IoreqServer over a guarded page; `check_page` is the whole oracle."""

    def __init__(self, nr_vcpus: int = NR_SLOTS) -> None:
        self.mm = mmap.mmap(-1, 3 * PAGE)
        self.mm[0:PAGE] = CANARY
        self.mm[2 * PAGE : 3 * PAGE] = CANARY
        self.page = memoryview(self.mm)[PAGE : 2 * PAGE]
        self.device = RecordingDevice()
        self.state = MmioState()
        self.state.handler = self.device
        self.nr_vcpus = nr_vcpus
        self.server = IoreqServer(self.page, nr_vcpus, BASE, WINDOW, self.state)

    def close(self) -> None:
        self.server.release()
        self.page.release()
        self.mm.close()

    def check_page(self, page: bytes, vcpus: list[int]) -> None:
        """Load `page` (padded to 4 KiB), serve each vCPU in `vcpus` once, check everything."""
        page = (page + bytes(PAGE))[:PAGE]
        self.page[:] = page
        expected = bytearray(page)
        for vcpu in vcpus:
            self.device.log.clear()
            before = bytes(self.page)
            int_status = self.state.int_status
            served = self.server.service(vcpu)
            after = bytes(self.page)
            if vcpu >= self.nr_vcpus:
                assert not served, f"vCPU {vcpu} beyond nr_vcpus was served"
                assert after == before
                assert not self.device.log
                continue
            off = vcpu * SLOT_SIZE
            old = SLOT.unpack_from(before, off)
            new = SLOT.unpack_from(after, off)
            # only this vCPU's slot may change
            assert after[:off] == before[:off] and after[off + 32 :] == before[off + 32 :]
            want, accesses = expected_slot(old, int_status)
            assert served == (old[6] & STATE_MASK == IOREQ_READY)
            assert new == want, f"slot {vcpu}: {old} -> {new}, expected {want}"
            assert self.device.log == accesses, (old, self.device.log, accesses)
            expected[off : off + 32] = after[off : off + 32]
        assert bytes(self.page) == bytes(expected)
        assert self.mm[0:PAGE] == CANARY and self.mm[2 * PAGE :] == CANARY, "wrote outside"


def is_good(addr: int, count: int, size: int, flags: int, type_: int) -> bool:
    return (
        type_ == TYPE_COPY
        and not flags & DATA_IS_PTR
        and count == 1
        and 1 <= size <= 8
        and BASE <= addr < BASE + WINDOW
    )


def expected_slot(old: tuple, int_status: int) -> tuple[tuple, list[tuple]]:
    addr, data, count, size, port, pad, flags, type_ = old
    if flags & STATE_MASK != IOREQ_READY:
        return old, []
    new_flags = (flags & ~STATE_MASK) | IORESP_READY
    is_read = bool(flags & DIR_READ)
    if not is_good(addr, count, size, flags, type_):
        new_data = 2**64 - 1 if is_read else data
        return (addr, new_data, count, size, port, pad, new_flags, type_), []
    offset = addr - BASE
    mask = 2 ** (8 * size) - 1
    hot = size == 4 and offset in HOT
    if is_read:
        if hot and offset == 0x60:
            value, log = int_status, []
        else:
            value, log = device_value(offset, size), [("r", offset, size)]
        return (addr, value & mask, count, size, port, pad, new_flags, type_), log
    # A write to InterruptStatus (read-only) is no hot access: the register file logs
    # the guest's mistake. Only QueueNotify and InterruptACK writes stay in Cython.
    hot_write = hot and offset != 0x60
    log = [] if hot_write else [("w", offset, size, data & mask)]
    return (addr, data, count, size, port, pad, new_flags, type_), log


def slot_bytes(
    addr: int, data: int, count: int, size: int, port: int, flags: int, type_: int
) -> bytes:
    return SLOT.pack(addr, data, count, size, port, 0, flags, type_)


_harness: IoreqHarness | None = None


def one_input(data: bytes) -> None:
    """Byte 0: n; next n bytes: vCPUs to serve (>= 128 doubled: out of range, or all
    slots when n is 0); the rest, repeated, is the page (so short inputs fill it)."""
    global _harness
    if _harness is None:
        _harness = IoreqHarness()
    b = Bytes(data)
    n = b.u8() % 16
    order = [v * 2 if v >= 128 else v for v in b.take(n)] or list(range(NR_SLOTS))
    rest = b.rest() or bytes(1)
    _harness.check_page((rest * (PAGE // len(rest) + 1))[:PAGE], order)


if __name__ == "__main__":
    run_atheris(one_input)
