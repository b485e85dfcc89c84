"""virtio-mmio v2 register semantics (virtio 1.2 section 4.2.2), incl. hostile guests."""

from __future__ import annotations

import os

import pytest

from xvf.hotpath._ioreq import MmioState
from xvf.protocols import virtio as R
from xvf.protocols.virtio_mmio import QueueRegisters, VirtioMmioRegisters

FEATURES = (1 << R.F_VERSION_1) | (1 << R.F_RING_RESET) | 0b101


class RecordingModel:
    """The device behind the registers; records what the register file asked of it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.accept = True
        self.config = bytearray(range(16))

    def features_ok(self, f: int) -> bool:
        self.calls.append(("features_ok", f))
        return self.accept

    def driver_ok(self, queues: list[QueueRegisters], f: int) -> None:
        self.calls.append(("driver_ok", [q.ready for q in queues], f))

    def queue_ready(self, i: int, q: QueueRegisters) -> None:
        self.calls.append(("queue_ready", i))

    def queue_reset(self, i: int) -> None:
        self.calls.append(("queue_reset", i))

    def device_reset(self) -> None:
        self.calls.append(("device_reset",))

    def config_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.config[off : off + size], "little")

    def config_write(self, off: int, size: int, value: int) -> None:
        self.config[off : off + size] = value.to_bytes(size, "little")


@pytest.fixture
def dev():
    model = RecordingModel()
    regs = VirtioMmioRegisters("test", 2, FEATURES, [8, 16], model)
    return regs, model, regs.state


def rd(state: MmioState, off: int, size: int = 4) -> int:
    return state.access(off, size, False)


def wr(state: MmioState, off: int, value: int, size: int = 4) -> None:
    state.access(off, size, True, value)


def negotiate(state: MmioState, features: int = 1 << R.F_VERSION_1) -> None:
    wr(state, R.STATUS, R.STATUS_ACKNOWLEDGE)
    wr(state, R.STATUS, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER)
    for sel in (0, 1):
        wr(state, R.DRIVER_FEATURES_SEL, sel)
        wr(state, R.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
    wr(state, R.STATUS, R.STATUS_ACKNOWLEDGE | R.STATUS_DRIVER | R.STATUS_FEATURES_OK)


def setup_queue(state: MmioState, q: int, num: int = 8) -> None:
    wr(state, R.QUEUE_SEL, q)
    wr(state, R.QUEUE_NUM, num)
    for off, val in (
        (R.QUEUE_DESC_LOW, 0x1000),
        (R.QUEUE_DRIVER_LOW, 0x2000),
        (R.QUEUE_DEVICE_LOW, 0x3000),
        (R.QUEUE_DESC_HIGH, 1),
    ):
        wr(state, off, val)
    wr(state, R.QUEUE_READY, 1)


def test_identity_registers(dev):
    regs, _, s = dev
    assert rd(s, R.MAGIC_VALUE) == 0x74726976
    assert rd(s, R.VERSION) == 2
    assert rd(s, R.DEVICE_ID) == 2
    assert rd(s, R.VENDOR_ID) == R.VENDOR_XVF
    wr(s, R.DEVICE_ID, 7)  # read-only: ignored
    assert rd(s, R.DEVICE_ID) == 2
    assert regs.guest_errors == 1


def test_feature_words(dev):
    _, _, s = dev
    wr(s, R.DEVICE_FEATURES_SEL, 0)
    assert rd(s, R.DEVICE_FEATURES) == 0b101
    wr(s, R.DEVICE_FEATURES_SEL, 1)
    assert rd(s, R.DEVICE_FEATURES) == (FEATURES >> 32)
    wr(s, R.DEVICE_FEATURES_SEL, 7)
    assert rd(s, R.DEVICE_FEATURES) == 0


def test_features_ok_accepts_subset_and_refuses_others(dev):
    regs, model, s = dev
    negotiate(s, (1 << R.F_VERSION_1) | 1)
    assert rd(s, R.STATUS) & R.STATUS_FEATURES_OK
    assert model.calls[-1] == ("features_ok", (1 << R.F_VERSION_1) | 1)
    wr(s, R.STATUS, 0)
    negotiate(s, (1 << R.F_VERSION_1) | (1 << 3))  # bit 3 not offered
    assert not rd(s, R.STATUS) & R.STATUS_FEATURES_OK
    wr(s, R.STATUS, 0)
    negotiate(s, 1)  # no VERSION_1: a v2 device must refuse
    assert not rd(s, R.STATUS) & R.STATUS_FEATURES_OK
    assert regs.guest_errors == 2


def test_driver_features_ignored_after_features_ok(dev):
    regs, _, s = dev
    negotiate(s)
    wr(s, R.DRIVER_FEATURES_SEL, 0)
    wr(s, R.DRIVER_FEATURES, 1)
    assert regs.driver_features == 1 << R.F_VERSION_1


def test_queue_setup_and_driver_ok(dev):
    regs, model, s = dev
    negotiate(s)
    wr(s, R.QUEUE_SEL, 1)
    assert rd(s, R.QUEUE_NUM_MAX) == 16
    setup_queue(s, 1, 16)
    assert rd(s, R.QUEUE_READY) == 1
    assert rd(s, R.QUEUE_DESC_HIGH) == 1 and rd(s, R.QUEUE_DESC_LOW) == 0x1000
    assert regs.queues[1].desc == (1 << 32) | 0x1000
    wr(s, R.STATUS, rd(s, R.STATUS) | R.STATUS_DRIVER_OK)
    assert model.calls[-1][0] == "driver_ok" and model.calls[-1][1] == [False, True]
    # a queue made ready after DRIVER_OK is started at once
    setup_queue(s, 0, 8)
    assert model.calls[-1] == ("queue_ready", 0)


@pytest.mark.parametrize("num", [0, 3, 32])
def test_bad_queue_sizes_are_refused(dev, num):
    regs, _, s = dev
    negotiate(s)
    setup_queue(s, 0, num)
    assert rd(s, R.QUEUE_READY) == 0
    assert regs.guest_errors == 1


def test_out_of_range_queue_selector(dev):
    regs, _, s = dev
    wr(s, R.QUEUE_SEL, 99)
    assert rd(s, R.QUEUE_NUM_MAX) == 0
    assert rd(s, R.QUEUE_READY) == 0
    wr(s, R.QUEUE_NUM, 8)
    wr(s, R.QUEUE_READY, 1)
    assert regs.guest_errors == 2
    wr(s, R.QUEUE_SEL, 0)
    assert rd(s, R.QUEUE_NUM_MAX) == 8


def test_live_queue_addresses_are_frozen(dev):
    regs, _, s = dev
    negotiate(s)
    setup_queue(s, 0)
    wr(s, R.QUEUE_DESC_LOW, 0x9000)
    assert regs.queues[0].desc == (1 << 32) | 0x1000


def test_wrong_access_sizes(dev):
    regs, _, s = dev
    assert rd(s, R.MAGIC_VALUE, 2) == 0
    assert rd(s, R.MAGIC_VALUE + 1, 4) == 0
    wr(s, R.STATUS, 1, size=1)
    assert rd(s, R.STATUS) == 0
    assert regs.guest_errors == 3


def test_config_space_widths_and_generation(dev):
    regs, model, s = dev
    assert rd(s, R.CONFIG + 1, 1) == 1
    assert rd(s, R.CONFIG + 2, 2) == 0x0302
    assert rd(s, R.CONFIG, 8) == int.from_bytes(bytes(range(8)), "little")
    wr(s, R.CONFIG + 4, 0xAABBCCDD, 4)
    assert model.config[4:8] == bytes.fromhex("ddccbbaa")
    gen = rd(s, R.CONFIG_GENERATION)
    regs.config_changed()
    assert rd(s, R.CONFIG_GENERATION) == gen + 1
    assert rd(s, R.INTERRUPT_STATUS) & R.INT_CONFIG


def test_shared_memory_regions_absent(dev):
    _, _, s = dev
    wr(s, R.SHM_SEL, 0)
    assert rd(s, R.SHM_LEN_LOW) == 0xFFFFFFFF and rd(s, R.SHM_LEN_HIGH) == 0xFFFFFFFF


def test_notify_before_driver_ok_is_dropped(dev):
    _, _, s = dev
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        s.set_kick_fd(0, w)
        wr(s, R.QUEUE_NOTIFY, 0)
        assert s.ignored_notifies == 1 and s.notifies == 0
        negotiate(s)
        wr(s, R.STATUS, rd(s, R.STATUS) | R.STATUS_DRIVER_OK)
        s.set_kick_fd(0, w)
        wr(s, R.QUEUE_NOTIFY, 0)
        assert s.notifies == 1
        assert int.from_bytes(os.read(r, 8), "little") == 1
        wr(s, R.QUEUE_NOTIFY, 40)  # no such queue
        assert s.ignored_notifies == 2
    finally:
        os.close(r)
        os.close(w)


def test_interrupt_status_and_ack(dev):
    _, _, s = dev
    s.raise_interrupt(R.INT_VRING)
    s.raise_interrupt(R.INT_CONFIG)
    assert rd(s, R.INTERRUPT_STATUS) == 3
    wr(s, R.INTERRUPT_ACK, R.INT_VRING)
    assert rd(s, R.INTERRUPT_STATUS) == R.INT_CONFIG


def test_reset_clears_everything(dev):
    regs, model, s = dev
    negotiate(s)
    setup_queue(s, 0)
    s.raise_interrupt(1)
    wr(s, R.STATUS, 0)
    assert rd(s, R.STATUS) == 0
    assert rd(s, R.INTERRUPT_STATUS) == 0
    assert rd(s, R.QUEUE_READY) == 0
    assert regs.driver_features == 0
    assert ("device_reset",) in model.calls


def test_status_bits_cannot_be_cleared_without_reset(dev):
    regs, _, s = dev
    negotiate(s)
    wr(s, R.STATUS, R.STATUS_ACKNOWLEDGE)
    assert rd(s, R.STATUS) & R.STATUS_FEATURES_OK
    assert regs.guest_errors == 1


def test_driver_ok_failure_sets_needs_reset(dev):
    _regs, model, s = dev

    def boom(*_a):
        raise RuntimeError("backend gone")

    model.driver_ok = boom
    negotiate(s)
    wr(s, R.STATUS, rd(s, R.STATUS) | R.STATUS_DRIVER_OK)
    assert rd(s, R.STATUS) & R.STATUS_DEVICE_NEEDS_RESET
    assert rd(s, R.INTERRUPT_STATUS) & R.INT_CONFIG


def test_queue_reset_needs_feature(dev):
    _regs, model, s = dev
    negotiate(s)  # without RING_RESET
    setup_queue(s, 0)
    wr(s, R.QUEUE_RESET, 1)
    assert rd(s, R.QUEUE_READY) == 1
    wr(s, R.STATUS, 0)
    negotiate(s, (1 << R.F_VERSION_1) | (1 << R.F_RING_RESET))
    setup_queue(s, 0)
    wr(s, R.QUEUE_RESET, 1)
    assert rd(s, R.QUEUE_READY) == 0
    assert ("queue_reset", 0) in model.calls


def test_unknown_offsets(dev):
    regs, _, s = dev
    assert rd(s, 0x0E0) == 0
    wr(s, 0x0E0, 5)
    assert regs.guest_errors == 2
