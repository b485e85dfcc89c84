"""The software Xen's control socket (its privcmd/evtchn/gntdev) survives any request bytes."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xvf.platform.sim import control as C


@pytest.fixture
def guest(hypervisor):
    return hypervisor.create_domain("target", memory_mib=4, vcpus=2)


ops = st.sampled_from([0, *range(1, 11), 99, 0xFFFFFFFF])


@st.composite
def dm_op(draw) -> bytes:
    """A dm_op aimed at the live domain, with any op number and argument bytes."""
    body = struct.pack("<II", draw(st.integers(0, 25)), 0) + draw(
        st.binary(min_size=24, max_size=24)
    )
    payload = C.DM_OP_PREFIX.pack(draw(st.sampled_from([1, 1, 7, 0xFFFF])), 0, 0) + body
    return C.HEADER.pack(C.OP_DM_OP, len(payload)) + payload


@st.composite
def request(draw) -> bytes:
    payload = draw(st.binary(max_size=96))
    length = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32 - 1)))
    return C.HEADER.pack(draw(ops), length) + payload


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(dm_op(), request(), st.binary(max_size=40)), min_size=1, max_size=6))
def test_any_request_gets_an_answer_and_the_socket_keeps_serving(guest, messages):
    hypervisor = guest.hv
    dom_ids = list(hypervisor.domains)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(hypervisor.control_path)
    try:
        for msg in messages:
            if not msg:
                continue
            sock.send(msg)
            data, fds = C.recv_message(sock)
            for fd in fds:
                os.close(fd)
            assert len(data) >= 4, "every request gets at least a return code"
            (rc,) = struct.unpack_from("<i", data)
            assert rc <= 0
    finally:
        sock.close()
    # the hypervisor still serves a well-formed request on a new connection
    client = C.ControlClient(hypervisor.control_path)
    try:
        _reply, fds = client.call(C.OP_EVTCHN_OPEN)
        for fd in fds:
            os.close(fd)
    finally:
        client.close()
    assert list(hypervisor.domains) == dom_ids
