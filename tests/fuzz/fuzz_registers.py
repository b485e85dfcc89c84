"""Fuzz target: arbitrary guest register-access sequences on the virtio-mmio register file.

Accesses go through `MmioState.access`, the path the ioreq loop takes (hot
registers in Cython, the rest in `xvf.protocols.virtio_mmio.VirtioMmioRegisters`). Between
accesses the harness also injects what the backend side can do at any time:
a used-buffer interrupt, a config change, "device needs reset". Invariants
checked after every step:

- status only gains bits, except that writing 0 to Status resets it to 0;
- DRIVER_OK is never set without FEATURES_OK; FEATURES_OK only with accepted
  features (a subset of the offer, VERSION_1 included);
- a ready queue has a power-of-two size in 1..QueueNumMax and three ring
  addresses; the model is told `queue_ready` only for such a queue, and only
  after DRIVER_OK;
- InterruptStatus has no bits but used-buffer (1) and config-change (2);
- identity registers never change; no exception escapes the register file
  (the Cython layer would swallow and log it, so the log is watched too).
"""

from __future__ import annotations

import logging

from tests.fuzz._common import Bytes, run_atheris
from xvf.hotpath._ioreq import MmioState
from xvf.protocols import virtio as R
from xvf.protocols.virtio_mmio import QueueRegisters, VirtioMmioRegisters

FEATURES = (1 << R.F_VERSION_1) | (1 << R.F_RING_RESET) | (1 << R.F_EVENT_IDX) | 0b1011
QUEUE_SIZES = [8, 256, 1]
DEVICE_ID = 2
REGISTERS = [
    R.MAGIC_VALUE, R.VERSION, R.DEVICE_ID, R.VENDOR_ID, R.DEVICE_FEATURES, R.DEVICE_FEATURES_SEL,
    R.DRIVER_FEATURES, R.DRIVER_FEATURES_SEL, R.QUEUE_SEL, R.QUEUE_NUM_MAX, R.QUEUE_NUM,
    R.QUEUE_READY, R.QUEUE_NOTIFY, R.INTERRUPT_STATUS, R.INTERRUPT_ACK, R.STATUS,
    R.QUEUE_DESC_LOW, R.QUEUE_DESC_HIGH, R.QUEUE_DRIVER_LOW, R.QUEUE_DRIVER_HIGH,
    R.QUEUE_DEVICE_LOW, R.QUEUE_DEVICE_HIGH, R.SHM_SEL, R.SHM_LEN_LOW, R.SHM_LEN_HIGH,
    R.SHM_BASE_LOW, R.SHM_BASE_HIGH, R.QUEUE_RESET, R.CONFIG_GENERATION, R.CONFIG,
    R.CONFIG + 4, R.CONFIG + 0xFF, 0x1FC,
]  # fmt: skip
# The backend side's events, injected as pseudo-accesses at these "offsets".
EV_USED, EV_CONFIG, EV_NEEDS_RESET = -1, -2, -3


class Model:
    """The device behind the registers; may refuse features or fail to start."""

    def __init__(self) -> None:
        self.refuse_features = False
        self.fail_start = False
        self.violations: list[str] = []
        self.config = bytearray(64)
        self.regs: VirtioMmioRegisters | None = None

    def features_ok(self, features: int) -> bool:
        if features & ~FEATURES:
            self.violations.append(f"features_ok asked for unoffered {features:#x}")
        return not self.refuse_features

    def driver_ok(self, queues: list[QueueRegisters], features: int) -> None:
        if self.fail_start:
            raise OSError("backend went away")

    def queue_ready(self, index: int, q: QueueRegisters) -> None:
        assert self.regs is not None
        if not q.ready or not valid_size(q) or not self.regs.status & R.STATUS_DRIVER_OK:
            self.violations.append(f"queue_ready({index}) for {q} in status {self.regs.status}")

    def queue_reset(self, index: int) -> None:
        if not 0 <= index < len(QUEUE_SIZES):
            self.violations.append(f"queue_reset of queue {index}")

    def device_reset(self) -> None:
        pass

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if 0 <= offset and offset + size <= len(self.config):
            self.config[offset : offset + size] = (value & (2 ** (8 * size) - 1)).to_bytes(
                size, "little"
            )


def valid_size(q: QueueRegisters) -> bool:
    return 0 < q.num <= q.num_max and not q.num & (q.num - 1)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:  # an exception the Cython layer swallowed
            self.records.append(self.format(record))


class RegisterHarness:
    def __init__(self, refuse_features: bool = False, fail_start: bool = False) -> None:
        self.model = Model()
        self.model.refuse_features = refuse_features
        self.model.fail_start = fail_start
        self.regs = VirtioMmioRegisters("fuzz", DEVICE_ID, FEATURES, QUEUE_SIZES, self.model)
        self.model.regs = self.regs
        self.state: MmioState = self.regs.state
        self.errors = _Errors()

    def run(self, ops: list[tuple[int, int, bool, int]]) -> None:
        """ops: (offset, size, is_write, value); negative offsets are backend events."""
        logger = logging.getLogger("xvf.ioreq")
        logger.addHandler(self.errors)
        try:
            for op in ops:
                self.step(*op)
        finally:
            logger.removeHandler(self.errors)

    def step(self, offset: int, size: int, is_write: bool, value: int) -> None:
        s = self.state
        old_status = s.status
        if offset == EV_USED:
            s.raise_interrupt(R.INT_VRING)
        elif offset == EV_CONFIG:
            self.regs.config_changed()
        elif offset == EV_NEEDS_RESET:
            self.regs.needs_reset()
        elif is_write:
            assert s.access(offset, size, True, value) == 0
        else:
            got = s.access(offset, size, False)
            assert 0 <= got < 2**64
            if size == 4 and offset == R.MAGIC_VALUE:
                assert got == R.MAGIC
            if size == 4 and offset == R.DEVICE_ID:
                assert got == DEVICE_ID
            if size == 4 and offset == R.VERSION:
                assert got == 2
        reset = is_write and offset == R.STATUS and size == 4 and value & 0xFFFFFFFF == 0
        self.check(old_status, reset, (offset, size, is_write, value))

    def check(self, old_status: int, reset: bool, op: tuple) -> None:
        s, regs = self.state, self.regs
        status = s.status
        if reset:
            assert status == 0, f"{op}: status {status:#x} after a reset"
        else:
            assert status & old_status == old_status, f"{op}: status {old_status:#x}->{status:#x}"
        if status & R.STATUS_DRIVER_OK:
            assert status & R.STATUS_FEATURES_OK, f"{op}: DRIVER_OK without FEATURES_OK"
        if status & R.STATUS_FEATURES_OK:
            f = regs.driver_features
            assert not f & ~FEATURES and f >> R.F_VERSION_1 & 1, f"{op}: accepted {f:#x}"
            assert not self.model.refuse_features
        for i, q in enumerate(regs.queues):
            assert q.num_max == QUEUE_SIZES[i]
            if q.ready:
                assert valid_size(q), f"{op}: queue {i} ready with size {q.num}"
                assert q.desc and q.driver and q.device, f"{op}: queue {i} ready without rings"
            else:
                assert s.kick_fd(i) == -1
        assert not s.int_status & ~(R.INT_VRING | R.INT_CONFIG), f"{op}: {s.int_status:#x}"
        assert not self.model.violations, self.model.violations
        assert not self.errors.records, self.errors.records


def decode_ops(b: Bytes) -> list[tuple[int, int, bool, int]]:
    """Five bytes per op: kind/register, size, value selector + a 16-bit value."""
    ops = []
    while b.left() >= 4 and len(ops) < 200:
        kind = b.u8()
        sel = b.u8()
        small = b.u16()
        if kind >= 0xF0:
            ops.append(((EV_USED, EV_CONFIG, EV_NEEDS_RESET)[kind % 3], 0, False, 0))
            continue
        if kind & 0x80:
            offset = REGISTERS[kind % len(REGISTERS)]
        else:
            offset = kind * 4 + (sel >> 6)  # 0..0x1ff, some misaligned
        size = (4, 4, 4, 1, 2, 8, 3, 0)[sel & 7]
        value = small if sel & 0x20 else b.u32()
        ops.append((offset, size, bool(sel & 0x08), value))
    return ops


def one_input(data: bytes) -> None:
    b = Bytes(data)
    flags = b.u8()
    RegisterHarness(bool(flags & 1), bool(flags & 2)).run(decode_ops(b))


if __name__ == "__main__":
    run_atheris(one_input)
