"""The one arm64 Linux kernel the rig boots as Dom0 and as every DomU.

Debian's own arm64 kernel cannot be a virtio-on-Xen guest (no XEN_VIRTIO, no grant DMA,
no I2C_VIRTIO/GPIO_VIRTIO) and lacks privcmd's ioeventfd/irqfd, so the rig cross-builds
a small one from Debian 13's linux-source-6.12: `allnoconfig` plus tests/xen/kernel.config,
everything built in (no modules, so Dom0 and the DomU initramfs need no module tree).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from . import trixie
from .cache import cache_dir, fingerprint, log, stage

SOURCE_PACKAGE = "linux-source-6.12"
FRAGMENT = Path(__file__).resolve().parent.parent / "kernel.config"
MAKE_VARS = ["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]

_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def _kernel_dir() -> Path:
    path = cache_dir() / "kernel"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source_deb() -> Path:
    # Already present after the first run; trixie.download only asks apt when it is not.
    return trixie.download(SOURCE_PACKAGE, cache_dir() / "debs" / "single")


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {done.returncode}")


def _make(src: Path, build: Path, *args: str) -> None:
    # Below other rig builds on a shared host: the kernel is the longest job, so it yields.
    _run(["nice", "-n", "10", "make", "-C", str(src), f"O={build}", *MAKE_VARS, *args])


def _extract(deb: Path, into: Path) -> None:
    """Unpack the tarball inside the .deb straight into `into`, without the 150 MB copy."""
    tmp = into.with_name(into.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    script = (
        'dpkg-deb --fsys-tarfile "$1" | tar -xO "./usr/src/$3.tar.xz"'
        ' | tar -xJ --strip-components=1 --no-same-owner -C "$2"'
    )
    _run(["bash", "-o", "pipefail", "-c", script, "extract", str(deb), str(tmp), SOURCE_PACKAGE])
    shutil.rmtree(into, ignore_errors=True)
    tmp.rename(into)


def read_config(path: Path) -> dict[str, str]:
    """CONFIG_* values of a .config or fragment; `# ... is not set` reads as "n"."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if m := _SET.match(line):
            values[m[1]] = m[2]
        elif m := _UNSET.match(line):
            values[m[1]] = "n"
    return values


def check_config(fragment: Path, config: Path) -> None:
    """Fail, naming each one, if any fragment option did not survive Kconfig.

    Kconfig silently drops a request whose dependencies are unmet (or whose prompt is
    hidden), so a typo or a missing parent menu would otherwise surface as a kernel
    that boots but lacks a driver.
    """
    wanted = read_config(fragment)
    got = read_config(config)
    wrong = [
        f"{name}: wanted {value}, got {got.get(name, 'n')}"
        for name, value in wanted.items()
        if got.get(name, "n") != value
    ]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} option(s) of {fragment} did not end up in {config}"
            " (unmet dependencies or hidden prompts):\n  " + "\n  ".join(wrong)
        )


def configure(src: Path, build: Path) -> Path:
    """allnoconfig with the fragment as its base (KCONFIG_ALLCONFIG), then check it held."""
    build.mkdir(parents=True, exist_ok=True)
    _make(src, build, "-s", f"KCONFIG_ALLCONFIG={FRAGMENT}", "allnoconfig")
    config = build / ".config"
    check_config(FRAGMENT, config)
    return config


def build_kernel() -> Path:
    """Build (or reuse) the arm64 Image; returns $XVF_RIG_CACHE/kernel/Image.

    The out-of-tree build directory stays in the cache, so an edited fragment rebuilds
    only what its options touch.
    """
    kdir = _kernel_dir()
    deb = _source_deb()
    src = kdir / "src"
    build = kdir / "build"
    image = kdir / "Image"
    final_config = kdir / ".config"

    # Extracted once per source package; the build directory keeps objects across fragments.
    stage("kernel-source", fingerprint(deb.name), [src / "Makefile"], lambda: _extract(deb, src))

    def compile_image() -> None:
        config = configure(src, build)
        jobs = os.environ.get("XVF_RIG_JOBS", "2")
        _make(src, build, f"-j{jobs}", "Image")
        tmp = image.with_name("Image.tmp")
        shutil.copyfile(build / "arch/arm64/boot/Image", tmp)
        tmp.rename(image)
        shutil.copyfile(config, final_config)
        log(f"kernel: {image} ({image.stat().st_size // 1024} KiB), config {final_config}")

    stage("kernel", fingerprint(deb.name, FRAGMENT), [image, final_config], compile_image)
    return image
