"""Property: arbitrary reply bytes from a vhost-user backend never hurt the front-end.

Oracle in tests/fuzz/fuzz_vhost_reply.py (shared with the atheris target):
every call returns a well-formed value or raises VhostUserError (no other
exception), within the timeout, and no fd is left open afterwards (including
fds the hostile peer passed with its bytes). The wire decoders meant for
untrusted bytes get the same treatment.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_vhost_reply import (
    ALL_PROTOCOL,
    DROPPABLE,
    N_CALLS,
    VhostReplyHarness,
    call,
)
from xvf.errors import VhostUserError
from xvf.protocols import vhost_user_wire as W

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

requests = st.one_of(st.sampled_from([1, 3, 5, 11, 15, 17, 24, 40, 99]), st.integers(0, 2**32 - 1))
flags = st.one_of(st.sampled_from([5, 1, 4, 6, 0xD, 0x7]), st.integers(0, 2**32 - 1))
sizes = st.one_of(st.sampled_from([0, 4, 8, 12, 13, 20, 76, 2**31]), st.integers(0, 2**32 - 1))


@st.composite
def message(draw) -> bytes:
    """A reply-shaped message: header with plausible or wild fields, payload of any length."""
    size = draw(sizes)
    payload_len = draw(st.one_of(st.just(min(size, 300)), st.integers(0, 80)))
    payload = draw(st.binary(min_size=payload_len, max_size=payload_len))
    return struct.pack("<III", draw(requests), draw(flags), size) + payload


replies = st.one_of(
    st.lists(message(), max_size=6).map(b"".join),
    st.binary(max_size=200),
    st.tuples(st.lists(message(), max_size=4).map(b"".join), st.binary(max_size=30)).map(
        lambda t: t[0] + t[1]
    ),
)
one_call = st.tuples(st.integers(0, N_CALLS - 1), st.integers(0, 0xFFFF))
calls = st.lists(one_call, min_size=1, max_size=3)
protocols = st.builds(
    lambda drop: ALL_PROTOCOL & ~sum(f for i, f in enumerate(DROPPABLE) if drop >> i & 1),
    st.integers(0, 31),
)


@pytest.fixture
def harness():
    h = VhostReplyHarness()
    yield h
    h.close()


@SETTINGS
@given(reply=replies, calls=calls, n_fds=st.integers(0, 20), protocol=protocols)
def test_hostile_replies_then_eof(harness, reply, calls, n_fds, protocol):
    harness.check(reply, calls, n_fds, protocol)


@settings(SETTINGS, max_examples=8)
@given(reply=st.lists(message(), max_size=2).map(b"".join), calls=calls)
def test_hostile_replies_then_silence(harness, reply, calls):
    """The peer stays connected and says nothing more: the timeout ends every call."""
    harness.check(reply, calls, 0, ALL_PROTOCOL, hang_up=False, timeout=0.05)


def test_oracle_is_not_vacuous(harness):
    """A correct reply passes; a call returning an out-of-range value trips the oracle."""
    reply = W.encode_header(W.Request.GET_FEATURES, 5, 8) + W.encode_u64(1 << 32)
    harness.check(reply, [(0, 0)])

    class Lying:
        def get_features(self) -> int:
            return -1

    with pytest.raises(AssertionError):
        call(Lying(), 0, 0)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), xen=st.booleans())
def test_decoders_raise_only_vhost_user_error(data, xen):
    for decode in (lambda d: W.decode_mem_table(d, xen), W.decode_config):
        try:
            decode(data)
        except VhostUserError:
            pass


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10), xen=st.booleans(), body=st.binary(max_size=400))
def test_mem_table_decoder_on_counted_payloads(n, xen, body):
    data = W.MEM_HDR.pack(n, 0) + body
    try:
        regions = W.decode_mem_table(data, xen)
    except VhostUserError:
        return
    assert len(regions) == n <= W.MAX_MEM_REGIONS
