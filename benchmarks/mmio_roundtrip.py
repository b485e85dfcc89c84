"""MMIO access round trip on an ioreq page: the same C requester (benchmarks/c/requester.c,
playing the guest's vCPUs and Xen's event channel) drives each responder in its own
process: xvf's Cython service loop on a guest's service thread as the daemon runs it
("cython": a blocking read of the channel while it is all the thread watches;
"cython-epoll": epoll_wait then read, as when it also watches backends' call fds), the
pure-Python one (xvf.hotpath.ioreq_reference), and the C baseline
(benchmarks/c/responder.c: "c" plain blocking reads, "c-epoll" xvf's epoll structure).
Latency, responder CPU per access, and throughput with several vCPUs.

Polling (`--poll-us`): "cython-poll" is the Cython loop spinning POLL_US after each
event, against a requester that still signals and waits on the event channel as Xen
does; "floor" is both sides spinning on the slot with no event channel at all (C on
both sides), the least an access through a shared page can cost on this machine."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import tempfile

import numpy as np

from benchmarks.common import (
    BenchError,
    build_c,
    env,
    pin,
    process_cpu_ns,
    python_cmd,
    ratio,
    read_u32,
    stop,
    summarize,
    wait_ready,
)
from xvf.hotpath._layout import IOREQ_SIZE, IOREQ_VP_EPORT, PAGE_SIZE

IMPLS = ["c", "c-epoll", "cython", "cython-epoll", "cython-poll", "python", "floor"]
POLL_US = 50
OPS = {"read": "InterruptStatus read", "notify": "QueueNotify write"}


def make_pages(ndev: int, vpd: int) -> int:
    """A memfd of `ndev` ioreq pages with each slot's vp_eport filled in, as Xen does."""
    fd = os.memfd_create("xvf-bench-ioreq", os.MFD_CLOEXEC)
    os.ftruncate(fd, ndev * PAGE_SIZE)
    for dev in range(ndev):
        for v in range(vpd):
            slot = dev * PAGE_SIZE + v * IOREQ_SIZE
            os.pwrite(fd, struct.pack("<I", dev * vpd + v + 1), slot + IOREQ_VP_EPORT)
    return fd


def responder_argv(impl: str, page_fd: int, evt_fd: int, ndev: int, vpd: int, kick: int) -> list:
    if impl in ("c", "c-epoll", "floor"):
        mode = {"c": "read", "c-epoll": "epoll", "floor": "spin"}[impl]
        exe = build_c("responder")
        return [exe, mode, str(page_fd), str(evt_fd), str(ndev), str(vpd), str(kick)]
    poll = impl.endswith("-poll")
    base = impl.split("-")[0]
    # Cython runs as the daemon does by default: a guest's own service thread, which
    # waits in a read of its channel while that is all it watches ("cython"), or
    # (--wait epoll) always in epoll_wait; the Python reference has no such thread.
    threads = ["--threads=per-guest", f"--wait={'epoll' if impl == 'cython-epoll' else 'read'}"]
    return python_cmd(
        "benchmarks.serve",
        f"--impl={base}",
        *(threads if base == "cython" else []),
        f"--poll-us={POLL_US if poll else 0}",
        f"--page-fd={page_fd}",
        f"--evtchn-fd={evt_fd}",
        f"--ndev={ndev}",
        f"--vpd={vpd}",
        f"--kick-fd={kick}",
    )


def one_run(
    impl: str,
    op: str,
    *,
    ndev: int = 1,
    vpd: int = 1,
    iters: int,
    warmup: int,
    pin_cpus: tuple[int, int] | None = None,
    dispatch: bool = False,
    run_under: tuple[str, ...] = (),
) -> dict:
    """One responder process, one requester run; latencies and the responder's CPU.
    `run_under`: a command the responder runs under (strace, for the syscall test);
    its CPU is then that command's too."""
    requester = build_c("requester")
    page_fd = make_pages(ndev, vpd)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fds = (page_fd, theirs.fileno(), kick)
    resp = subprocess.Popen(
        [*run_under, *responder_argv(impl, page_fd, theirs.fileno(), ndev, vpd, kick)],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    out_fd, out = tempfile.mkstemp(prefix="xvf-bench-", suffix=".lat")
    os.close(out_fd)
    try:
        theirs.close()
        wait_ready(resp)
        if pin_cpus:
            pin(resp.pid, pin_cpus[1])
        cpu0 = process_cpu_ns(resp.pid)
        argv = [requester, "mmio", str(page_fd), str(ours.fileno()), str(ndev), str(vpd)]
        argv += [str(iters), str(warmup), op, out]
        argv += ["spin"] if impl == "floor" else (["dispatch"] if dispatch else [])
        req = subprocess.run(
            argv,
            pass_fds=(page_fd, ours.fileno()),
            capture_output=True,
            text=True,
            timeout=240,
            preexec_fn=(lambda: pin(0, pin_cpus[0])) if pin_cpus else None,
        )
        cpu1 = process_cpu_ns(resp.pid)
        if req.returncode != 0:
            raise BenchError(f"requester failed against {impl}: {req.stdout} {req.stderr}")
        stats = dict(kv.split("=") for kv in req.stdout.split())
        lat = read_u32(out)
    finally:
        stop(resp)
        ours.close()
        os.close(page_fd)
        os.close(kick)
        os.unlink(out)
    accesses = int(stats["accesses"])
    return {
        "lat": lat,
        "accesses": accesses,
        "cpu_ns_per_access": (cpu1 - cpu0) / accesses,
        "throughput": int(stats["measured"]) / (int(stats["wall_ns"]) / 1e9),
        "errors": int(stats["errors"]),
    }


def run(quick: bool = False, pin_cpus: tuple[int, int] | None = None) -> dict:
    iters = 100 if quick else 4000
    rounds = 1 if quick else 4
    tput_vcpus = 2 if quick else 4
    tput_iters = 50 if quick else 2000
    rows = []
    ratios = {}
    for op in OPS:
        lat: dict[str, list[np.ndarray]] = {i: [] for i in IMPLS}
        cpu: dict[str, list[float]] = {i: [] for i in IMPLS}
        errors = 0
        # Round robin so that the machine's noise hits every implementation alike.
        for _ in range(rounds):
            for impl in IMPLS:
                r = one_run(impl, op, iters=iters, warmup=iters // 10 + 5, pin_cpus=pin_cpus)
                lat[impl].append(r["lat"])
                cpu[impl].append(r["cpu_ns_per_access"])
                errors += r["errors"]
        tput = {}
        for impl in IMPLS:
            r = one_run(impl, op, vpd=tput_vcpus, iters=tput_iters, warmup=10, pin_cpus=pin_cpus)
            tput[impl] = r["throughput"]
            errors += r["errors"]
        by_impl = {}
        for impl in IMPLS:
            s = summarize(np.concatenate(lat[impl]))
            s["cpu_us_per_access"] = float(np.median(cpu[impl])) / 1e3
            s["throughput_kops"] = tput[impl] / 1e3
            by_impl[impl] = s
            rows.append({"op": OPS[op], "impl": impl, **s})
        c, cy, py = by_impl["c"], by_impl["cython"], by_impl["python"]
        ratios[op] = {
            "cython/c latency median": ratio(cy["median_us"], c["median_us"]),
            "cython/c latency p99": ratio(cy["p99_us"], c["p99_us"]),
            "cython/c cpu per access": ratio(cy["cpu_us_per_access"], c["cpu_us_per_access"]),
            "cython/c throughput": ratio(cy["throughput_kops"], c["throughput_kops"]),
            # the same structure on both sides: epoll_wait, then read
            "cython-epoll/c-epoll latency median": ratio(
                by_impl["cython-epoll"]["median_us"], by_impl["c-epoll"]["median_us"]
            ),
            "cython-epoll/c-epoll cpu per access": ratio(
                by_impl["cython-epoll"]["cpu_us_per_access"],
                by_impl["c-epoll"]["cpu_us_per_access"],
            ),
            "cython/cython-epoll cpu per access": ratio(
                cy["cpu_us_per_access"], by_impl["cython-epoll"]["cpu_us_per_access"]
            ),
            "python/cython latency median": ratio(py["median_us"], cy["median_us"]),
            "python/cython cpu per access": ratio(py["cpu_us_per_access"], cy["cpu_us_per_access"]),
            "cython-poll/cython latency median": ratio(
                by_impl["cython-poll"]["median_us"], cy["median_us"]
            ),
            "cython-poll/cython cpu per access": ratio(
                by_impl["cython-poll"]["cpu_us_per_access"], cy["cpu_us_per_access"]
            ),
            "cython-poll/floor latency median": ratio(
                by_impl["cython-poll"]["median_us"], by_impl["floor"]["median_us"]
            ),
        }
        if errors:
            raise BenchError(f"{errors} accesses returned a wrong value ({op})")
    return {
        "name": "mmio_roundtrip",
        "title": "MMIO access round trip on the ioreq page (C requester, responder per process)",
        "params": {
            "iterations_per_round": iters,
            "rounds": rounds,
            "throughput_vcpus": tput_vcpus,
            "pinned": pin_cpus,
        },
        "columns": [
            "op",
            "impl",
            "n",
            "median_us",
            "p99_us",
            "cpu_us_per_access",
            "throughput_kops",
        ],
        "rows": rows,
        "ratios": ratios,
        "goal": "cython/c latency <= 1.05, cython/c cpu per access <= 1.1; cython-poll "
        f"spins {POLL_US} µs after each event (--poll-us), floor is both sides spinning",
    }
