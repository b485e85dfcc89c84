"""Notification path, xvf against a direct eventfd hand-off, interleaved in one run.

kick leg: the guest writes QueueNotify (an ioreq served by xvf's service loop) until
the backend thread sees its kick eventfd readable; direct: the same thread writes
the eventfd itself (what privcmd ioeventfd makes possible).
call leg: the backend writes its call eventfd until the guest sees the interrupt
(xvf sets InterruptStatus and issues set_irq_level); direct: an eventfd read by the
guest thread (an irqfd). "full" adds the guest's InterruptStatus read and
InterruptACK write that lowers the line again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile

import numpy as np

from benchmarks.common import (
    BenchError,
    build_c,
    env,
    pin,
    python_cmd,
    ratio,
    read_u32,
    stop,
    summarize,
    wait_ready,
)
from benchmarks.mmio_roundtrip import make_pages


def one_run(
    impl: str, leg: str, iters: int, warmup: int, pin_cpus: tuple[int, int] | None
) -> list[np.ndarray]:
    requester = build_c("requester")
    page_fd = make_pages(1, 1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    irq_ours, irq_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    signal = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # kick or call
    direct = os.eventfd(0, os.EFD_CLOEXEC)
    args = [f"--impl={impl}", f"--page-fd={page_fd}", f"--evtchn-fd={theirs.fileno()}"]
    if leg == "kick":
        args.append(f"--kick-fd={signal}")
    else:
        args += [f"--call-fd={signal}", f"--irq-fd={irq_theirs.fileno()}"]
    resp = subprocess.Popen(
        python_cmd("benchmarks.serve", *args),
        pass_fds=(page_fd, theirs.fileno(), signal, irq_theirs.fileno()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    out_fd, out = tempfile.mkstemp(prefix="xvf-bench-", suffix=".lat")
    os.close(out_fd)
    try:
        theirs.close()
        irq_theirs.close()
        wait_ready(resp)
        if pin_cpus:
            pin(resp.pid, pin_cpus[1])
        argv = [requester, leg, str(page_fd), str(ours.fileno()), str(signal)]
        if leg == "call":
            argv.append(str(irq_ours.fileno()))
        argv += [str(direct), str(iters), str(warmup), out]
        req = subprocess.run(
            argv,
            pass_fds=(page_fd, ours.fileno(), signal, direct, irq_ours.fileno()),
            capture_output=True,
            text=True,
            timeout=240,
            preexec_fn=(lambda: pin(0, pin_cpus[0])) if pin_cpus else None,
        )
        if req.returncode != 0:
            raise BenchError(f"requester ({leg}, {impl}) failed: {req.stdout} {req.stderr}")
        lat = read_u32(out)
    finally:
        stop(resp)
        for s in (ours, irq_ours):
            s.close()
        for fd in (page_fd, signal, direct):
            os.close(fd)
        os.unlink(out)
    parts = 2 if leg == "kick" else 3
    return list(lat.reshape(parts, iters))


def run(quick: bool = False, pin_cpus: tuple[int, int] | None = None) -> dict:
    iters = 100 if quick else 5000
    rows = []
    ratios = {}
    for impl in ("cython", "python"):
        for leg in ("kick", "call"):
            parts = one_run(impl, leg, iters, iters // 10 + 5, pin_cpus)
            xvf, direct = summarize(parts[0]), summarize(parts[1])
            label = "QueueNotify -> kick eventfd" if leg == "kick" else "call eventfd -> guest IRQ"
            rows.append({"path": label, "impl": impl, "via": "xvf", **xvf})
            rows.append({"path": label, "impl": impl, "via": "direct eventfd", **direct})
            if leg == "call":
                full = summarize(parts[2])
                rows.append(
                    {"path": label + " + ISR read + ACK", "impl": impl, "via": "xvf", **full}
                )
            ratios[f"{impl} {leg}: xvf/direct median"] = ratio(
                xvf["median_us"], direct["median_us"]
            )
            ratios[f"{impl} {leg}: added median us"] = xvf["median_us"] - direct["median_us"]
    return {
        "name": "notify",
        "title": "Notification path: xvf vs a direct eventfd hand-off (same run, interleaved)",
        "params": {"iterations": iters, "pinned": pin_cpus},
        "columns": ["path", "impl", "via", "n", "median_us", "p99_us"],
        "rows": rows,
        "ratios": ratios,
    }
