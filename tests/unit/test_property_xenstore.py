"""Property: hostile xenstore traffic, either direction, and hostile device nodes.

Oracles in tests/fuzz/fuzz_xenstore.py (shared with the atheris target):
- any byte stream a client sends the simulator's xenstored leaves the daemon
  running with no internal error, and another client still works;
- any bytes "xenstored" answers make `XenStore` calls return well-typed values
  or raise XenStoreError, nothing else;
- any values in a device's nodes parse to an in-range device or ConfigError.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_xenstore import (
    KEYS,
    N_CLIENT_CALLS,
    ClientHarness,
    DaemonHarness,
    check_discovery,
)
from xvf.protocols.xenstore import HEADER, PAYLOAD_MAX, XsType

SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

words = st.one_of(
    st.sampled_from(["/", "/local/domain/0", "a/b", "/a//b", "/a/", "@introduceDomain", "@x",
                     "T", "F", "0", "1", "65535", "65536", "-1", "\u00b2", "\u0663", "", "x" * 3100,
                     "/local/domain/0/backend/virtio/1/0/base", "12345678901234567890"]),
    st.text(max_size=20),
)  # fmt: skip


def nul_joined(ws: list[str]) -> bytes:
    return b"".join(w.encode("utf-8", "surrogatepass") + b"\0" for w in ws)


payloads = st.one_of(st.lists(words, max_size=4).map(nul_joined), st.binary(max_size=64))
types = st.one_of(st.sampled_from(list(XsType)), st.integers(0, 30), st.integers(0, 2**32 - 1))
tx_ids = st.one_of(st.just(0), st.integers(1, 4), st.integers(0, 2**32 - 1))


@st.composite
def message(draw) -> bytes:
    payload = draw(payloads)
    length = draw(
        st.one_of(st.just(len(payload)), st.integers(0, PAYLOAD_MAX + 2), st.just(2**32 - 1))
    )
    return HEADER.pack(draw(types), draw(st.integers(0, 2**32 - 1)), draw(tx_ids), length) + payload


streams = st.one_of(
    st.lists(message(), max_size=12).map(b"".join),
    st.binary(max_size=300),
)


@pytest.fixture(scope="module")
def daemon():
    h = DaemonHarness()
    yield h
    h.close()


@pytest.fixture(scope="module")
def client():
    h = ClientHarness()
    yield h
    h.close()


def domid_request(type_: int, arg: str) -> bytes:
    payload = arg.encode() + b"\0"
    return HEADER.pack(type_, 1, 0, len(payload)) + payload


# found by probing: non-ASCII digits ("\u00b2" passes str.isdigit, int() refuses it)
# were an internal error (EIO) in the daemon instead of EINVAL
@SETTINGS
@example(stream=domid_request(XsType.GET_DOMAIN_PATH, "\u00b2"), early=False)
@example(stream=domid_request(XsType.IS_DOMAIN_INTRODUCED, "\u00b2"), early=False)
@example(stream=domid_request(XsType.RELEASE, "\u0663"), early=False)
@given(stream=streams, early=st.booleans())
def test_daemon_survives_any_stream(daemon, stream, early):
    daemon.check(stream, early)


@settings(SETTINGS, max_examples=30)
@given(stream=st.lists(message(), min_size=1, max_size=6).map(b"".join))
def test_daemon_transactions_and_watches(daemon, stream):
    """Streams that open transactions and watches first, so later messages hit that state."""
    setup = b"".join(
        HEADER.pack(t, 1, 0, len(p)) + p
        for t, p in ((XsType.TRANSACTION_START, b"\0"), (XsType.WATCH, b"/\0tok\0"),
                     (XsType.WRITE, b"/fuzz/x\0v"))
    )  # fmt: skip
    daemon.check(setup + stream, False)


# replies the client must survive: plausible replies to its first request ids
@st.composite
def reply(draw) -> bytes:
    payload = draw(payloads)
    type_ = draw(st.one_of(st.sampled_from([XsType.ERROR, XsType.WATCH_EVENT]), types))
    req_id = draw(st.one_of(st.integers(1, 4), st.integers(0, 2**32 - 1)))
    length = draw(st.one_of(st.just(len(payload)), st.integers(0, PAYLOAD_MAX + 2)))
    return HEADER.pack(type_ & 0xFFFFFFFF, req_id, 0, length) + payload


# found by this test: an empty GET_DOMAIN_PATH reply (IndexError) and a
# DIRECTORY_PART generation that is not UTF-8 (UnicodeDecodeError)
@SETTINGS
@example(stream=HEADER.pack(XsType.GET_DOMAIN_PATH, 1, 0, 0), calls=[5])
@example(stream=HEADER.pack(XsType.DIRECTORY_PART, 1, 0, 3) + b"\xff\0\0", calls=[10])
# a device directory entry "\u00b2" (isdigit, but int() refuses it) crashed discovery
@example(stream=HEADER.pack(XsType.DIRECTORY, 1, 0, 3) + "\u00b2\0".encode(), calls=[11])
@given(
    stream=st.one_of(st.lists(reply(), max_size=6).map(b"".join), st.binary(max_size=200)),
    calls=st.lists(st.integers(0, N_CLIENT_CALLS - 1), min_size=1, max_size=3),
)
def test_client_survives_any_reply(client, stream, calls):
    client.check(stream, calls)


values = st.one_of(
    st.none(),
    st.sampled_from(["virtio,device22", "virtio,device1a", "virtio,deviceFF", "virtio,device",
                     "mmio", "pci", "0x2000000", "33000000", "0x20fffe00", "0x2000200",
                     "0x2_000_000", "0x-200", " 0x2000000 ", "0100000000", "\u0663\u0663", "33",
                     "43", "44", "0", "1", " 1", "yes", "\udcff"]),
    st.text(max_size=12),
)  # fmt: skip


GOOD = {"type": "virtio,device22", "transport": "mmio", "base": "0x2000000", "irq": "33"}


# accepted before as numbers: Arabic-Indic digits, underscores, signs inside hex
@settings(max_examples=300, deadline=None)
@example(vals={**GOOD, "irq": "\u0663\u0663", "grant_usage": None}, backend=0)
@example(vals={**GOOD, "base": "0x2_000_000", "grant_usage": None}, backend=0)
@example(vals={**GOOD, "base": "0x+2000000", "grant_usage": None}, backend=0)
@given(vals=st.fixed_dictionaries({k: values for k in KEYS}), backend=st.integers(0, 2))
def test_device_nodes_parse_or_config_error(vals, backend):
    check_discovery(vals, backend)


def test_device_oracle_is_not_vacuous():
    check_discovery(
        {"type": "virtio,device22", "transport": "mmio", "base": "0x2000000", "irq": "33",
         "grant_usage": "1"}
    )  # fmt: skip
    from tests.fuzz.fuzz_xenstore import assert_valid_device
    from xvf.daemon.discovery import parse_device

    dev = parse_device("/p", 1, 0, {"type": "virtio,device22", "transport": "mmio",
                                    "base": "0x2000000", "irq": "33"}, 0)  # fmt: skip
    assert_valid_device(dev)
    with pytest.raises(AssertionError):
        assert_valid_device(dev.__class__(**{**dev.__dict__, "irq": 44}))


def test_client_directory_part_without_progress_ends(client):
    """A xenstored answering every DIRECTORY_PART with an empty, unfinished chunk
    must not keep the client asking forever (it looped before)."""
    import socket
    import threading

    from xvf.errors import XenStoreError
    from xvf.protocols.xenstore import XenStore

    xs = XenStore(client.path, timeout=5.0)
    conn, _ = client.srv.accept()
    answered = 0

    def peer() -> None:
        nonlocal answered
        conn.settimeout(5.0)
        try:
            while answered < 200:
                head = conn.recv(16, socket.MSG_WAITALL)
                if len(head) < 16:
                    return
                _, req_id, _, length = HEADER.unpack(head)
                if length:
                    conn.recv(length, socket.MSG_WAITALL)
                conn.sendall(HEADER.pack(XsType.DIRECTORY_PART, req_id, 0, 2) + b"7\0")
                answered += 1
        except OSError:
            pass
        finally:
            conn.close()

    t = threading.Thread(target=peer)
    t.start()
    try:
        with pytest.raises(XenStoreError):
            xs._directory_part("/a", 0)
    finally:
        xs.close()
        t.join()
    assert answered <= 2
