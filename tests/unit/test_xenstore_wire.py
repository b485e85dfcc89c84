"""xenstore wire codec and the client's handling of broken or hostile peers."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xvf.errors import PlatformUnavailable, XenStoreError
from xvf.platform.sim.xenstored import XenStored
from xvf.protocols import xenstore
from xvf.protocols.xenstore import (
    HEADER,
    PAYLOAD_MAX,
    XSD_ERRORS,
    XenStore,
    XenStoreRequestError,
    XsType,
    decode,
    encode,
    join_strings,
    split_strings,
)

XS_WIRE_H = "/usr/include/xen/io/xs_wire.h"

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
message = st.tuples(u32, u32, u32, st.binary(max_size=PAYLOAD_MAX))


@given(st.lists(message, max_size=8), st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_codec_round_trip_with_arbitrary_split(msgs, data):
    stream = b"".join(encode(t, r, x, p) for t, r, x, p in msgs)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    first, rest = decode(stream[:cut])
    second, leftover = decode(rest + stream[cut:])
    assert leftover == b""
    assert [tuple(m) for m in first + second] == [tuple(m) for m in msgs]


def test_header_layout_is_four_native_u32():
    raw = encode(XsType.READ, 7, 9, b"/a\0")
    assert len(raw) == 16 + 3
    assert HEADER.unpack_from(raw) == (2, 7, 9, 3)


def test_decode_rejects_oversized_length():
    bad = HEADER.pack(XsType.READ, 1, 0, PAYLOAD_MAX + 1) + b"x" * 10
    with pytest.raises(XenStoreError, match="4097"):
        decode(bad)


def test_encode_refuses_oversized_payload():
    with pytest.raises(XenStoreError, match="E2BIG"):
        encode(XsType.WRITE, 1, 0, b"x" * (PAYLOAD_MAX + 1))


# Surrogates are not text xenstore can carry (it speaks UTF-8); they are excluded.
@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
            max_size=20,
        )
    )
)
def test_strings_round_trip(items):
    assert split_strings(join_strings(*items)) == items


@pytest.mark.skipif(not os.path.exists(XS_WIRE_H), reason=f"{XS_WIRE_H} missing (libxen-dev)")
def test_type_numbers_and_errors_match_xs_wire_h():
    text = open(XS_WIRE_H).read()
    body = re.search(r"enum xsd_sockmsg_type\s*\{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    body = re.sub(r"#define.*", "", body)
    value = -1
    found = {}
    for entry in (e.strip() for e in body.split(",")):
        if not entry:
            continue
        name, _, expr = entry.partition("=")
        name = name.strip()
        if expr:
            expr = expr.strip()
            m = re.fullmatch(r"(\w+)\s*\+\s*(\d+)", expr)
            value = found[m.group(1)] + int(m.group(2)) if m else int(expr, 0)
        else:
            value += 1
        found[name] = value
    for t in XsType:
        assert found[f"XS_{t.name}"] == t.value, t.name
    assert found["XS_TYPE_COUNT"] == xenstore.XS_TYPE_COUNT
    errs = re.findall(r"XSD_ERROR\((E\w+)\)", text)
    assert tuple(errs) == XSD_ERRORS


# -- the client against scripted peers (hostile input a real xenstored never sends) ---


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="xvf-xsw-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class ScriptedPeer:
    """Accepts one client and answers each request with `respond(header, payload)`."""

    def __init__(self, path: str, respond) -> None:
        self.lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lst.bind(path)
        self.lst.listen(1)
        self.respond = respond
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.lst.accept()
        self.conn = conn
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            msgs, buf = decode(buf)
            for m in msgs:
                out = self.respond(m)
                if out is None:
                    conn.close()
                    return
                conn.sendall(out)

    def close(self) -> None:
        # Shut down, not closed under it: the thread's recv() returns b"" and it ends,
        # where closing the fd it is blocked on made that recv fail with EBADF.
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer closed it itself
        self.thread.join(timeout=5)
        if self.conn is not None:
            self.conn.close()
        self.lst.close()


def test_peer_closing_gives_error_not_hang(sock_dir):
    path = os.path.join(sock_dir, "s")
    peer = ScriptedPeer(path, lambda m: None)
    xs = XenStore(path, timeout=5)
    try:
        with pytest.raises(XenStoreError, match="closed"):
            xs.read("/a")
        with pytest.raises(XenStoreError, match="broken"):
            xs.read("/a")  # and it stays unusable
    finally:
        xs.close()
        peer.close()


def test_silent_peer_times_out(sock_dir):
    path = os.path.join(sock_dir, "s")
    peer = ScriptedPeer(path, lambda m: b"")
    xs = XenStore(path, timeout=0.2)
    try:
        with pytest.raises(XenStoreError, match="no reply"):
            xs.read("/a")
    finally:
        xs.close()
        peer.close()


def test_oversized_reply_header_breaks_connection(sock_dir):
    path = os.path.join(sock_dir, "s")
    peer = ScriptedPeer(path, lambda m: HEADER.pack(m.type, m.req_id, 0, 1 << 20))
    xs = XenStore(path, timeout=5)
    try:
        with pytest.raises(XenStoreError, match="payload bytes"):
            xs.read("/a")
    finally:
        xs.close()
        peer.close()


def test_wrong_reply_type_is_an_error(sock_dir):
    path = os.path.join(sock_dir, "s")
    peer = ScriptedPeer(path, lambda m: encode(XsType.DIRECTORY, m.req_id, 0, b"x\0"))
    xs = XenStore(path, timeout=5)
    try:
        with pytest.raises(XenStoreError, match="reply type"):
            xs.read("/a")
    finally:
        xs.close()
        peer.close()


def test_events_and_stale_replies_before_the_reply(sock_dir):
    """Watch events ahead of a reply are kept; replies to other req_ids are skipped."""
    path = os.path.join(sock_dir, "s")

    def respond(m):
        return (
            encode(XsType.WATCH_EVENT, 0, 0, b"/w/x\0tok\0")
            + encode(XsType.READ, m.req_id + 1000, 0, b"stale")
            + encode(XsType.READ, m.req_id, 0, b"value")
            + encode(XsType.WATCH_EVENT, 0, 0, b"/w/y\0tok\0")
        )

    peer = ScriptedPeer(path, respond)
    xs = XenStore(path, timeout=5)
    try:
        assert xs.read("/a") == "value"
        events = xs.wait_events(5)
        while len(events) < 2:
            more = xs.wait_events(5)
            assert more, "second event never arrived"
            events += more
        assert events == [("/w/x", "tok"), ("/w/y", "tok")]
    finally:
        xs.close()
        peer.close()


def test_error_reply_carries_errno_name(sock_dir):
    path = os.path.join(sock_dir, "s")
    peer = ScriptedPeer(path, lambda m: encode(XsType.ERROR, m.req_id, 0, b"EACCES\0"))
    xs = XenStore(path, timeout=5)
    try:
        with pytest.raises(XenStoreRequestError, match="EACCES") as ei:
            xs.write("/a", "1")
        assert ei.value.name == "EACCES"
        # An error reply does not break the connection.
        with pytest.raises(XenStoreRequestError):
            xs.mkdir("/b")
    finally:
        xs.close()
        peer.close()


def test_no_daemon_anywhere_is_platform_unavailable(sock_dir, monkeypatch):
    missing = os.path.join(sock_dir, "none")
    monkeypatch.setenv("XENSTORED_PATH", missing)
    monkeypatch.setattr(xenstore, "DEFAULT_PATHS", (os.path.join(sock_dir, "none2"),))
    with pytest.raises(PlatformUnavailable, match="XENSTORED_PATH") as ei:
        XenStore()
    assert missing in str(ei.value)
    with pytest.raises(PlatformUnavailable):
        XenStore(missing)


def test_env_path_is_used(sock_dir, monkeypatch):
    path = os.path.join(sock_dir, "xs.sock")
    with XenStored(path):
        monkeypatch.setenv("XENSTORED_PATH", path)
        with XenStore() as xs:
            assert xs.path == path
            assert xs.read("/local/domain/0/name") == "Domain-0"


def test_daemon_stopping_breaks_client(sock_dir):
    path = os.path.join(sock_dir, "xs.sock")
    daemon = XenStored(path).start()
    xs = XenStore(path, timeout=5)
    try:
        xs.write("/a", "1")
        daemon.stop()
        with pytest.raises(XenStoreError):
            xs.read("/a")
        with pytest.raises(XenStoreError):
            xs.pending_events()
    finally:
        xs.close()
        daemon.stop()


def test_events_buffered_during_a_request_are_flagged(sock_dir):
    """An event read while waiting for a reply leaves the fd quiet: has_pending_events says so."""
    import select

    path = os.path.join(sock_dir, "xs.sock")
    with XenStored(path), XenStore(path, timeout=5) as xs, XenStore(path, timeout=5) as other:
        xs.watch("/ev", "t")
        assert xs.wait_events(5) == [("/ev", "t")]
        assert not xs.has_pending_events()
        other.write("/ev/a", "1")
        # Once the event is on xs's socket, any request reads it in ahead of its reply.
        assert select.select([xs.fileno()], [], [], 5)[0]
        assert xs.read("/ev/a") == "1"
        assert xs.has_pending_events()
        assert not select.select([xs.fileno()], [], [], 0)[0]  # the fd no longer says so
        assert xs.pending_events() == [("/ev/a", "t")]
        assert not xs.has_pending_events()
