"""The simulator's xenstored: semantics, watches, transactions, many clients, hostile bytes."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xvf.errors import XenStoreError
from xvf.platform.sim.xenstored import XenStored
from xvf.protocols.xenstore import (
    HEADER,
    HEADER_SIZE,
    PAYLOAD_MAX,
    XenStore,
    XenStoreRequestError,
    XsMessage,
    XsType,
    encode,
)


def events_until(client: XenStore, n: int) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    while len(got) < n:
        more = client.wait_events(5)
        if not more:
            break
        got += more
    return got


def err(fn, *args) -> str:
    with pytest.raises(XenStoreRequestError) as ei:
        fn(*args)
    return ei.value.name


# -- basic node operations ----------------------------------------------------------


def test_write_creates_ancestors_and_reads_back_bytes(xs):
    xs.write("/a/b/c", b"\x00\xffbin")
    assert xs.read_bytes("/a/b/c") == b"\x00\xffbin"
    assert xs.read("/a/b") == ""
    assert xs.directory("/a") == ["b"]
    assert xs.read("/a/nope") is None
    assert xs.directory("/a/nope") == []


def test_directory_keeps_creation_order(xs):
    for name in ("z", "a", "m"):
        xs.write(f"/d/{name}", "1")
    assert xs.directory("/d") == ["z", "a", "m"]


def test_mkdir_is_idempotent_and_keeps_value(xs):
    xs.write("/m", "v")
    xs.mkdir("/m")
    assert xs.read("/m") == "v"
    xs.mkdir("/m/n/o")
    assert xs.directory("/m/n") == ["o"]


def test_rm_is_recursive_and_tolerates_missing_leaf(xs):
    xs.write("/r/a/b", "1")
    xs.write("/r/c", "2")
    xs.rm("/r/a")
    assert xs.read("/r/a/b") is None
    assert xs.directory("/r") == ["c"]
    xs.rm("/r/missing")  # parent exists: fine, like cxenstored
    assert err(xs.rm, "/nothere/child") == "ENOENT"
    assert err(xs.rm, "/") == "EINVAL"


def test_relative_paths_are_under_dom0(xs):
    xs.write("rel/x", "1")
    assert xs.read("/local/domain/0/rel/x") == "1"
    assert xs.read("rel/x") == "1"


@pytest.mark.parametrize("bad", ["", "/a//b", "/a/", "/a b", "/a\x01", "/ä", "a//b"])
def test_invalid_paths_are_einval(xs, bad):
    assert err(xs.read, bad) == "EINVAL"
    assert err(xs.write, bad, "v") == "EINVAL"


def test_permissions_stored_inherited_validated(xs):
    xs.write("/p", "")
    xs.set_perms("/p", ["n5", "r0", "b7"])
    assert xs.get_perms("/p") == ["n5", "r0", "b7"]
    xs.write("/p/child", "x")
    assert xs.get_perms("/p/child") == ["n5", "r0", "b7"]
    for bad in (["x1"], ["n"], ["r-1"], ["nabc"]):
        assert err(xs.set_perms, "/p", bad) == "EINVAL"
    assert err(xs.set_perms, "/nope", ["n0"]) == "ENOENT"
    assert err(xs.get_perms, "/nope") == "ENOENT"


def test_domain_requests(xsd, xs):
    assert xs.get_domain_path(7) == "/local/domain/7"
    assert xs.is_domain_introduced(0)
    assert not xs.is_domain_introduced(7)
    xs.introduce(7, 1234, 5)
    assert xs.is_domain_introduced(7)
    xs.release(7)
    assert not xs.is_domain_introduced(7)
    assert err(xs.release, 7) == "ENOENT"
    assert err(xs.get_domain_path, "x") == "EINVAL"


def test_large_directory_falls_back_to_directory_part(xs):
    names = [f"child-with-a-rather-long-name-{i:04d}" for i in range(300)]  # > 4096 bytes
    tx = xs.transaction_start()
    for n in names:
        xs.write(f"/big/{n}", "", tx)
    assert xs.transaction_end(tx)
    raw = XenStore.__dict__["_request"]
    with pytest.raises(XenStoreRequestError, match="E2BIG"):
        raw(xs, XsType.DIRECTORY, b"/big\0", 0, "/big")
    assert xs.directory("/big") == names


# -- watches -----------------------------------------------------------------------


def test_watch_fires_once_on_registration(xs):
    xs.watch("/nonexistent/yet", "t1")
    assert events_until(xs, 1) == [("/nonexistent/yet", "t1")]
    assert xs.pending_events() == []


def test_watch_fires_for_node_and_descendants_not_siblings(xsd, xs):
    other = XenStore(xsd.path, timeout=5)
    try:
        xs.watch("/w", "tok")
        events_until(xs, 1)
        other.write("/w/a/b", "1")
        other.write("/wx", "sibling-prefix")  # /wx is not below /w
        other.write("/w", "self")
        other.mkdir("/w/a/b")  # exists: no event
        other.mkdir("/w/new")
        assert events_until(xs, 3) == [("/w/a/b", "tok"), ("/w", "tok"), ("/w/new", "tok")]
        other.write("/w/z", "1")  # a later event proves nothing else was queued before it
        assert events_until(xs, 1) == [("/w/z", "tok")]
    finally:
        other.close()


def test_rm_fires_for_removed_node_and_watches_below(xsd, xs):
    xs.write("/t/a/b/c", "1")
    xs.watch("/t/a/b/c", "deep")
    xs.watch("/t", "top")
    events_until(xs, 2)
    xs.rm("/t/a")
    got = events_until(xs, 2)
    assert sorted(got) == [("/t/a", "top"), ("/t/a/b/c", "deep")]


def test_unwatch_reset_and_duplicates(xs):
    xs.watch("/u", "a")
    assert err(xs.watch, "/u", "a") == "EEXIST"
    xs.watch("/u", "b")
    events_until(xs, 2)
    xs.unwatch("/u", "a")
    assert err(xs.unwatch, "/u", "a") == "ENOENT"
    xs.write("/u", "1")
    assert events_until(xs, 1) == [("/u", "b")]
    xs.reset_watches()
    xs.write("/u", "2")
    xs.watch("/marker", "m")  # its initial event comes after anything /u would have fired
    assert events_until(xs, 1) == [("/marker", "m")]


def test_relative_watch_reports_relative_path(xs):
    xs.watch("data", "rel")
    assert events_until(xs, 1) == [("data", "rel")]
    xs.write("/local/domain/0/data/x", "1")
    assert events_until(xs, 1) == [("data/x", "rel")]


def test_special_domain_watches(xsd, xs):
    xs.watch("@introduceDomain", "in")
    xs.watch("@releaseDomain", "out")
    assert sorted(events_until(xs, 2)) == [("@introduceDomain", "in"), ("@releaseDomain", "out")]
    xs.write("/local/domain/3/name", "guest")
    xsd.introduce_domain(3)
    assert events_until(xs, 1) == [("@introduceDomain", "in")]
    xsd.release_domain(3)
    assert events_until(xs, 1) == [("@releaseDomain", "out")]
    assert xs.read("/local/domain/3/name") is None
    assert not xs.is_domain_introduced(3)


# -- transactions --------------------------------------------------------------------


def test_transaction_isolation_and_commit(xsd, xs):
    other = XenStore(xsd.path, timeout=5)
    try:
        xs.write("/tx/a", "old")
        other.watch("/tx", "w")
        events_until(other, 1)
        tx = xs.transaction_start()
        xs.write("/tx/a", "new", tx)
        xs.write("/tx/b", "made", tx)
        assert xs.read("/tx/a", tx) == "new"
        assert other.read("/tx/a") == "old"
        assert other.read("/tx/b") is None
        assert other.pending_events() == []  # nothing fires before commit
        assert xs.transaction_end(tx)
        assert other.read("/tx/a") == "new"
        assert other.read("/tx/b") == "made"
        assert events_until(other, 2) == [("/tx/a", "w"), ("/tx/b", "w")]
    finally:
        other.close()


def test_transaction_sees_snapshot_and_abort_discards(xsd, xs):
    other = XenStore(xsd.path, timeout=5)
    try:
        xs.write("/s/v", "1")
        tx = xs.transaction_start()
        other.write("/s/v", "2")
        assert xs.read("/s/v", tx) == "1"  # snapshot at start
        xs.write("/s/w", "x", tx)
        assert xs.transaction_end(tx, commit=False)
        assert xs.read("/s/w") is None
    finally:
        other.close()


def test_conflict_gives_eagain_and_retry_succeeds(xsd, xs):
    other = XenStore(xsd.path, timeout=5)
    try:
        xs.write("/c/counter", "0")
        tx = xs.transaction_start()
        value = int(xs.read("/c/counter", tx))
        other.write("/c/counter", "10")
        xs.write("/c/counter", str(value + 1), tx)
        assert xs.transaction_end(tx) is False
        assert xs.read("/c/counter") == "10"
        tx = xs.transaction_start()
        xs.write("/c/counter", str(int(xs.read("/c/counter", tx)) + 1), tx)
        assert xs.transaction_end(tx) is True
        assert xs.read("/c/counter") == "11"
    finally:
        other.close()


def test_reading_a_missing_node_that_appears_conflicts(xsd, xs):
    other = XenStore(xsd.path, timeout=5)
    try:
        tx = xs.transaction_start()
        assert xs.read("/late", tx) is None
        other.write("/late", "here")
        xs.write("/elsewhere", "x", tx)
        assert xs.transaction_end(tx) is False
        assert xs.read("/elsewhere") is None
    finally:
        other.close()


def test_disjoint_transactions_both_commit(xsd, xs):
    other = XenStore(xsd.path, timeout=5)
    try:
        xs.write("/d1/x", "")
        xs.write("/d2/x", "")
        t1 = xs.transaction_start()
        t2 = other.transaction_start()
        xs.write("/d1/x", "a", t1)
        other.write("/d2/x", "b", t2)
        assert xs.transaction_end(t1)
        assert other.transaction_end(t2)
        assert (xs.read("/d1/x"), xs.read("/d2/x")) == ("a", "b")
    finally:
        other.close()


def test_unknown_transaction_is_enoent(xs):
    assert xs.read("/a", 999) is None  # the client maps ENOENT to None...
    assert err(xs.write, "/a", "1", 999) == "ENOENT"  # ...the unknown tx is the cause
    assert xs.read("/a") is None
    assert err(xs.transaction_end, 999) == "ENOENT"
    tx = xs.transaction_start()
    assert xs.transaction_end(tx)
    assert err(xs.transaction_end, tx) == "ENOENT"  # already ended


def test_transactions_are_per_connection(xsd, xs):
    other = XenStore(xsd.path, timeout=5)
    try:
        tx = xs.transaction_start()
        assert err(other.write, "/a", "1", tx) == "ENOENT"
        assert xs.transaction_end(tx, commit=False)
    finally:
        other.close()


# -- many clients ---------------------------------------------------------------------


def test_many_concurrent_clients(xsd, xs):
    n_clients, n_writes = 16, 40
    xs.watch("/many", "w")
    events_until(xs, 1)
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with XenStore(xsd.path, timeout=10) as c:
                for j in range(n_writes):
                    c.write(f"/many/{i}/{j}", f"{i}:{j}")
                    assert c.read(f"/many/{i}/{j}") == f"{i}:{j}"
                while True:  # a contended counter through transactions
                    tx = c.transaction_start()
                    cur = int(c.read("/many-counter", tx) or "0")
                    c.write("/many-counter", str(cur + 1), tx)
                    if c.transaction_end(tx):
                        break
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures
    assert xs.read("/many-counter") == str(n_clients)
    for i in range(n_clients):
        assert len(xs.directory(f"/many/{i}")) == n_writes
    got = events_until(xs, n_clients * n_writes)
    assert len(got) == n_clients * n_writes
    assert {p for p, _ in got} == {
        f"/many/{i}/{j}" for i in range(n_clients) for j in range(n_writes)
    }


# -- hostile byte streams ---------------------------------------------------------------


def raw_conn(xsd) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(xsd.path)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def recv_msg(s: socket.socket) -> XsMessage:
    t, r, x, n = HEADER.unpack(recv_exact(s, HEADER_SIZE))
    return XsMessage(t, r, x, recv_exact(s, n))


def ask(s: socket.socket, type_: int, payload: bytes, req_id: int = 42, tx: int = 0) -> XsMessage:
    """Send one request; return its reply, skipping watch events queued ahead of it."""
    s.sendall(HEADER.pack(type_ & 0xFFFFFFFF, req_id, tx, len(payload)) + payload)
    while True:
        msg = recv_msg(s)
        if msg.type != XsType.WATCH_EVENT:
            return msg


@pytest.mark.parametrize(
    ("type_", "payload", "expect"),
    [
        (XsType.READ, b"/a", b"EINVAL\0"),  # no NUL
        (XsType.READ, b"/a\0extra\0", b"EINVAL\0"),  # two strings for a one-arg request
        (XsType.READ, b"", b"EINVAL\0"),
        (XsType.WRITE, b"/a", b"EINVAL\0"),  # no NUL between path and value
        (XsType.WATCH, b"/a\0", b"EINVAL\0"),  # no token
        (XsType.TRANSACTION_END, b"X\0", b"EINVAL\0"),
        (XsType.SET_PERMS, b"/\0", b"EINVAL\0"),
        (XsType.INTRODUCE, b"1\0", b"EINVAL\0"),
        (XsType.DIRECTORY_PART, b"/\0x\0", b"EINVAL\0"),
        (XsType.CONTROL, b"print\0hi\0", b"ENOSYS\0"),
        (XsType.WATCH_EVENT, b"/a\0t\0", b"ENOSYS\0"),
        (XsType.ERROR, b"EINVAL\0", b"ENOSYS\0"),
        (20, b"", b"ENOSYS\0"),  # XS_RESTRICT, removed
        (XsType.DIRECTORY_PART + 1, b"", b"ENOSYS\0"),
        (0xFFFF, b"", b"ENOSYS\0"),
        (0xFFFFFFFF, b"/a\0", b"ENOSYS\0"),
    ],
)
def test_malformed_requests_get_xs_error(xsd, type_, payload, expect):
    with raw_conn(xsd) as s:
        reply = ask(s, type_, payload, req_id=0xDEAD)
        assert (reply.type, reply.req_id, reply.payload) == (XsType.ERROR, 0xDEAD, expect)
        # the connection still works afterwards
        ok = ask(s, XsType.READ, b"/local/domain/0/name\0", req_id=7)
        assert (ok.type, ok.req_id, ok.payload) == (XsType.READ, 7, b"Domain-0")


def test_reply_echoes_tx_id_and_req_id(xsd):
    with raw_conn(xsd) as s:
        start = ask(s, XsType.TRANSACTION_START, b"\0", req_id=1)
        tx = int(start.payload.rstrip(b"\0"))
        r = ask(s, XsType.WRITE, b"/e\0v", req_id=0xFFFFFFFF, tx=tx)
        assert (r.type, r.req_id, r.tx_id, r.payload) == (XsType.WRITE, 0xFFFFFFFF, tx, b"OK\0")
        assert ask(s, XsType.TRANSACTION_START, b"\0", tx=tx).payload == b"EBUSY\0"


def test_oversized_header_gets_e2big_then_close(xsd, xs):
    with raw_conn(xsd) as s:
        s.sendall(HEADER.pack(XsType.WRITE, 5, 0, PAYLOAD_MAX + 1))
        reply = recv_msg(s)
        assert (reply.type, reply.req_id, reply.payload) == (XsType.ERROR, 5, b"E2BIG\0")
        assert s.recv(1) == b""  # closed
    assert xs.read("/local/domain/0/name") == "Domain-0"


def test_payload_of_exactly_max_is_accepted(xs):
    value = b"v" * (PAYLOAD_MAX - len(b"/max\0"))
    xs.write("/max", value)
    assert xs.read_bytes("/max") == value
    with pytest.raises(XenStoreError):
        xs.write("/max", value + b"!")  # the client refuses to send it


def test_partial_header_then_hangup_leaves_daemon_serving(xsd, xs):
    for cut in (1, 15, 17):
        with raw_conn(xsd) as s:
            s.sendall(encode(XsType.READ, 1, 0, b"/a\0")[:cut])
    assert xs.read("/local/domain/0/name") == "Domain-0"


def test_client_that_never_reads_does_not_block_others(xsd, xs):
    with raw_conn(xsd) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        req = encode(XsType.READ, 1, 0, b"/local/domain/0/name\0")
        s.settimeout(0.5)
        try:
            for _ in range(5000):
                s.send(req)
        except (TimeoutError, BlockingIOError, OSError):
            pass
        assert xs.read("/local/domain/0/name") == "Domain-0"


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_bytes_never_kill_the_daemon(shared_xsd, chunks):
    with raw_conn(shared_xsd) as s:
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:
                break  # daemon dropped us: allowed
    with XenStore(shared_xsd.path, timeout=5) as c:
        c.write("/alive", "yes")
        assert c.read("/alive") == "yes"
    assert shared_xsd.internal_errors == []


request_type = st.one_of(st.sampled_from(list(XsType)), st.integers(0, 0xFFFFFFFF))
path_like = st.sampled_from([b"/", b"/a", b"/a/b", b"rel", b"@releaseDomain", b"/x//y", b"1"])
piece = st.one_of(path_like, st.binary(max_size=12), st.sampled_from([b"T", b"F", b"n0", b"0"]))


@given(
    st.lists(
        st.tuples(
            request_type,
            st.integers(0, 5),
            st.lists(piece, max_size=4),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    )
)
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_structured_garbage_always_answered(shared_xsd, requests):
    """Well-framed requests with random types, tx ids and arguments: every one is
    answered (same req_id), and nothing breaks the daemon."""
    with raw_conn(shared_xsd) as s:
        for i, (type_, tx, parts, terminate) in enumerate(requests):
            payload = b"\0".join(parts) + (b"\0" if terminate else b"")
            reply = ask(s, type_, payload[:PAYLOAD_MAX], req_id=i, tx=tx)
            assert reply.req_id == i
            if reply.type != XsType.ERROR:
                assert reply.type == type_
    assert shared_xsd.internal_errors == []


@pytest.fixture(scope="module")
def shared_xsd():
    d = tempfile.mkdtemp(prefix="xvf-xsf-")
    daemon = XenStored(os.path.join(d, "xs.sock")).start()
    yield daemon
    daemon.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_stop_closes_clients_and_socket(tmp_path):
    d = tempfile.mkdtemp(prefix="xvf-xss-")
    path = os.path.join(d, "xs.sock")
    daemon = XenStored(path).start()
    c = XenStore(path, timeout=5)
    daemon.stop()
    assert not os.path.exists(path)
    with pytest.raises(XenStoreError):
        c.read("/")
    c.close()
    shutil.rmtree(d, ignore_errors=True)


def test_header_is_native_endian():
    # xsd_sockmsg is host-endian; on the little-endian hosts we run on that is "<".
    assert HEADER.pack(1, 2, 3, 4) == struct.pack("=IIII", 1, 2, 3, 4)
