"""The C guest of the end-to-end benchmarks (benchmarks/c/blk_guest.c), and the CPU
each party spends: the guest, the simulated Xen (this process), xvf, the backend."""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile

from benchmarks.common import BenchError, build_c, process_cpu_ns, read_u32
from xvf.platform.sim.drivers.blk import VirtioBlk

BLOCK = 4096
HDR_SLOT = 32  # blk_guest.c: a request's header, then its status byte at +16


def _rusage_ns(who: int) -> int:
    ru = resource.getrusage(who)
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


def cpu_by_party(dm_pid: int | None, backend_pid: int) -> dict[str, int]:
    """CPU so far of each party. The guest: this process's reaped children, which are
    the C guest's runs (the device model and the backend are reaped only at the end).
    The simulated Xen: this process, all threads (its event channels, dm_ops, grant
    maps). The device model: xvf, or the C baseline; none when direct."""
    return {
        "guest": _rusage_ns(resource.RUSAGE_CHILDREN),
        "sim_xen": _rusage_ns(resource.RUSAGE_SELF),
        "dm": process_cpu_ns(dm_pid) if dm_pid is not None else 0,
        "backend": process_cpu_ns(backend_pid),
    }


class CGuest:
    """blk_guest.c on queue 0 of a device the Python driver has set up: it continues
    from the ring's state and uses buffers allocated (and granted, where the guest
    grants) through the driver's own DMA ops."""

    def __init__(self, blk: VirtioBlk, qd_max: int, signals: dict[str, int], fds: list[int]):
        self.exe = build_c("blk_guest")
        vq = blk.dev.queues[0]
        ram = blk.ram
        self._dma = vq.dma
        self._qd_max = qd_max
        self.hdr_gpa, self.hdr_dma = self._dma.alloc_coherent(qd_max * HDR_SLOT)
        self.buf_gpa, self.buf_dma = self._dma.alloc_coherent(qd_max * BLOCK)
        self.state = {"avail_idx": vq._avail_idx, "last_used": vq._last_used}
        self.base = {
            "ram_fd": ram.fd,
            "ram_size": sum(r.size for r in ram.regions),
            "qsize": vq.size,
            "desc": vq.ring_gpa,
            "avail": vq.ring_gpa + vq.avail_dma - vq.desc_dma,
            "used": vq.ring_gpa + vq.used_dma - vq.desc_dma,
            "event_idx": int(vq.event_idx),
            "hdr": self.hdr_gpa,
            "hdr_dma": self.hdr_dma,
            "buf": self.buf_gpa,
            "buf_dma": self.buf_dma,
            "disk_blocks": blk.capacity * 512 // BLOCK,
            **signals,
        }
        self.regions = ",".join(f"{r.gpa:#x}:{r.size:#x}:{r.fd_offset:#x}" for r in ram.regions)
        self.fds = [ram.fd, *fds]

    def run(self, mode: str, qd: int, count: int, seed: int) -> dict:
        """`count` requests at `qd` in flight; latencies (ns) and the guest's counters."""
        if qd > self._qd_max:
            raise BenchError(f"queue depth {qd} is above the {self._qd_max} set up")
        out_fd, out = tempfile.mkstemp(prefix="xvf-bench-", suffix=".lat")
        os.close(out_fd)
        args = {**self.base, **self.state, "qd": qd, "count": count, "warmup": 0, "seed": seed}
        argv = [self.exe, f"mode={mode}", f"regions={self.regions}", f"out={out}"]
        argv += [f"{k}={v}" for k, v in args.items()]
        try:
            proc = subprocess.run(argv, pass_fds=self.fds, capture_output=True, timeout=240)
            text = proc.stdout.decode()
            if proc.returncode != 0 or "requests=" not in text:
                raise BenchError(f"blk_guest ({mode}) failed: {text} {proc.stderr.decode()}")
            stats = {k: int(v) for k, v in (kv.split("=") for kv in text.split())}
            lat = read_u32(out)
        finally:
            os.unlink(out)
        self.state = {"avail_idx": stats["avail_idx"], "last_used": stats["last_used"]}
        return {"lat": lat, "stats": stats}

    def close(self) -> None:
        self._dma.free_coherent(self.hdr_gpa, self._qd_max * HDR_SLOT, self.hdr_dma)
        self._dma.free_coherent(self.buf_gpa, self._qd_max * BLOCK, self.buf_dma)
