"""A qemu-storage-daemon vhost-user-blk export for tests that talk to it directly.

Built on the project's launcher (`xvf.platform.sim.backends.start_qsd`: io_uring AIO with
a fallback to threads, bounded wait for the socket). This adds a short socket
directory (unix socket paths are limited to 108 bytes, pytest's tmp_path is not)
and teardown that always kills the daemon and removes its files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from xvf.platform.sim.backends import BackendProcess, make_disk_image, start_qsd


@dataclass
class QsdExport:
    process: BackendProcess
    image: str
    socket_path: str
    image_size: int

    def kill(self) -> None:
        self.process.kill()


def qsd_export(image_size: int = 8 << 20) -> Iterator[QsdExport]:
    """For a fixture (`yield from qsd_export()`): a running export, torn down after."""
    run_dir = tempfile.mkdtemp(prefix="xvf-vu-", dir="/tmp")
    proc: BackendProcess | None = None
    try:
        image = os.path.join(run_dir, "disk.img")
        make_disk_image(image, image_size)
        socket_path = os.path.join(run_dir, "blk.sock")
        proc = start_qsd(image, socket_path)
        yield QsdExport(proc, image, socket_path, image_size)
    finally:
        if proc is not None:
            proc.kill()
            proc.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
