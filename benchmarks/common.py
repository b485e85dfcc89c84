"""Shared pieces of the benchmarks: building the C helpers, processes, statistics."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
C_DIR = os.path.join(HERE, "c")


class BenchError(RuntimeError):
    """A benchmark could not run (missing compiler, a helper failed)."""


def build_dir() -> str:
    path = os.environ.get("XVF_BENCH_BUILD") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "xvf-bench"
    )
    os.makedirs(path, exist_ok=True)
    return path


def build_c(name: str, extra: Sequence[str] = ()) -> str:
    """Compile benchmarks/c/<name>.c with the system cc (once per source change)."""
    src = os.path.join(C_DIR, name + ".c")
    exe = os.path.join(build_dir(), name)
    include = os.path.join(REPO, "include")  # the ABI facts: include/xvf/*.h
    headers = glob.glob(os.path.join(include, "xvf", "*.h")) + glob.glob(os.path.join(C_DIR, "*.h"))
    newest = max(os.path.getmtime(f) for f in [src, *headers])
    if os.path.exists(exe) and os.path.getmtime(exe) >= newest:
        return exe
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (cc) to build the C baseline; apt-get install gcc")
    tmp = f"{exe}.{os.getpid()}"
    argv = [cc, "-O2", "-Wall", "-pthread", "-I", include, "-o", tmp, src, *extra]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"building {src} failed:\n{proc.stderr}")
    os.replace(tmp, exe)
    return exe


def process_cpu_ns(pid: int) -> int:
    """CPU of a process's threads, in ns: the sum of /proc/<pid>/task/*/schedstat (ns
    resolution; /proc/<pid>/stat counts 10 ms ticks, too coarse for one run). A thread
    that ended meanwhile is not counted: the measured processes' threads live as long
    as they do."""
    total = 0
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended while we looked
    return total


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def summarize(lat_ns: np.ndarray) -> dict:
    """Median and p99 in microseconds, plus the sample count."""
    if lat_ns.size == 0:
        return {"n": 0, "median_us": float("nan"), "p99_us": float("nan")}
    med, p99 = np.percentile(lat_ns, [50, 99])
    return {"n": int(lat_ns.size), "median_us": float(med) / 1e3, "p99_us": float(p99) / 1e3}


def ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def read_u32(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint32).astype(np.float64)


def pin(pid: int, cpu: int | None) -> None:
    """Pin every thread of `pid` (0: the calling thread) to `cpu`: affinity is per
    thread, and a responder's service thread is running before it says ready."""
    if cpu is None or cpu >= (os.cpu_count() or 1):
        return
    if pid == 0:
        os.sched_setaffinity(0, {cpu})
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            continue  # the thread ended while we looked


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_ready(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Wait for the child's 'ready' line on stdout."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise BenchError(f"helper {proc.args!r} did not start: {line!r} {err}")
    if time.monotonic() > deadline:
        raise BenchError("helper took too long to start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e
