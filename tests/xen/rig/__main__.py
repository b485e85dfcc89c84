"""The real-Xen rig from the command line: build what is missing, boot, run the suite.

    python3 -m tests.xen.rig run [-k EXPR] [--timeout S]   the suite (scripts/run-xen-tests.sh)
    python3 -m tests.xen.rig build                         only build/refresh the cache
    python3 -m tests.xen.rig shell                         boot to a root shell on the console
    python3 -m tests.xen.rig status                        what the cache holds

Each run gets runs/<timestamp>/ in the cache: the console log, and results/ copied back from
the work disk (junit.xml, every test's xvf/backend logs and guest consoles).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .cache import cache_dir, log

REPO = Path(__file__).resolve().parents[3]
EXIT_NO_INPUT = 3  # the hypervisor image is missing: the suite cannot run here


def build_all() -> dict[str, Path]:
    """Every input of a boot, built into the cache where missing (each stage resumable)."""
    from .dom0 import build_dom0_rootfs
    from .domu import build_domu_initramfs
    from .hypervisor import (
        RigInputMissing,
        build_from_debian_source,
        cached_image,
        check_image,
        hypervisor_image,
    )
    from .kernel import build_kernel
    from .trixie import ensure_lists
    from .xvf_build import build_xvf_wheel

    ensure_lists()
    try:
        xen = hypervisor_image()
    except RigInputMissing as exc:
        if not exc.buildable:
            raise
        log("no hypervisor image; building it from Debian's xen source package")
        xen = build_from_debian_source(cached_image())
    log(f"hypervisor: {xen} (Xen {check_image(xen)})")
    return {
        "xen": xen,
        "kernel": build_kernel(),
        "rootfs": build_dom0_rootfs(),
        "initramfs": build_domu_initramfs(),
        "wheel": build_xvf_wheel(REPO),
    }


def _source_files() -> list[str]:
    """The tests/ tree as the checkout has it now (tracked and new files, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [p for p in out.splitlines() if (REPO / p).is_file()]


RUN_SH = """#!/bin/sh
# Written by tests/xen/rig/__main__.py: what the Dom0 runs from the work disk.
set -u
cd /xvf
echo "run.sh: installing $(basename /xvf/{wheel})"
pip install --no-deps --no-index --break-system-packages /xvf/{wheel} >/xvf/results/pip.log 2>&1 \\
    || {{ cat /xvf/results/pip.log; exit 90; }}
xen-vhost-frontend --version
cd /xvf/src
# Only tests/ is here (never xvf/: the installed wheel must be what is imported).
XVF_RIG=1 timeout -k 10 {budget} python3 -m pytest -p no:cacheprovider \\
    --confcutdir=tests/xen/cases -o junit_family=xunit2 \\
    --junitxml=/xvf/results/junit.xml -v -rA {pytest_args} tests/xen/cases
rc=$?
cp -r /var/log/xen /xvf/results/var-log-xen 2>/dev/null
xl dmesg >/xvf/results/xl-dmesg.txt 2>&1
exit $rc
"""


def stage_work_disk(run_dir: Path, built: dict[str, Path], pytest_args: list[str], budget: int):
    stage = run_dir / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    (stage / "results").mkdir(parents=True)
    (stage / "domu").mkdir()
    shutil.copy2(built["kernel"], stage / "domu" / "Image")
    shutil.copy2(built["initramfs"], stage / "domu" / "initramfs.cpio.gz")
    shutil.copy2(built["wheel"], stage / built["wheel"].name)
    for rel in _source_files():
        dest = stage / "src" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    args = " ".join(_shell_quote(a) for a in pytest_args)
    run_sh = RUN_SH.format(wheel=built["wheel"].name, budget=budget, pytest_args=args)
    (stage / "run.sh").write_text(run_sh)
    return stage


def _shell_quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def summarize(junit: Path) -> tuple[int, int, int]:
    """Print one line per test from junit.xml; returns (passed, failed, skipped)."""
    if not junit.exists():
        print("rig: no junit.xml came back (the suite did not run to its end)")
        return 0, 0, 0
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        counts[outcome] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        print(f"rig: {outcome.upper():7} {float(case.get('time', 0)):7.1f}s  {name}")
    return counts["passed"], counts["failed"], counts["skipped"]


def cmd_run(args: argparse.Namespace, shell: bool = False) -> int:
    from .boot import boot, make_work_disk, read_results

    t0 = time.monotonic()
    built = build_all()
    log(f"inputs ready in {time.monotonic() - t0:.0f} s")
    run_dir = cache_dir() / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    pytest_args = ["-k", args.k] if getattr(args, "k", None) else []
    budget = max(60, args.timeout - 240)  # what is left after booting and shutting down
    stage = stage_work_disk(run_dir, built, pytest_args, budget)
    work = run_dir / "work.img"
    make_work_disk(stage, work)
    console = run_dir / "console.log"
    log(f"booting (console: {console})")
    t1 = time.monotonic()
    rc = boot(built["xen"], built["kernel"], built["rootfs"], work, console, args.timeout, shell)
    log(f"Xen ran {time.monotonic() - t1:.0f} s; run.sh exit status {rc}")
    if shell:
        return rc
    results = run_dir / "results"
    read_results(work, results)
    passed, failed, skipped = summarize(results / "junit.xml")
    log(
        f"{passed} passed, {failed} failed, {skipped} skipped on real Xen in "
        f"{time.monotonic() - t0:.0f} s; results in {results}"
    )
    latest = cache_dir() / "runs" / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.name)
    if rc == 0 and passed and not failed:
        return 0
    return rc or 1


def cmd_status() -> int:
    from .hypervisor import RigInputMissing, hypervisor_image

    root = cache_dir()
    print(f"cache: {root}")
    try:
        print(f"hypervisor: {hypervisor_image()}")
    except RigInputMissing as exc:
        print(f"hypervisor: missing: {exc}")
    for name in sorted((root / "stamps").glob("*")) if (root / "stamps").exists() else []:
        print(f"stage {name.name}: built {time.ctime(name.stat().st_mtime)}")
    runs = sorted((root / "runs").glob("2*")) if (root / "runs").exists() else []
    print(f"runs: {len(runs)}" + (f", latest {runs[-1]}" if runs else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.xen.rig", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build what is missing, boot, run the real-Xen suite")
    run.add_argument("-k", help="pytest -k expression: run only matching tests")
    run.add_argument("--timeout", type=int, default=int(os.environ.get("XVF_RIG_TIMEOUT", 2400)))
    sub.add_parser("build", help="only build the cache")
    shell = sub.add_parser("shell", help="boot to an interactive root shell")
    shell.add_argument("--timeout", type=int, default=3600)
    sub.add_parser("status", help="what the cache holds")
    args = parser.parse_args(argv)
    from .hypervisor import RigInputMissing

    try:
        if args.command == "build":
            build_all()
            return 0
        if args.command == "status":
            return cmd_status()
        return cmd_run(args, shell=args.command == "shell")
    except RigInputMissing as exc:
        print(f"rig: cannot run: {exc}", file=sys.stderr)
        return EXIT_NO_INPUT


if __name__ == "__main__":
    sys.exit(main())
