"""Property: any bytes in an ioreq slot are answered safely by the Cython IoreqServer.

The oracle lives in tests/fuzz/fuzz_ioreq.py (shared with the atheris target):
slots not in IOREQ_READY are untouched; READY slots end in IORESP_READY with
every field but `data` kept; reads outside the window (or of a kind virtio-mmio
never sees: PIO, data_is_ptr, rep count, size 0 or > 8) answer all-ones; good
accesses reach the device exactly once, masked to their size; nothing outside
the 4 KiB page (canary pages on both sides of the mmap) changes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_ioreq import (
    BASE,
    NR_SLOTS,
    PAGE,
    SLOT,
    WINDOW,
    IoreqHarness,
    expected_slot,
    slot_bytes,
)

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
addrs = st.one_of(
    st.integers(BASE - 16, BASE + WINDOW + 16),  # around both window edges
    st.sampled_from([BASE + 0x50, BASE + 0x60, BASE + 0x64, BASE + 0x70, BASE + 0x1FF]),
    st.sampled_from([0, BASE - 1, 2**64 - 1, 2**64 - WINDOW, BASE + 2**63]),
    u64,
)
sizes = st.one_of(st.integers(0, 9), st.sampled_from([16, 2**31, 2**32 - 1]), u32)
counts = st.one_of(st.just(1), st.integers(0, 3), u32)
# state nibble mostly READY, sometimes every other value; other bits arbitrary
flags = st.builds(
    lambda state, high: (high & 0xF0) | state,
    st.one_of(st.just(1), st.integers(0, 15)),
    st.integers(0, 255),
)
types = st.one_of(st.just(1), st.integers(0, 255))
slots = st.builds(slot_bytes, addrs, u64, counts, sizes, u32, flags, types)
raw_slots = st.binary(min_size=32, max_size=32)


@pytest.fixture
def harness():
    h = IoreqHarness()
    yield h
    h.close()


@SETTINGS
@given(slot=st.one_of(slots, raw_slots), vcpu=st.integers(0, NR_SLOTS - 1), fill=st.binary())
def test_one_slot(harness, slot, vcpu, fill):
    page = bytearray((fill * (PAGE // max(1, len(fill)) + 1))[:PAGE] if fill else bytes(PAGE))
    page[vcpu * 32 : vcpu * 32 + 32] = slot
    harness.check_page(bytes(page), [vcpu])


@settings(SETTINGS, max_examples=100)
@given(
    kinds=st.lists(st.one_of(slots, raw_slots), min_size=1, max_size=8),
    order=st.lists(st.integers(0, 2 * NR_SLOTS), max_size=40),
)
def test_whole_page_any_order(harness, kinds, order):
    """Every vCPU slot hostile at once, served in any order, repeats and bad indices included."""
    page = b"".join(kinds[i % len(kinds)] for i in range(NR_SLOTS))
    harness.check_page(page, order)


@SETTINGS
@given(slot=slots)
def test_small_server_ignores_slots_past_nr_vcpus(slot):
    h = IoreqHarness(nr_vcpus=2)
    try:
        page = slot * NR_SLOTS
        h.check_page(page, [0, 1, 2, 3, NR_SLOTS - 1, 2**32 - 1])
    finally:
        h.close()


def test_oracle_can_fail(harness):
    """The oracle rejects a wrong answer: a bad read must be all-ones, not the device's value."""
    bad = SLOT.unpack(slot_bytes(BASE + WINDOW, 0, 1, 4, 0, 0x21, 1))
    want, log = expected_slot(bad, 0)
    assert want[1] == 2**64 - 1 and log == []
    good = SLOT.unpack(slot_bytes(BASE + 0x70, 0, 1, 2, 0, 0x21, 1))
    want, log = expected_slot(good, 0)
    assert log == [("r", 0x70, 2)] and want[1] < 2**16 and want[6] & 0xF == 3
