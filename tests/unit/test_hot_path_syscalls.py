"""The hot path's system calls per access, counted (strace), not timed: a guest's service
thread serves an MMIO access with the calls of the plain C device model
(benchmarks/c/responder.c: a blocking read of the event channel, one write unmasking
its ports, the notify, and for QueueNotify the kick) while the channel is all it
watches, and only then. Timed ratios say the same (benchmarks/mmio_roundtrip.py) but
through this machine's noise; the count is exact."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess

import pytest

from benchmarks.mmio_roundtrip import one_run


def _can_trace() -> bool:
    """strace is there and may ptrace here (a container can forbid it)."""
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.skipif(not _can_trace(), reason="no strace, or ptrace is not allowed"),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler"),
]

ACCESSES = 200
STRACE = ("strace", "-f", "-I", "1", "--seccomp-bpf", "-qq", "-e",
          "trace=read,write,ioctl,epoll_wait")  # fmt: skip
CALL = re.compile(r"^(\d+)\s+(\w+)\(")


def calls_of_busiest_thread(tmp_path, impl: str, op: str) -> tuple[collections.Counter, int]:
    """The calls of the responder's thread that read the event channel most, per access."""
    trace = tmp_path / f"{impl}-{op}.strace"
    r = one_run(
        impl,
        op,
        iters=ACCESSES,
        warmup=10,
        # -I 1: the benchmark's SIGTERM ends strace (and its tracee) at once
        run_under=(*STRACE, "-o", str(trace)),
    )
    assert r["errors"] == 0
    by_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in trace.read_text().splitlines():
        m = CALL.match(line)
        if m:
            by_thread[m[1]][m[2]] += 1
    busiest = max(by_thread.values(), key=lambda c: c["read"])
    return busiest, r["accesses"]


@pytest.mark.parametrize("op", ["read", "notify"])
def test_a_guest_thread_serves_an_access_with_the_c_device_models_calls(tmp_path, op):
    c, n = calls_of_busiest_thread(tmp_path, "c", op)
    cython, n_cy = calls_of_busiest_thread(tmp_path, "cython", op)
    epoll, n_ep = calls_of_busiest_thread(tmp_path, "cython-epoll", op)
    assert n == n_cy == n_ep
    per_access = {"read": 1, "write": 3 if op == "notify" else 2}
    for name, want in per_access.items():
        # a few more at start: the first wake-up, reads that found the next port
        assert want * n <= c[name] <= want * n + 5, (name, c)
        assert want * n <= cython[name] <= want * n + 5, (name, cython)
    assert c["epoll_wait"] == 0 and cython["epoll_wait"] == 0, cython
    # Watching more than the channel (backends' call fds), it waits in epoll_wait first:
    # one call per access more, which is what the direct read saves.
    assert n <= epoll["epoll_wait"] <= n + 5, epoll
    assert n <= epoll["read"] <= n + 5, epoll
