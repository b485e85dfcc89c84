"""`xvf sim`: the whole path without Xen.

Starts the software Xen, optionally the backends, xvf itself (a separate
process, as on a real Dom0), creates a guest from an xl-style virtio line and
runs the guest's I/O: for each virtio-blk device it writes random data,
checks it on the backend's disk image and reads it back.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING

from xvf.device.types import device_type, socket_name
from xvf.errors import SimulatorError

if TYPE_CHECKING:
    import argparse

    from xvf.platform.sim.drivers.blk import VirtioBlk

log = logging.getLogger("xvf.app.demo")
MIB = 1 << 20
CHUNK = 256 * 1024


def _start_frontend(run_dir: str, args: argparse.Namespace) -> subprocess.Popen:
    from xvf.app.cli import mapping_of
    from xvf.platform.sim.backends import xvf_command

    mapping = mapping_of(args)
    return subprocess.Popen(
        xvf_command(
            run_dir,
            args.socket_path,
            mapping == "foreign",
            args.log_level,
            args.socket_timeout,
            ["--mapping", "per-device"] if mapping == "per-device" else [],
        )
    )


def _blk_io(blk: VirtioBlk, image: str | None, total: int) -> float:
    payload = random.Random(0).randbytes(total)
    start = time.monotonic()
    for off in range(0, total, CHUNK):
        blk.write(off // 512, payload[off : off + CHUNK])
    blk.flush()
    for off in range(0, total, CHUNK):
        if blk.read(off // 512, CHUNK // 512) != payload[off : off + CHUNK]:
            raise SimulatorError(f"read back differs at byte {off}")
    elapsed = time.monotonic() - start
    if image is not None:
        with open(image, "rb") as f:
            if f.read(total) != payload:
                raise SimulatorError(f"{image} does not hold what the guest wrote")
        print(f"  disk image {image}: {total // MIB} MiB match byte for byte")
    return elapsed


def run_demo(args: argparse.Namespace) -> int:
    from xvf.app.cli import mapping_of
    from xvf.platform.sim import toolstack
    from xvf.platform.sim.backends import make_disk_image, start_qsd
    from xvf.platform.sim.drivers.blk import VirtioBlk
    from xvf.platform.sim.guest import attach, wait_served
    from xvf.platform.sim.hypervisor import Hypervisor

    os.makedirs(args.socket_path, exist_ok=True)
    specs = toolstack.parse_virtio_line(args.virtio)
    total = args.io_mib * MIB
    backends, images = [], {}
    counts: dict[str, int] = {}
    run_dir = tempfile.mkdtemp(prefix="xvf-xen-")
    hv = Hypervisor(run_dir).start()
    frontend = None
    try:
        for i, spec in enumerate(specs):
            dev = device_type(spec.device_id)
            n = counts.get(dev.name, 0)
            counts[dev.name] = n + 1
            if not args.start_backends:
                continue
            if dev.name != "blk":
                raise SimulatorError(
                    f"--start-backends knows qemu-storage-daemon (blk) only, "
                    f"not {dev.name}; start that backend yourself"
                )
            image = os.path.join(args.socket_path, f"disk{i}.img")
            make_disk_image(image, total + 16 * MIB)
            backends.append(start_qsd(image, os.path.join(args.socket_path, socket_name(dev, n))))
            images[i] = image
        frontend = _start_frontend(run_dir, args)
        dom = hv.create_domain(
            "demo", memory_mib=max(64, 2 * args.io_mib + 32), vcpus=2, virtio=specs
        )
        print(
            f"guest domain {dom.domid}: {len(dom.virtio)} virtio devices, "
            f"{mapping_of(args)} mapping"
        )
        for i, spec in enumerate(dom.virtio):
            dev = device_type(spec.device_id)
            print(
                f"- {dev.name} at {spec.base:#x}, irq {spec.irq}, grants "
                f"{'on' if spec.grants else 'off'}"
            )
            if dev.name != "blk":
                print("  (no guest workload for this device type in the demo)")
                continue
            driver = attach(dom, i, timeout=args.socket_timeout + 10)
            blk = VirtioBlk(driver)
            wait_served(dom, i, args.socket_timeout + 5)
            blk.start()
            print(f"  capacity {blk.capacity * 512 // MIB} MiB, id {blk.get_id()!r}")
            secs = _blk_io(blk, images.get(i), total)
            print(
                f"  wrote, flushed and read back {args.io_mib} MiB in {secs:.2f}s "
                f"({2 * args.io_mib / secs:.0f} MiB/s through xvf)"
            )
            blk.close()
        hv.destroy_domain(dom.domid)
        print("demo passed")
        return 0
    finally:
        if frontend is not None:
            frontend.send_signal(signal.SIGTERM)
            try:
                frontend.wait(timeout=10)
            except subprocess.TimeoutExpired:
                frontend.kill()
        for b in backends:
            b.stop()
        hv.close()
