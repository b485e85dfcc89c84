"""The simulator's xenstore daemon: Xen's wire protocol on a unix socket.

One background thread runs a selectors loop serving any number of clients,
so Debian's libxenstore tools (with $XENSTORED_PATH) and `xvf.protocols.xenstore`
talk to it as to the real C xenstored. Behaviour follows cxenstored where a
client can observe it:

- paths: absolute, or relative to /local/domain/0 (every socket client is
  dom0); characters [A-Za-z0-9-/_@], no "//", no trailing "/"; EINVAL else.
- READ/WRITE/MKDIR/RM/DIRECTORY/DIRECTORY_PART/GET_PERMS/SET_PERMS. WRITE
  creates missing ancestors, which inherit their parent's permissions. RM of
  a missing node whose parent exists succeeds; RM of "/" is EINVAL.
- WATCH fires once right after its "OK" reply; then on every change of the
  node or a descendant (event path = the changed node), and on RM of an
  ancestor (event path = the watched path). "@introduceDomain" and
  "@releaseDomain" fire on INTRODUCE/RELEASE.
- Transactions: each sees a snapshot taken at TRANSACTION_START; commit
  fails with EAGAIN if any node the transaction read or wrote (including
  nodes it found missing, and parents whose child lists it changed) was
  changed outside it since then. Committed changes fire watches then.
- Permissions are stored, validated and returned, but NOT enforced: every
  socket client is dom0, which real xenstored lets do anything anyway.
- Malformed input gets an XS_ERROR (EINVAL for bad strings/paths, ENOSYS for
  unknown types and XS_CONTROL, E2BIG for replies too large); a header that
  announces more than 4096 payload bytes gets E2BIG and the connection is
  closed (cxenstored drops such a client), as is one whose unread output
  grows past OUTBUF_LIMIT. Nothing a client sends stops the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import stat
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from xvf.errors import SimulatorError, XenStoreError
from xvf.protocols.xenstore import (
    ABS_PATH_MAX,
    HEADER,
    HEADER_SIZE,
    PAYLOAD_MAX,
    REL_PATH_MAX,
    XsType,
    encode,
    join_strings,
)

log = logging.getLogger(__name__)

OUTBUF_LIMIT = 4 << 20  # bytes a client may leave unread before it is dropped
MAX_TRANSACTIONS = 64  # per connection (cxenstored's quota is 10 for guests)
DOM0_BASE = "/local/domain/0"
_VALID = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-/_@")


class _XsErr(XenStoreError):
    """Internal: the request fails with this errno name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class Node:
    value: bytes = b""
    perms: tuple[str, ...] = ("n0",)
    children: tuple[str, ...] = ()
    gen: int = 0  # generation of the last change, for DIRECTORY_PART


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def is_child(child: str, parent: str) -> bool:
    """child is parent or below it (xenstored's is_child)."""
    if parent == "/":
        return child.startswith("/")
    return child == parent or child.startswith(parent + "/")


def parse_perms(items: list[str]) -> tuple[str, ...]:
    """Validate permission strings like "n0", "r5", "b12"."""
    if not items:
        raise _XsErr("EINVAL")
    for p in items:
        if len(p) < 2 or p[0] not in "nrwb" or not p[1:].isdigit() or int(p[1:]) > 0xFFFF:
            raise _XsErr("EINVAL")
    return tuple(items)


class Tree:
    """Nodes keyed by absolute path. Nodes are immutable, so copies are cheap snapshots."""

    def __init__(self, nodes: dict[str, Node] | None = None) -> None:
        self.nodes: dict[str, Node] = nodes if nodes is not None else {"/": Node()}

    def copy(self) -> Tree:
        return Tree(dict(self.nodes))

    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def _link(self, path: str, gen: int, touched: list[str]) -> None:
        parent = _parent(path)
        if parent not in self.nodes:
            self._create(parent, b"", gen, touched)
        p = self.nodes[parent]
        self.nodes[parent] = replace(p, children=(*p.children, _basename(path)), gen=gen)
        touched.append(parent)

    def _create(self, path: str, value: bytes, gen: int, touched: list[str]) -> None:
        self._link(path, gen, touched)
        # New nodes inherit the parent's permissions (cxenstored, dom0 writer).
        self.nodes[path] = Node(value=value, perms=self.nodes[_parent(path)].perms, gen=gen)
        touched.append(path)

    def write(self, path: str, value: bytes, gen: int) -> list[str]:
        touched: list[str] = []
        node = self.nodes.get(path)
        if node is None:
            self._create(path, value, gen, touched)
        else:
            self.nodes[path] = replace(node, value=value, gen=gen)
            touched.append(path)
        return touched

    def mkdir(self, path: str, gen: int) -> list[str]:
        if path in self.nodes:
            return []
        touched: list[str] = []
        self._create(path, b"", gen, touched)
        return touched

    def rm(self, path: str, gen: int) -> list[str]:
        if path == "/":
            raise _XsErr("EINVAL")
        if path not in self.nodes:
            if _parent(path) in self.nodes:
                return []  # "Didn't exist already? Fine, if parent exists."
            raise _XsErr("ENOENT")
        touched: list[str] = []
        stack = [path]
        while stack:
            p = stack.pop()
            node = self.nodes.pop(p)
            touched.append(p)
            stack.extend(f"{p}/{c}" for c in node.children)
        parent = _parent(path)
        pn = self.nodes[parent]
        name = _basename(path)
        self.nodes[parent] = replace(
            pn, children=tuple(c for c in pn.children if c != name), gen=gen
        )
        touched.append(parent)
        return touched

    def set_perms(self, path: str, perms: tuple[str, ...], gen: int) -> list[str]:
        node = self.nodes.get(path)
        if node is None:
            raise _XsErr("ENOENT")
        self.nodes[path] = replace(node, perms=perms, gen=gen)
        return [path]


@dataclass
class _Watch:
    path: str  # absolute, or "@..."
    token: bytes
    relative: bool


@dataclass
class _Transaction:
    id: int
    base_gen: int
    tree: Tree
    accessed: set[str] = field(default_factory=set)
    ops: list[tuple[str, tuple]] = field(default_factory=list)


@dataclass
class _Conn:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    watches: list[_Watch] = field(default_factory=list)
    txs: dict[int, _Transaction] = field(default_factory=dict)
    closing: bool = False  # close once outbuf is flushed


# -- payload parsing, as strict as cxenstored ------------------------------------


def _onearg(payload: bytes) -> str:
    """Exactly one NUL-terminated string."""
    if not payload.endswith(b"\0") or payload.index(b"\0") != len(payload) - 1:
        raise _XsErr("EINVAL")
    return payload[:-1].decode("utf-8", "surrogateescape")


def _strings(payload: bytes, n: int) -> list[bytes]:
    """The first n NUL-terminated strings (trailing bytes ignored, like get_strings)."""
    out: list[bytes] = []
    pos = 0
    while len(out) < n:
        end = payload.find(b"\0", pos)
        if end < 0:
            raise _XsErr("EINVAL")
        out.append(payload[pos:end])
        pos = end + 1
    return out


def _all_strings(payload: bytes) -> list[bytes]:
    if payload and not payload.endswith(b"\0"):
        raise _XsErr("EINVAL")
    return payload.split(b"\0")[:-1] if payload else []


def _domid(arg: bytes | str) -> int:
    s = arg.decode("ascii", "replace") if isinstance(arg, bytes) else arg
    # isascii: str.isdigit() also accepts digits int() refuses ("\u00b2").
    if not (s.isascii() and s.isdigit()) or int(s) > 0xFFFF:
        raise _XsErr("EINVAL")
    return int(s)


def canonical(path: str | bytes) -> str:
    """Absolute, validated node path (cxenstored's canonicalize + is_valid_nodename)."""
    raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
    if not raw or any(b not in _VALID for b in raw):
        raise _XsErr("EINVAL")
    s = raw.decode("ascii")
    if not s.startswith("/"):
        if len(s) > REL_PATH_MAX:
            raise _XsErr("EINVAL")
        s = f"{DOM0_BASE}/{s}"
    if len(s) > ABS_PATH_MAX or "//" in s or (s != "/" and s.endswith("/")):
        raise _XsErr("EINVAL")
    return s


class XenStored:
    """A xenstored on a unix socket, served by one background thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tree = Tree()
        self._gen = 1
        self._mod_gen: dict[str, int] = {}  # path -> generation of its last change
        self._next_tx = 1
        self._domains: set[int] = {0}
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.RLock()
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake_r, self._wake_w = -1, -1
        self.internal_errors: list[str] = []  # bugs caught while serving; tests assert empty
        for p in ("/local/domain/0", "/tool/xenstored"):
            self.tree.mkdir(p, 0)
        self.tree.write("/local/domain/0/name", b"Domain-0", 0)
        self.tree.write("/local/domain/0/domid", b"0", 0)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> XenStored:
        if self._thread is not None:
            raise SimulatorError("XenStored already started")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                os.unlink(self.path)  # stale socket of a previous run
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            lst.bind(self.path)
            lst.listen(128)
        except OSError as e:
            lst.close()
            raise SimulatorError(f"cannot listen on {self.path}: {e.strerror}") from e
        lst.setblocking(False)
        self._listener = lst
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(lst, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="sim-xenstored", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        self._thread.join(timeout=10)
        self._thread = None
        with self._lock:
            for conn in list(self._conns.values()):
                conn.sock.close()
            self._conns.clear()
        if self._sel is not None:
            self._sel.close()
        if self._listener is not None:
            self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> XenStored:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the simulator's own API (called from other threads) --------------------

    def introduce_domain(self, domid: int) -> None:
        """A new guest appeared: fire @introduceDomain like xenstored does."""
        with self._lock:
            if domid not in self._domains:
                self._domains.add(domid)
                self._fire("@introduceDomain", False)
        self._wake()

    def release_domain(self, domid: int) -> None:
        """A guest died: rm /local/domain/<domid> (the toolstack's part), fire @releaseDomain."""
        with self._lock:
            with contextlib.suppress(_XsErr):
                self._apply("rm", (f"/local/domain/{domid}",))
            self._domains.discard(domid)
            self._fire("@releaseDomain", False)
        self._wake()

    def snapshot(self) -> dict[str, bytes]:
        """Every node's value, for tests and debugging."""
        with self._lock:
            return {p: n.value for p, n in self.tree.nodes.items()}

    # -- the loop ---------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"x")

    def _run(self) -> None:
        assert self._sel is not None
        while not self._stopping:
            try:
                events = self._sel.select(timeout=1.0)
            except OSError as e:  # pragma: no cover - selector itself broke
                self.internal_errors.append(f"select: {e}")
                return
            with self._lock:
                for key, mask in events:
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                    else:
                        conn = key.data
                        if mask & selectors.EVENT_READ:
                            self._on_readable(conn)
                        if mask & selectors.EVENT_WRITE and conn.sock.fileno() >= 0:
                            self._flush(conn)
                # Events fired on behalf of one client go to others' buffers too.
                for conn in list(self._conns.values()):
                    if conn.outbuf:
                        self._flush(conn)
                    self._update_interest(conn)

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("xenstored accept failed: %s", e)
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        self._conns.pop(fd, None)
        conn.sock.close()

    def _update_interest(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0 or self._sel is None:
            return
        want = selectors.EVENT_WRITE if conn.outbuf else 0
        if not conn.closing:
            want |= selectors.EVENT_READ
        if not want:
            self._drop(conn)
            return
        with contextlib.suppress(KeyError, ValueError):
            if self._sel.get_key(conn.sock).events != want:
                self._sel.modify(conn.sock, want, conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        while conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            del conn.outbuf[:n]
        if len(conn.outbuf) > OUTBUF_LIMIT:
            log.warning("xenstored: dropping a client that does not read its replies")
            self._drop(conn)
        elif conn.closing and not conn.outbuf:
            self._drop(conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)  # EOF, possibly mid-header: nothing to answer
            return
        if conn.closing:
            return
        conn.inbuf += data
        while len(conn.inbuf) >= HEADER_SIZE and not conn.closing:
            type_, req_id, tx_id, length = HEADER.unpack_from(conn.inbuf, 0)
            if length > PAYLOAD_MAX:
                self._send(conn, XsType.ERROR, req_id, tx_id, b"E2BIG\0")
                conn.closing = True  # framing can no longer be trusted
                conn.inbuf.clear()
                break
            if len(conn.inbuf) < HEADER_SIZE + length:
                break
            payload = bytes(conn.inbuf[HEADER_SIZE : HEADER_SIZE + length])
            del conn.inbuf[: HEADER_SIZE + length]
            self._handle(conn, type_, req_id, tx_id, payload)

    def _send(self, conn: _Conn, type_: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if len(payload) > PAYLOAD_MAX:
            type_, payload = XsType.ERROR, b"E2BIG\0"
        conn.outbuf += encode(type_, req_id, tx_id, payload)

    # -- requests ---------------------------------------------------------------

    def _handle(self, conn: _Conn, type_: int, req_id: int, tx_id: int, payload: bytes) -> None:
        handler = _HANDLERS.get(type_)
        try:
            if handler is None:
                raise _XsErr("ENOSYS")
            reply = handler(self, conn, tx_id, payload)
        except _XsErr as e:
            self._send(conn, XsType.ERROR, req_id, tx_id, e.name.encode() + b"\0")
            return
        except Exception:  # a daemon bug must not kill the daemon or other clients
            self.internal_errors.append(traceback.format_exc())
            log.exception("xenstored: internal error on request type %d", type_)
            self._send(conn, XsType.ERROR, req_id, tx_id, b"EIO\0")
            return
        self._send(conn, type_, req_id, tx_id, reply)
        if type_ == XsType.WATCH:
            # "We fire once up front: simplifies clients and restart."
            w = conn.watches[-1]
            self._queue_event(conn, w, w.path)

    def _tx(self, conn: _Conn, tx_id: int) -> _Transaction | None:
        if tx_id == 0:
            return None
        tx = conn.txs.get(tx_id)
        if tx is None:
            raise _XsErr("ENOENT")
        return tx

    def _view(self, tx: _Transaction | None) -> Tree:
        return self.tree if tx is None else tx.tree

    def _apply(self, op: str, args: tuple, tx: _Transaction | None = None) -> None:
        """Run a modifying op on the live tree (firing watches) or inside tx."""
        tree = self._view(tx)
        self._gen += 1
        gen = self._gen
        if op == "write":
            touched = tree.write(args[0], args[1], gen)
        elif op == "mkdir":
            touched = tree.mkdir(args[0], gen)
        elif op == "rm":
            touched = tree.rm(args[0], gen)
        elif op == "perms":
            touched = tree.set_perms(args[0], args[1], gen)
        else:  # pragma: no cover
            raise AssertionError(op)
        if tx is not None:
            tx.accessed.add(args[0])
            tx.accessed.update(touched)
            tx.ops.append((op, args))
            return
        if not touched:
            return
        if self._any_tx_open():
            for p in touched:
                self._mod_gen[p] = gen
        self._fire(args[0], op == "rm")

    def _any_tx_open(self) -> bool:
        return any(c.txs for c in self._conns.values())

    def _fire(self, name: str, recurse: bool) -> None:
        for conn in self._conns.values():
            for w in conn.watches:
                if name.startswith("@") or w.path.startswith("@"):
                    if name == w.path:
                        self._queue_event(conn, w, name)
                elif is_child(name, w.path):
                    self._queue_event(conn, w, name)
                elif recurse and is_child(w.path, name):
                    self._queue_event(conn, w, w.path)

    def _queue_event(self, conn: _Conn, w: _Watch, path: str) -> None:
        if w.relative and path.startswith(DOM0_BASE + "/"):
            path = path[len(DOM0_BASE) + 1 :]
        self._send(conn, XsType.WATCH_EVENT, 0, 0, path.encode() + b"\0" + w.token + b"\0")

    def _read_node(self, conn: _Conn, tx_id: int, payload: bytes) -> Node:
        tx = self._tx(conn, tx_id)
        path = canonical(_onearg(payload))
        if tx is not None:
            tx.accessed.add(path)
        node = self._view(tx).get(path)
        if node is None:
            raise _XsErr("ENOENT")
        return node

    def _do_read(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        return self._read_node(conn, tx_id, payload).value

    def _do_directory(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        node = self._read_node(conn, tx_id, payload)
        return join_strings(*node.children) if node.children else b""

    def _do_directory_part(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        path_b, off_b = _strings(payload, 2)
        if not off_b.isdigit():
            raise _XsErr("EINVAL")
        node = self._read_node(conn, tx_id, path_b + b"\0")
        children = join_strings(*node.children) if node.children else b""
        off = int(off_b)
        gen = str(node.gen).encode() + b"\0"
        if off >= len(children):
            return gen + b"\0"
        maxlen = PAYLOAD_MAX - len(gen) - 1
        end = off
        while end < len(children):
            nxt = children.index(b"\0", end) + 1
            if nxt - off > maxlen:
                break
            end = nxt
        chunk = children[off:end]
        return gen + chunk + (b"\0" if end >= len(children) else b"")

    def _do_get_perms(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        return join_strings(*self._read_node(conn, tx_id, payload).perms)

    def _do_write(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        tx = self._tx(conn, tx_id)
        nul = payload.find(b"\0")
        if nul < 0:
            raise _XsErr("EINVAL")
        path = canonical(payload[:nul])
        self._apply("write", (path, payload[nul + 1 :]), tx)
        return b"OK\0"

    def _do_mkdir(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        tx = self._tx(conn, tx_id)
        self._apply("mkdir", (canonical(_onearg(payload)),), tx)
        return b"OK\0"

    def _do_rm(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        tx = self._tx(conn, tx_id)
        path = canonical(_onearg(payload))
        if tx is not None:
            tx.accessed.add(_parent(path))
        self._apply("rm", (path,), tx)
        return b"OK\0"

    def _do_set_perms(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        tx = self._tx(conn, tx_id)
        items = _all_strings(payload)
        if len(items) < 2:
            raise _XsErr("EINVAL")
        path = canonical(items[0])
        perms = parse_perms([i.decode("ascii", "replace") for i in items[1:]])
        self._apply("perms", (path, perms), tx)
        return b"OK\0"

    def _do_watch(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        path_b, token = _strings(payload, 2)
        if path_b.startswith(b"@"):
            if len(path_b) > REL_PATH_MAX or any(b not in _VALID for b in path_b):
                raise _XsErr("EINVAL")
            path, relative = path_b.decode("ascii"), False
        else:
            path, relative = canonical(path_b), not path_b.startswith(b"/")
        if any(w.path == path and w.token == token for w in conn.watches):
            raise _XsErr("EEXIST")
        conn.watches.append(_Watch(path, token, relative))
        return b"OK\0"

    def _do_unwatch(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        path_b, token = _strings(payload, 2)
        path = path_b.decode("ascii", "replace") if path_b.startswith(b"@") else canonical(path_b)
        for i, w in enumerate(conn.watches):
            if w.path == path and w.token == token:
                del conn.watches[i]
                return b"OK\0"
        raise _XsErr("ENOENT")

    def _do_reset_watches(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        conn.watches.clear()
        conn.txs.clear()
        return b"OK\0"

    def _do_transaction_start(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        if tx_id != 0:
            raise _XsErr("EBUSY")  # no nested transactions
        if len(conn.txs) >= MAX_TRANSACTIONS:
            raise _XsErr("ENOSPC")
        tid = self._next_tx
        self._next_tx = (self._next_tx % 0xFFFFFFFE) + 1
        conn.txs[tid] = _Transaction(tid, self._gen, self.tree.copy())
        return str(tid).encode() + b"\0"

    def _do_transaction_end(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        arg = _onearg(payload)
        if arg not in ("T", "F"):
            raise _XsErr("EINVAL")
        tx = conn.txs.pop(tx_id, None) if tx_id else None
        if tx is None:
            raise _XsErr("ENOENT")
        try:
            if arg == "F":
                return b"OK\0"
            if any(self._mod_gen.get(p, 0) > tx.base_gen for p in tx.accessed):
                raise _XsErr("EAGAIN")
            for op, args in tx.ops:
                with contextlib.suppress(_XsErr):
                    self._apply(op, args)
            return b"OK\0"
        finally:
            if not self._any_tx_open():
                self._mod_gen.clear()  # only open transactions need the history

    def _do_get_domain_path(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        return f"/local/domain/{_domid(_onearg(payload))}".encode() + b"\0"

    def _do_introduce(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        domid_b, mfn, port = _strings(payload, 3)
        domid = _domid(domid_b)
        if not mfn.isdigit() or not port.isdigit():
            raise _XsErr("EINVAL")
        if domid not in self._domains:
            self._domains.add(domid)
            self._fire("@introduceDomain", False)
        return b"OK\0"

    def _do_release(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        domid = _domid(_onearg(payload))
        if domid == 0:
            raise _XsErr("EINVAL")
        if domid not in self._domains:
            raise _XsErr("ENOENT")
        self._domains.discard(domid)
        self._fire("@releaseDomain", False)
        return b"OK\0"

    def _do_is_domain_introduced(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        return b"T\0" if _domid(_onearg(payload)) in self._domains else b"F\0"

    def _do_resume(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        if _domid(_onearg(payload)) not in self._domains:
            raise _XsErr("ENOENT")
        return b"OK\0"

    def _do_set_target(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        domid, target = _strings(payload, 2)
        for d in (_domid(domid), _domid(target)):
            if d not in self._domains:
                raise _XsErr("ENOENT")
        return b"OK\0"

    def _do_control(self, conn: _Conn, tx_id: int, payload: bytes) -> bytes:
        raise _XsErr("ENOSYS")  # debug/control commands are not simulated


_HANDLERS: dict[int, Callable[[XenStored, _Conn, int, bytes], bytes]] = {
    XsType.CONTROL: XenStored._do_control,
    XsType.DIRECTORY: XenStored._do_directory,
    XsType.READ: XenStored._do_read,
    XsType.GET_PERMS: XenStored._do_get_perms,
    XsType.WATCH: XenStored._do_watch,
    XsType.UNWATCH: XenStored._do_unwatch,
    XsType.TRANSACTION_START: XenStored._do_transaction_start,
    XsType.TRANSACTION_END: XenStored._do_transaction_end,
    XsType.INTRODUCE: XenStored._do_introduce,
    XsType.RELEASE: XenStored._do_release,
    XsType.GET_DOMAIN_PATH: XenStored._do_get_domain_path,
    XsType.WRITE: XenStored._do_write,
    XsType.MKDIR: XenStored._do_mkdir,
    XsType.RM: XenStored._do_rm,
    XsType.SET_PERMS: XenStored._do_set_perms,
    XsType.IS_DOMAIN_INTRODUCED: XenStored._do_is_domain_introduced,
    XsType.RESUME: XenStored._do_resume,
    XsType.SET_TARGET: XenStored._do_set_target,
    XsType.RESET_WATCHES: XenStored._do_reset_watches,
    XsType.DIRECTORY_PART: XenStored._do_directory_part,
}
