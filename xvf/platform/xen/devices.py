"""Opening the Linux Xen driver devices (/dev/xen/*) with errors that say what to do.

Every failure names the device, the kernel module that provides it and the
kernel option that builds that module, so an operator can fix a Dom0 from the
message alone.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from xvf.errors import PlatformUnavailable

DEFAULT_DEV_DIR = "/dev/xen"


@dataclass(frozen=True)
class XenDevice:
    name: str  # file name under /dev/xen
    module: str  # `modprobe` name
    option: str  # kernel config option that builds it
    purpose: str


DEVICES = {
    "privcmd": XenDevice(
        "privcmd", "xen-privcmd", "CONFIG_XEN_PRIVCMD", "dm_op hypercalls and foreign mappings"
    ),
    "evtchn": XenDevice("evtchn", "xen-evtchn", "CONFIG_XEN_DEV_EVTCHN", "event channels"),
    "gntdev": XenDevice("gntdev", "xen-gntdev", "CONFIG_XEN_GNTDEV", "grant mappings"),
}


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a character device"


def missing_message(dev_dir: str, name: str) -> str:
    dev = DEVICES[name]
    path = os.path.join(dev_dir, name)
    msg = f"{path} ({dev.purpose}) is missing"
    if os.path.isdir(dev_dir):
        return (
            f"{msg}. Load its driver with `modprobe {dev.module}` "
            f"(kernel option {dev.option}=y or =m)"
        )
    needed = ", ".join(f"{d.name}: {d.module} ({d.option})" for d in DEVICES.values())
    modules = " ".join(d.module for d in DEVICES.values())
    return (
        f"{msg}: {dev_dir} does not exist, so this is not a Xen Dom0 kernel or its Xen "
        f"drivers are not loaded. xvf needs {needed}; load them with `modprobe {modules}` "
        "and run xvf in the Dom0 of a Xen host"
    )


def open_device(dev_dir: str, name: str, nonblock: bool = False) -> int:
    """Open /dev/xen/<name> read-write; raise PlatformUnavailable saying how to get it."""
    dev = DEVICES[name]
    path = os.path.join(dev_dir, name)
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise PlatformUnavailable(missing_message(dev_dir, name)) from None
    except PermissionError:
        raise PlatformUnavailable(
            f"cannot open {path} ({dev.purpose}): permission denied; run as root"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise PlatformUnavailable(
                f"{path} exists but no driver answers ({os.strerror(exc.errno)}): "
                f"`modprobe {dev.module}` (kernel option {dev.option}) and run under Xen"
            ) from None
        raise PlatformUnavailable(f"cannot open {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISCHR(mode):
        os.close(fd)
        raise PlatformUnavailable(
            f"{path} is {_kind(mode)}, not the Xen {name} character device of the "
            f"{dev.module} driver (kernel option {dev.option})"
        )
    return fd


def not_the_driver(dev_dir: str, name: str, err: int | None) -> PlatformUnavailable:
    """The device opened but refused the driver's own harmless ioctl."""
    err = err or errno.EIO  # OSError.errno may be None
    dev = DEVICES[name]
    path = os.path.join(dev_dir, name)
    return PlatformUnavailable(
        f"{path} is a character device but not the Xen {name} driver: its probe ioctl "
        f"failed with {errno.errorcode.get(err, err)} ({os.strerror(err)}). Expected the "
        f"{dev.module} driver (kernel option {dev.option})"
    )
