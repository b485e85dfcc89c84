"""Boot Xen + the Dom0 under qemu-system-aarch64 (TCG) and run a work disk's run.sh.

The machine has two disks: the cached Dom0 root (opened with snapshot=on, so runs never
change it, and any number can share it) and a per-run ext4 work disk that carries run.sh
in and /results out. tests/xen/dom0/init mounts the work disk on /xvf, runs run.sh, prints
`XVF-RIG: run.sh exit N` and powers off, which ends Xen and QEMU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cache import log
from .images import make_ext4

QEMU = os.environ.get("XVF_RIG_QEMU", "qemu-system-aarch64")
# Xen 4.20 on QEMU's virt board: EL2 for Xen, a GICv3, 2 vCPUs (Dom0 gets one, DomUs the
# other), 4 GiB of which Dom0 gets 1.5 GiB and the rest is left for DomUs.
MACHINE = [
    "-machine",
    "virt,virtualization=on,gic-version=3",
    "-cpu",
    "cortex-a57",
    "-smp",
    "2",
    "-m",
    "4096",
    "-accel",
    "tcg,thread=multi",
]
XEN_CMDLINE = "console=dtuart dom0_mem=1536M,max:1536M dom0_max_vcpus=1 loglvl=all guest_loglvl=all"
# panic=5: a Dom0 panic (say, init missing) reboots, which ends QEMU (-no-reboot), instead
# of hanging until the timeout.
DOM0_CMDLINE = (
    "console=hvc0 earlycon=xenboot root=/dev/vda rootfstype=ext4 rw init=/sbin/xvf-rig-init panic=5"
)
# QEMU loads Xen (an arm64 Image) at 0x40200000 and puts the DTB at RAM base + 128 MiB
# (0x48000000) when there is no initrd; the Dom0 kernel goes well clear of both. Xen
# copies it into Dom0's own memory, so this address only has to be free at boot.
DOM0_KERNEL_ADDR = 0x50000000
WORK_LABEL = "xvf-work"

EXIT_LINE = re.compile(rb"XVF-RIG: run\.sh exit (\d+)")
# Returned instead of run.sh's status (always 0..255):
TIMEOUT = -1  # timeout_s passed; QEMU was killed
NO_STATUS = -2  # QEMU exited without printing run.sh's status (crash, panic, no run.sh)
# After the status line: logs are copied, the disk unmounted, the machine powered off.
POWEROFF_GRACE_S = 120


def make_work_disk(stage_dir: Path, image: Path, size_mb: int = 1024) -> None:
    """An ext4 image labelled xvf-work holding stage_dir's tree (run.sh at its top)."""
    make_ext4(stage_dir, image, f"{size_mb}M", WORK_LABEL)


def read_results(image: Path, into: Path) -> None:
    """Copy the work disk's /results tree into `into` (its contents, not a results/ dir).

    No mounting: debugfs reads the image. If the guest was killed before it unmounted,
    e2fsck first replays the journal so the last writes are there.
    """
    subprocess.run(["e2fsck", "-p", "-E", "journal_only", str(image)], capture_output=True)
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into.parent, prefix=".results-") as tmp:
        done = subprocess.run(
            ["debugfs", "-R", f"rdump /results {tmp}", str(image)], capture_output=True, text=True
        )
        got = Path(tmp) / "results"
        # debugfs exits 0 even when the path is missing; its stderr says so
        if not got.is_dir():
            raise RuntimeError(f"no /results on {image}: {done.stderr.strip()[-500:]}")
        for entry in got.iterdir():
            dest = into / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            entry.rename(dest)


def _device_value(text: str) -> str:
    # -device option values escape a comma by doubling it
    return text.replace(",", ",,")


def qemu_command(
    xen: Path, kernel: Path, rootfs: Path, work_disk: Path, console: list[str], dom0_args: str
) -> list[str]:
    return [
        QEMU,
        *MACHINE,
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(xen),
        "-append",
        XEN_CMDLINE,
        "-device",
        f"guest-loader,addr={DOM0_KERNEL_ADDR:#x},kernel={_device_value(str(kernel))},"
        f"bootargs={_device_value(dom0_args)}",
        "-drive",
        f"if=none,id=root,format=raw,snapshot=on,file={_device_value(str(rootfs))}",
        # Explicit transports: left to QEMU, the first disk takes the highest-addressed
        # one, and Dom0's kernel (probing Xen's DT in address order) calls the second vda.
        "-device",
        "virtio-blk-device,drive=root,bus=virtio-mmio-bus.0",
        "-drive",
        f"if=none,id=work,format=raw,file={_device_value(str(work_disk))}",
        "-device",
        "virtio-blk-device,drive=work,bus=virtio-mmio-bus.1",
        *console,
    ]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def boot(
    xen: Path,
    kernel: Path,
    rootfs: Path,
    work_disk: Path,
    console_log: Path,
    timeout_s: int,
    shell: bool = False,
    echo: bool = True,
) -> int:
    """Boot, wait for run.sh's status and for QEMU to exit; returns that status (0..255).

    Returns TIMEOUT if timeout_s passes first (QEMU is killed; the log's last line shows
    where the boot stopped), NO_STATUS if QEMU ends without the status line. With shell,
    the console is this terminal (`xvf.shell`: a root shell instead of run.sh; Ctrl-a x
    quits QEMU) and there is no timeout. Every console line also goes to console_log
    and, with echo, to stdout behind a "| " prefix.
    """
    console_log.parent.mkdir(parents=True, exist_ok=True)
    console_log.unlink(missing_ok=True)
    dom0_args = f"{DOM0_CMDLINE} xvf.epoch={int(time.time())}"
    if shell:
        dom0_args += " xvf.shell"
        console = [
            "-chardev",
            f"stdio,id=con,mux=on,signal=off,logfile={console_log}",
            "-serial",
            "chardev:con",
            "-mon",
            "chardev=con,mode=readline",
        ]
        cmd = qemu_command(xen, kernel, rootfs, work_disk, console, dom0_args)
        log(f"boot: {' '.join(cmd)}")
        return subprocess.run(cmd).returncode

    dom0_args += f" xvf.timeout={timeout_s}"
    console = [
        "-chardev",
        f"file,id=con,path={console_log}",
        "-serial",
        "chardev:con",
        "-monitor",
        "none",
    ]
    cmd = qemu_command(xen, kernel, rootfs, work_disk, console, dom0_args)
    log(f"boot: {' '.join(cmd)}")
    stderr_log = console_log.with_name(console_log.name + ".qemu-stderr")
    t0 = time.monotonic()
    with open(stderr_log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    status: int | None = None
    status_at = 0.0
    last_line = b""
    pending = b""
    offset = 0
    try:
        while True:
            exited = proc.poll() is not None
            # the chardev writes the log; read what is new since the last look
            if console_log.exists():
                with open(console_log, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    line = line.rstrip(b"\r")
                    if line.strip():
                        last_line = line
                    if echo:
                        sys.stdout.write("| " + line.decode(errors="replace") + "\n")
                    if b"XVF-RIG: dom0 ready" in line:
                        log(f"boot: dom0 ready {time.monotonic() - t0:.0f} s after QEMU started")
                    if status is None and (m := EXIT_LINE.search(line)):
                        status = int(m[1])
                        status_at = time.monotonic()
                if echo:
                    sys.stdout.flush()
            if exited:
                break
            now = time.monotonic()
            if now - t0 > timeout_s:
                _stop(proc)
                log(
                    f"boot: TIMEOUT after {timeout_s} s; the console's last line was: "
                    f"{last_line.decode(errors='replace')!r} (full log: {console_log})"
                )
                return TIMEOUT
            if status is not None and now - status_at > POWEROFF_GRACE_S:
                log(
                    f"boot: run.sh exited {status} but the machine did not power off "
                    f"within {POWEROFF_GRACE_S} s; killing QEMU"
                )
                _stop(proc)
                break
            time.sleep(0.2)
    finally:
        _stop(proc)
    elapsed = time.monotonic() - t0
    if status is None:
        qemu_err = stderr_log.read_text(errors="replace").strip()
        log(
            f"boot: QEMU exited ({proc.returncode}) after {elapsed:.0f} s without run.sh's "
            f"status; last console line: {last_line.decode(errors='replace')!r}"
            + (f"; QEMU said: {qemu_err[-500:]}" if qemu_err else "")
        )
        return NO_STATUS
    log(f"boot: run.sh exit {status}, QEMU done after {elapsed:.0f} s")
    return status
