"""Property: no register-access sequence breaks the virtio-mmio register file's invariants.

The harness and invariants live in tests/fuzz/fuzz_registers.py (shared with
the atheris target): status only gains bits until a reset, DRIVER_OK implies
FEATURES_OK with accepted features, a ready queue always has a valid size and
ring addresses, InterruptStatus holds only defined bits, and no exception
escapes (the Cython layer would swallow it, so its error log is watched).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_registers import (
    EV_CONFIG,
    EV_NEEDS_RESET,
    EV_USED,
    FEATURES,
    QUEUE_SIZES,
    REGISTERS,
    RegisterHarness,
)
from xvf.protocols import virtio as R

SETTINGS = settings(max_examples=150, deadline=None)

status_values = st.sampled_from(
    [0, 1, 3, 11, 15, 7, 0x80, 0x40, 0x4F, 0xFF, 0x8B, 2, 4, 8]
) | st.integers(0, 2**32 - 1)
values = st.one_of(
    st.integers(0, 3),
    st.sampled_from([0x1000, 0x2000, 0x3000, 1, 2, 4, 8, 16, 256, 512, 0x8000, 2**32 - 1]),
    st.sampled_from([FEATURES & 0xFFFFFFFF, FEATURES >> 32, (FEATURES >> 32) | 0x80]),
    st.integers(0, 2**64 - 1),
)
offsets = st.one_of(st.sampled_from(REGISTERS), st.integers(0, 0x1FF), st.integers(0, 2**64 - 1))
sizes = st.one_of(st.just(4), st.sampled_from([0, 1, 2, 3, 8, 16]))
accesses = st.one_of(
    st.tuples(offsets, sizes, st.booleans(), values),
    st.tuples(st.just(R.STATUS), st.just(4), st.just(True), status_values),
    st.tuples(st.sampled_from([EV_USED, EV_CONFIG, EV_NEEDS_RESET]), st.just(0), st.just(False),
              st.just(0)),
)  # fmt: skip


def driver_bringup(queue: int, num: int) -> list[tuple[int, int, bool, int]]:
    """A well-behaved driver's prefix, so deep states (DRIVER_OK, live queues) get reached."""
    ops = [(R.STATUS, 4, True, 1), (R.STATUS, 4, True, 3)]
    for sel in (0, 1):
        ops += [(R.DRIVER_FEATURES_SEL, 4, True, sel)]
        ops += [(R.DRIVER_FEATURES, 4, True, (FEATURES >> 32 * sel) & 0xFFFFFFFF)]
    ops += [(R.STATUS, 4, True, 11), (R.QUEUE_SEL, 4, True, queue), (R.QUEUE_NUM, 4, True, num)]
    for off in (R.QUEUE_DESC_LOW, R.QUEUE_DRIVER_LOW, R.QUEUE_DEVICE_LOW):
        ops += [(off, 4, True, 0x1000 * (1 + off // 16))]
    return [*ops, (R.QUEUE_READY, 4, True, 1), (R.STATUS, 4, True, 15)]


@SETTINGS
@given(ops=st.lists(accesses, max_size=60), refuse=st.booleans(), fail=st.booleans())
def test_random_sequences(ops, refuse, fail):
    RegisterHarness(refuse, fail).run(ops)


@SETTINGS
@given(
    queue=st.integers(0, len(QUEUE_SIZES) + 1),
    num=st.sampled_from([0, 1, 2, 3, 6, 8, 255, 256, 512, 2**32 - 1]),
    ops=st.lists(accesses, max_size=40),
    fail=st.booleans(),
)
def test_sequences_after_a_bringup(queue, num, ops, fail):
    RegisterHarness(False, fail).run(driver_bringup(queue, num) + ops)


def test_bringup_reaches_a_live_queue():
    """The prefix is not vacuous: it gets a queue live and the device to DRIVER_OK."""
    h = RegisterHarness()
    h.run(driver_bringup(0, 8))
    assert h.state.status == 15 and h.regs.queues[0].ready


def test_invariants_can_fail():
    """A status that loses bits without a reset is caught."""
    h = RegisterHarness()
    h.run([(R.STATUS, 4, True, 3)])
    h.state.status = 1  # as if a write had cleared DRIVER
    with pytest.raises(AssertionError, match="status 0x3->0x1"):
        h.check(3, False, ("injected",))
    h.regs.queues[0].ready, h.regs.queues[0].num = True, 6
    h.state.status = 3
    with pytest.raises(AssertionError, match="ready with size 6"):
        h.check(3, False, ("injected",))
