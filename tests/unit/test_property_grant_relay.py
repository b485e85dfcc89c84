"""Property: hostile descriptor tables and avail rings in grant mode are relayed safely.

Oracle in tests/fuzz/fuzz_grant_descriptors.py (shared with the atheris
target): every avail entry before the ring breaks is completed exactly once
(len 0 when refused), nothing escapes the shadow memory, guest RAM outside the pages the
guest granted writable is unchanged byte for byte (read-only grants, desc
and avail rings, ungranted pages), and no grant stays mapped after stop().
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_grant_descriptors import KINDS, NUM, PAGE, GrantRelayHarness

SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

lengths = st.one_of(
    st.sampled_from([1, 16, 512, PAGE, PAGE + 1, 2 * PAGE, 3 * PAGE, 0, 2**32 - 1, 2**31]),
    st.integers(0, 2**32 - 1),
)
flag_values = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
entry = st.tuples(
    st.integers(0, len(KINDS) - 1),
    st.one_of(st.integers(PAGE // 2 - 64, PAGE // 2 + 64), st.integers(0, 0xFFFF)),
    lengths,
    flag_values,
    st.one_of(st.integers(0, NUM + 1), st.integers(0, 0xFFFF)),
)
descs = st.lists(entry, min_size=NUM, max_size=NUM)
tables = st.lists(entry, max_size=NUM + 2)
heads = st.lists(st.one_of(st.integers(0, NUM - 1), st.integers(0, 0xFFFF)), min_size=NUM,
                 max_size=NUM)  # fmt: skip
written = st.sampled_from([0, 1, 100, PAGE, 3 * PAGE, 2**32 - 1])


@pytest.fixture(scope="module")
def relay_env():
    h = GrantRelayHarness()
    yield h
    h.close()


@SETTINGS
@given(descs=descs, table=tables, idx=st.integers(0, 3 * NUM), heads=heads, written=written)
def test_any_descriptors_any_avail(relay_env, descs, table, idx, heads, written):
    relay_env.check(descs, table, idx, heads, written)


W0, W1, R0, TABLE, REF, PLAIN, RAW = range(7)
MID = PAGE // 2  # address offset that lands on a buffer's first byte


@pytest.mark.parametrize(
    "name, descs, table",
    [
        ("loop", [(R0, MID, 16, 1, 1), (W0, MID, 16, 3, 0)] + [(W0, MID, 16, 2, 0)] * 6, []),
        ("self loop", [(W0, MID, 16, 3, 0)] * NUM, []),
        ("next out of range", [(R0, MID, 16, 1, NUM + 1)] * NUM, []),
        ("huge length", [(W0, MID, 2**32 - 1, 2, 0)] * NUM, []),
        ("past the buffer", [(R0, MID + PAGE - 8, 64, 0, 0)] * NUM, []),
        ("before the buffer", [(W1, MID - 8, 64, 2, 0)] * NUM, []),
        ("write to read-only", [(R0, MID, 64, 2, 0)] * NUM, []),
        ("not a grant", [(PLAIN, 0, 64, 2, 0)] * NUM, []),
        ("indirect loop", [(TABLE, MID, 32, 4, 0)] * NUM, [(W0, MID, 8, 3, 1), (W0, MID, 8, 3, 0)]),
        ("nested indirect", [(TABLE, MID, 16, 4, 0)] * NUM, [(TABLE, MID, 16, 4, 0)]),
        ("indirect past table", [(TABLE, MID + PAGE - 16, 64, 4, 0)] * NUM, []),
        ("good", [(R0, MID, 64, 1, 1), (W1, MID, 2 * PAGE, 2, 0)] * 4, []),
    ],
)
def test_known_hostile_chains(relay_env, name, descs, table):
    relay_env.check(descs, table, NUM, list(range(NUM)), 3 * PAGE)


def test_oracle_sees_a_stray_write(relay_env):
    """Writing one byte of a read-only buffer behind the relay's back is caught."""
    h = relay_env
    gpa = h.bufs["r0"][0]
    import os

    before = os.pread(h.dom.ram.fd, h.dom.ram.size, 0)
    h.dom.ram.write(gpa + 5, b"\x01")
    try:
        with pytest.raises(AssertionError, match="changed"):
            h.assert_only_writable_changed(before, os.pread(h.dom.ram.fd, h.dom.ram.size, 0))
    finally:
        h.dom.ram.write(gpa + 5, b"\x00")
