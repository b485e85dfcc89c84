"""Debian 13 (trixie) arm64 packages through the host's apt, with a private state directory.

The Debian 12 host's mirror also serves trixie, and bookworm's debian-archive-keyring
holds trixie's signing key, so apt itself resolves dependencies and verifies what it
downloads; nothing touches the host's own apt state.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .cache import cache_dir, log

MIRROR = os.environ.get("XVF_RIG_MIRROR", "http://deb.debian.org/debian")
SUITE = "trixie"
ARCH = "arm64"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _root() -> Path:
    root = cache_dir() / "apt"
    for sub in (
        "etc/apt/sources.list.d",
        "etc/apt/preferences.d",
        "etc/apt/apt.conf.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sources = root / "etc/apt/sources.list"
    want = f"deb [arch={ARCH} signed-by={KEYRING}] {MIRROR} {SUITE} main\n"
    if not sources.exists() or sources.read_text() != want:
        sources.write_text(want)
    status = root / "var/lib/dpkg/status"
    if not status.exists():
        status.write_text("")
    return root


def _apt_options(root: Path) -> list[str]:
    return [
        "-o",
        f"Dir={root}",
        "-o",
        f"Dir::Etc={root}/etc/apt",
        "-o",
        f"Dir::State={root}/var/lib/apt",
        "-o",
        f"Dir::State::status={root}/var/lib/dpkg/status",
        "-o",
        f"Dir::Cache={root}/var/cache/apt",
        "-o",
        f"APT::Architecture={ARCH}",
        "-o",
        f"APT::Architectures={ARCH}",
        "-o",
        "APT::Install-Recommends=false",
        "-o",
        "Debug::NoLocking=true",
        "-o",
        "Acquire::Retries=3",
    ]


def apt(*args: str, cwd: Path | None = None) -> str:
    root = _root()
    cmd = ["apt-get", "-q", *_apt_options(root), *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2] + list(args))} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def update() -> None:
    """Refresh the package lists (cheap when they are current)."""
    log(f"apt: {SUITE}/{ARCH} package lists from {MIRROR}")
    apt("update")


def ensure_lists(max_age_s: float = 86400) -> None:
    """Package lists present and at most a day old: a fresh cache has none at all."""
    lists = _root() / "var/lib/apt/lists"
    indexes = list(lists.glob("*_Packages*"))
    if not indexes or time.time() - min(p.stat().st_mtime for p in indexes) > max_age_s:
        update()


def download_with_dependencies(packages: list[str], dest: Path) -> list[Path]:
    """Download `packages` and their whole dependency closure (against an empty system).

    Returns the .deb files, which land in `dest` (reused across runs: apt skips what it has).
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "partial").mkdir(exist_ok=True)
    apt("install", "-y", "--download-only", "-o", f"Dir::Cache::archives={dest}", *packages)
    return sorted(dest.glob("*.deb"))


def download(package: str, dest: Path) -> Path:
    """Download one package without its dependencies (e.g. linux-source-6.12)."""
    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    apt("download", package, cwd=dest)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {package} produced no .deb in {dest}")
    return found[-1]


def extract(deb: Path, into: Path) -> None:
    """Unpack a .deb's files (no maintainer scripts run: nothing is emulated).

    --keep-directory-symlink keeps the merged-/usr links (/lib -> usr/lib) that the
    caller created, as dpkg itself would.
    """
    into.mkdir(parents=True, exist_ok=True)
    fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(
        ["tar", "-x", "--keep-directory-symlink", "--no-same-owner", "-C", str(into)],
        stdin=fsys.stdout,
        capture_output=True,
    )
    fsys.wait()
    if fsys.returncode != 0 or tar.returncode != 0:
        raise RuntimeError(f"unpacking {deb.name} failed: {tar.stderr.decode()[-2000:]}")
