"""Where the rig keeps its builds, and the stamps that make each stage resumable."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

DEFAULT_CACHE = "/var/tmp/xvf-rig"


def cache_dir() -> Path:
    path = Path(os.environ.get("XVF_RIG_CACHE", DEFAULT_CACHE))
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(msg: str) -> None:
    print(f"rig: {msg}", flush=True)


def fingerprint(*parts: str | bytes | Path) -> str:
    """A short digest of a stage's inputs (file contents for Paths), so an edited input rebuilds."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        elif isinstance(part, str):
            h.update(part.encode())
        else:
            h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def stage(name: str, inputs: str, outputs: Iterable[Path], build: Callable[[], None]) -> None:
    """Run `build` unless every output exists and the stamp records the same `inputs` digest.

    A stage that fails leaves no stamp, so the next run starts it again; builders write
    their outputs atomically (to a temporary name, then rename) where that matters.
    """
    stamp = cache_dir() / "stamps" / name
    outputs = list(outputs)
    if stamp.exists() and stamp.read_text() == inputs and all(p.exists() for p in outputs):
        log(f"{name}: cached")
        return
    log(f"{name}: building")
    t0 = time.monotonic()
    build()
    missing = [str(p) for p in outputs if not p.exists()]
    if missing:
        raise RuntimeError(f"stage {name} finished without producing {', '.join(missing)}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(inputs)
    log(f"{name}: built in {time.monotonic() - t0:.0f} s")
