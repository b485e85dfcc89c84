"""`xvf status`: the daemon answers what it serves on a root-only unix socket.

Protocol: one request per connection. The client connects, sends one JSON line
(`{"request": "status"}`), reads one JSON line back and the daemon closes. The
answer is `Frontend.status()` (in-memory state only) or `{"error": "..."}`.

The server side runs in the daemon's ServiceLoop, so nothing in it may block
the ioreq path: accept and recv are non-blocking, a client that has not sent
its request yet just waits its turn, and an answer that does not fit in the
socket buffer at once is dropped rather than waited for.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from collections.abc import Callable

from xvf.errors import XvfError

log = logging.getLogger("xvf.app.status")

MAX_REQUEST = 4096
MAX_CLIENTS = 8  # connections waiting for their request; the oldest goes first
CLIENT_TIMEOUT = 5.0


class StatusServer:
    """The listening socket; `loop` is the daemon's ServiceLoop (add_reader/remove_fd)."""

    def __init__(self, path: str, loop, answer: Callable[[], dict]) -> None:
        self.path = path
        self.loop = loop
        self.answer = answer
        self.sock: socket.socket | None = None
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}

    def open(self) -> bool:
        """Listen at `path`; False (one warning) when another live daemon holds it."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if _answers(self.path):
            log.warning(
                "status socket %s belongs to another running xvf; `xvf status` will not "
                "reach this one (give it its own --status-socket)",
                self.path,
            )
            return False
        try:
            os.unlink(self.path)  # a stale socket of a daemon that died
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600: no window where others may connect
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        log.info("status socket %s", self.path)
        return True

    def _on_accept(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("status socket: accept failed: %s", exc)
                return
            conn.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                self._drop(next(iter(self.clients)))
            fd = conn.fileno()
            self.clients[fd] = (conn, bytearray())
            self.loop.add_reader(fd, lambda fd=fd: self._on_client(fd))

    def _on_client(self, fd: int) -> None:
        conn, buf = self.clients[fd]
        try:
            data = conn.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf += data
        if data and b"\n" not in buf and len(buf) < MAX_REQUEST:
            return  # the rest of the request is still on its way
        if buf.strip():
            reply = self._reply(bytes(buf))
            try:
                sent = conn.send(reply)
                if sent < len(reply):
                    log.warning("status answer of %d bytes did not fit; dropped", len(reply))
            except OSError as exc:
                log.debug("status client went away: %s", exc)
        self._drop(fd)

    def _reply(self, raw: bytes) -> bytes:
        try:
            request = json.loads(raw.split(b"\n", 1)[0])
            if not isinstance(request, dict) or request.get("request") != "status":
                answer: dict = {"error": f"unknown request {request!r}; expected 'status'"}
            else:
                answer = self.answer()
        except ValueError as exc:
            answer = {"error": f"request is not JSON: {exc}"}
        except Exception as exc:  # the daemon must outlive a bug in its status
            log.exception("building the status answer failed")
            answer = {"error": f"status failed: {exc}"}
        return json.dumps(answer, separators=(",", ":")).encode() + b"\n"

    def _drop(self, fd: int) -> None:
        conn, _ = self.clients.pop(fd)
        self.loop.remove_fd(fd)
        conn.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        if self.sock is not None:
            self.loop.remove_fd(self.sock.fileno())
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _answers(path: str) -> bool:
    """Whether a process listens at `path` (a live daemon, not a stale file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


# -- client ---------------------------------------------------------------------
def query(path: str, timeout: float = CLIENT_TIMEOUT) -> dict:
    """Ask the daemon at `path`; XvfError saying why when it cannot be asked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise XvfError(
                f"no status socket at {path}: xen-vhost-frontend is not running, or runs "
                "with another --status-socket (or none)"
            ) from None
        except PermissionError:
            raise XvfError(f"permission denied on {path}: `xvf status` needs root") from None
        except ConnectionRefusedError:
            raise XvfError(
                f"nothing answers on {path}: the daemon that made it is not running"
            ) from None
        except OSError as exc:
            raise XvfError(f"cannot connect to {path}: {exc}") from None
        try:
            s.sendall(b'{"request":"status"}\n')
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise XvfError(f"the daemon at {path} did not answer within {timeout:.0f}s") from None
        except OSError as exc:
            if exc.errno != errno.ECONNRESET:
                raise XvfError(f"reading the answer from {path}: {exc}") from None
            chunks = []
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise XvfError(f"the daemon at {path} gave no valid answer") from None
    if "error" in answer:
        raise XvfError(f"the daemon at {path}: {answer['error']}")
    return answer


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"


def format_table(status: dict) -> str:
    """The answer as the table `xvf status` prints."""
    lines = [
        f"xvf {status.get('version', '?')} (pid {status.get('pid', '?')}), "
        f"{status.get('platform', '?')} platform, {status.get('mapping', '?')} mapping, "
        f"sockets in {status.get('socket_dir', '?')}, up {status.get('uptime_s', 0):.0f}s"
    ]
    if status.get("poll_us"):
        lines.append(
            f"polling {status['poll_us']:g} µs before each sleep: "
            f"{status.get('polled_requests', 0)} ioreqs found by spinning, "
            f"{status.get('idle_spins', 0)} spins found none"
        )
    guests = status.get("guests", [])
    if not guests:
        lines.append("no guests served")
    for g in guests:
        lines.append("")
        lines.append(
            f"dom{g['domid']}: IOREQ server {g['ioreq_server']}, {g['vcpus']} vCPU(s), "
            f"{g['requests']} ioreqs, {g['bad_requests']} bad, "
            f"{g.get('invalidates', 0)} mapcache invalidations"
        )
        t = g.get("service_thread")
        if t:
            lines.append(
                f"  service thread waits in {t['waits_in']}: {t['wakeups']} wake-ups, "
                f"{t['channel_reads']} of them reads of the event channel"
            )
        header = ("DEVICE", "BASE", "IRQ", "MAP", "MEMORY", "NOTIFY/IRQ", "BACKEND", "XS")
        rows = [header]
        for d in g["devices"]:
            rows.append(
                (
                    d["label"],
                    f"{d['base']:#x}",
                    str(d["irq"]),
                    d.get("mapping") or "-",
                    d.get("memory") or "-",
                    f"{d.get('queue_notify') or '-'}/{d.get('interrupts') or '-'}",
                    d["backend"],
                    str(d.get("xenstore_state") if d.get("xenstore_state") is not None else "-"),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            cells = (c.ljust(w) for c, w in zip(r, widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
        for d in g["devices"]:
            c = d.get("counters")
            extra = f"  {d['label']}: socket {d.get('backend_socket') or '-'}"
            if c:
                extra += (
                    f"; exits {c['exits']}, notifies {c['notifies']}, interrupts "
                    f"{c['interrupts']}, bad {c['bad_requests']}, resets {c['device_resets']}, "
                    f"reconnects {c['reconnects']}, relayed {c['relay_requests']} "
                    f"({_size(c['relay_bytes'])})"
                )
            if d.get("reason"):
                extra += f"; {d['reason']}"
            lines.append(extra)
    return "\n".join(lines)


def run_status(args) -> int:
    answer = query(args.status_socket)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(format_table(answer))
    return 0
