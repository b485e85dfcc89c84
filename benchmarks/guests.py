"""Guests across cores: aggregate MMIO exits per second with 1, 2, 4, 8 guests, each
guest a C requester process of its own (one vCPU issuing back-to-back InterruptStatus
reads through its own ioreq page and event channel, benchmarks/c/requester.c), all
issuing at once against one responder process built from xvf's hot path
(benchmarks/serve.py):

  per-guest  each guest on its own GIL-free service thread, as the daemon's default
             (--service-threads per-guest);
  one        every guest on one loop thread with one event-channel handle, as
             --service-threads one (the guests' vCPUs are then threads of one
             requester sharing that handle).

Every run uses the requester's dispatcher thread (one per event-channel handle), so
the guest side costs the same per access in both modes."""

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
    process_cpu_ns,
    python_cmd,
    ratio,
    read_u32,
    stop,
    wait_ready,
)
from benchmarks.mmio_roundtrip import make_pages

MODES = ("per-guest", "one")


def one_run(mode: str, guests: int, iters: int, warmup: int) -> dict:
    """`guests` guests issuing at once; aggregate rate, latencies, responder CPU."""
    requester = build_c("requester")
    # per-guest: a page and a handle per guest; one: one handle, a page per guest's vCPU
    handles = guests if mode == "per-guest" else 1
    ndev = 1 if mode == "per-guest" else guests
    pages = [make_pages(ndev, 1) for _ in range(handles)]
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(handles)]
    args = [f"--threads={mode}", f"--ndev={ndev}", "--impl=cython"]
    for page_fd, (_, theirs) in zip(pages, pairs, strict=True):
        args += [f"--page-fd={page_fd}", f"--evtchn-fd={theirs.fileno()}"]
    resp = subprocess.Popen(
        python_cmd("benchmarks.serve", *args),
        pass_fds=[*pages, *(theirs.fileno() for _, theirs in pairs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    outs = []
    reqs = []
    try:
        for _, theirs in pairs:
            theirs.close()
        wait_ready(resp)
        cpu0 = process_cpu_ns(resp.pid)
        for page_fd, (ours, _) in zip(pages, pairs, strict=True):
            out_fd, out = tempfile.mkstemp(prefix="xvf-bench-", suffix=".lat")
            os.close(out_fd)
            outs.append(out)
            argv = [requester, "mmio", str(page_fd), str(ours.fileno()), str(ndev), "1"]
            argv += [str(iters), str(warmup), "read", out, "dispatch"]
            reqs.append(
                subprocess.Popen(
                    argv,
                    pass_fds=(page_fd, ours.fileno()),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        results = []
        for req in reqs:
            out, err = req.communicate(timeout=240)
            if req.returncode != 0:
                raise BenchError(f"requester failed ({mode}, {guests} guests): {out} {err}")
            results.append(dict(kv.split("=") for kv in out.split()))
        cpu1 = process_cpu_ns(resp.pid)
        lat = np.concatenate([read_u32(out) for out in outs])
    finally:
        for req in reqs:
            if req.poll() is None:
                req.kill()
                req.wait()
        stop(resp)
        for ours, _ in pairs:
            ours.close()
        for page_fd in pages:
            os.close(page_fd)
        for out in outs:
            os.unlink(out)
    errors = sum(int(r["errors"]) for r in results)
    if errors:
        raise BenchError(f"{errors} accesses returned a wrong value ({mode}, {guests} guests)")
    measured = sum(int(r["measured"]) for r in results)
    # The requesters ran at once; the longest one's wall time is the run's.
    wall_s = max(int(r["wall_ns"]) for r in results) / 1e9
    accesses = sum(int(r["accesses"]) for r in results)
    return {
        "rate": measured / wall_s,
        "median_us": float(np.median(lat)) / 1e3,
        "p99_us": float(np.percentile(lat, 99)) / 1e3,
        "cpu_us_per_access": (cpu1 - cpu0) / accesses / 1e3,
    }


def run(quick: bool = False, pin_cpus: tuple[int, int] | None = None) -> dict:
    counts = [1, 2] if quick else [1, 2, 4, 8]
    iters = 100 if quick else 3000
    rounds = 1 if quick else 3
    runs: dict[tuple[str, int], list[dict]] = {(m, g): [] for m in MODES for g in counts}
    # Round robin, so that the machine's noise hits every configuration alike.
    for _ in range(rounds):
        for guests in counts:
            for mode in MODES:
                runs[(mode, guests)].append(one_run(mode, guests, iters, iters // 10 + 5))
    rows = []
    agg: dict[tuple[str, int], float] = {}
    for mode in MODES:
        base_lat = None
        for guests in counts:
            rs = runs[(mode, guests)]
            rate = float(np.median([r["rate"] for r in rs]))
            med = float(np.median([r["median_us"] for r in rs]))
            base_lat = base_lat or med
            agg[(mode, guests)] = rate
            rows.append(
                {
                    "threads": mode,
                    "guests": guests,
                    "exits_kps": rate / 1e3,
                    "vs_1_guest": rate / agg[(mode, counts[0])],
                    "median_us": med,
                    "latency_vs_1_guest": med / base_lat,
                    "p99_us": float(np.median([r["p99_us"] for r in rs])),
                    "cpu_us_per_access": float(np.median([r["cpu_us_per_access"] for r in rs])),
                }
            )
    ratios = {
        "per-guest: 2 guests / 1 guest exits per s": ratio(
            agg[("per-guest", 2)], agg[("per-guest", 1)]
        ),
        "one thread: 2 guests / 1 guest exits per s": ratio(agg[("one", 2)], agg[("one", 1)]),
    }
    for guests in counts:  # the threads' own effect: the same guests, the same requesters
        ratios[f"{guests} guest(s): per-guest / one thread exits per s"] = ratio(
            agg[("per-guest", guests)], agg[("one", guests)]
        )
    for mode in MODES:
        doubled = next(
            (r["guests"] for r in rows if r["threads"] == mode and r["latency_vs_1_guest"] >= 2),
            None,
        )
        ratios[f"{mode}: latency doubles at guests"] = (
            doubled if doubled is not None else f"> {counts[-1]}"
        )
    return {
        "name": "guests",
        "title": "Guests across cores: aggregate exits per second, per-guest threads or one",
        "params": {
            "guests": counts,
            "iterations_per_guest": iters,
            "rounds": rounds,
            "cpus": os.cpu_count(),
        },
        "columns": [
            "threads",
            "guests",
            "exits_kps",
            "vs_1_guest",
            "median_us",
            "latency_vs_1_guest",
            "p99_us",
            "cpu_us_per_access",
        ],
        "rows": rows,
        "ratios": ratios,
        "goal": "per-guest: 2 guests on 2 cores >= 1.7x the exits per second of one guest",
    }
