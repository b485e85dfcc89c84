"""ext4 disk images made from a directory tree, without loop devices or mounting."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_ext4(tree: Path, image: Path, size: str, label: str) -> None:
    """`mke2fs -d`: an ext4 image of `size` (sparse, e.g. "1024M") holding `tree`, owned
    by root whatever the builder's uid, labelled so the Dom0 finds it by label."""
    image.parent.mkdir(parents=True, exist_ok=True)
    image.unlink(missing_ok=True)
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-E", "root_owner=0:0"]
    done = subprocess.run([*cmd, "-d", str(tree), str(image), size], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mke2fs of {image} ({label}) failed: {done.stderr.strip()}")
