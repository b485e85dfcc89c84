"""Command-line grammar of xen-vhost-frontend.

Kept free of project imports so that argparse-manpage can load this file on its
own at build time, before the Cython extensions exist.
"""

from __future__ import annotations

import argparse

VERSION = "0.1.0"

DESCRIPTION = """\
Xen vhost-user frontend. Watches xenstore for virtio-mmio devices that the
toolstack (xl create with a virtio = [...] line) configured for guests,
registers an IOREQ server for each device's MMIO window, emulates the
virtio-mmio v2 register file and connects each device to a vhost-user backend
listening on SOCKET_PATH/<device-name>.sock<N>, where N counts the instances
of that device name from 0 (i2c.sock0, i2c.sock1, gpio.sock0, ...)."""

EPILOG = """\
Memory mapping (--mapping): grant mapping, the default, shares only the pages
the guest grants and needs grant_usage=1 in the guest's virtio line; foreign
mapping (--mapping foreign, or --foreign-mapping) maps the whole guest RAM in
advance and needs grant_usage=0; per-device takes each device's mapping from its
own grant_usage (1: grant, 0: foreign), so one daemon serves both kinds of guest. In grant and
foreign mode a device whose grant_usage does not match is refused with the fix
named.

Each device's state is published in xenstore, in
/local/domain/0/backend/virtio/<domid>/<devid>/state: 4 once served, 6 when
refused or stopped. Create guests paused (xl create -p) and unpause them once
every device is 4.

Subcommands: `check` inspects this Dom0 and says what is missing for xvf;
`status` asks the running daemon what it serves; `sim` runs a software Xen (no
hypervisor needed) with a guest doing real I/O through xvf to a vhost-user
backend."""

MAPPINGS = ("grant", "foreign", "per-device")

LOG_LEVELS = ("debug", "info", "warning", "error")
SERVICE_THREADS = ("per-guest", "one")
DEFAULT_STATUS_SOCKET = "/run/xvf/status.sock"


MAX_POLL_US = 1_000_000.0


def poll_time(text: str) -> float:
    """--poll-us: microseconds, 0 (the default: never spin) up to one second."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds") from None
    if not 0 <= value <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..{MAX_POLL_US:.0f} µs")
    return value


def add_frontend_options(parser: argparse._ActionsContainer) -> None:
    """Options shared by the daemon and the simulator demo."""
    parser.add_argument(
        "--socket-path",
        metavar="DIR",
        help="directory holding the backends' vhost-user sockets, named "
        "<device-name>.sock<N> (N from 0 per device name, e.g. i2c.sock0)",
    )
    parser.add_argument(
        "--mapping",
        choices=MAPPINGS,
        default=None,
        help="how backends reach guest memory: grant (the default: the pages the guest "
        "grants, on demand; needs grant_usage=1), foreign (the whole guest RAM in "
        "advance; needs grant_usage=0), per-device (from each device's grant_usage)",
    )
    parser.add_argument(
        "--foreign-mapping",
        action="store_true",
        help="the same as --mapping foreign",
    )
    parser.add_argument(
        "--socket-timeout",
        metavar="SECONDS",
        type=float,
        default=30.0,
        help="how long to wait for a backend socket to appear before giving up "
        "on that device (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xen-vhost-frontend",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="log verbosity (default: %(default)s)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with any of socket_path, mapping, foreign_mapping, socket_timeout, "
        "log_level, status_socket, fs_tag, poll_us, service_threads; options given on the "
        "command line win; SIGHUP re-reads its log_level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser(
        "check",
        help="inspect this Dom0: what xvf needs, what is missing, and the fix",
        description="Check, item by item, what serving virtio devices on this Dom0 "
        "needs: the hypervisor (IOREQ server support), /dev/xen devices, the kernel's "
        "privcmd ioeventfd/irqfd, xenstored, and each guest's virtio devices "
        "(known type, backend socket answering, grant_usage against the mapping). "
        "Exit status 0 only when everything needed is there.",
    )
    add_frontend_options(check)
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    check.add_argument("--sim", metavar="PATH", help=argparse.SUPPRESS)  # a software Xen's dir
    status = sub.add_parser(
        "status",
        help="ask the running daemon what it serves",
        description="Print the guests and devices the running daemon serves, their "
        "memory mapping, notification path, backend state and counters.",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--status-socket",
        metavar="PATH",
        # SUPPRESS: without the option, the value from --config (or the default) stays
        default=argparse.SUPPRESS,
        help=f"the daemon's status socket (default: status_socket of --config, else "
        f"{DEFAULT_STATUS_SOCKET})",
    )
    sim = sub.add_parser(
        "sim",
        help="run a simulated Xen guest with virtio devices through xvf",
        description="Start a software Xen, create a guest from an xl-style "
        "virtio line, serve it with xvf and run the guest's I/O against real "
        "vhost-user backends.",
    )
    add_frontend_options(sim)
    sim.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="log verbosity (same as before the subcommand)",
    )
    sim.add_argument(
        "--virtio",
        metavar="LINE",
        default='virtio = [ "type=virtio,device2, transport=mmio, grant_usage=1" ]',
        help="xl-style virtio line describing the guest's devices (default: one virtio-blk)",
    )
    sim.add_argument(
        "--start-backends",
        action="store_true",
        help="start the backends the devices need (qemu-storage-daemon for blk) "
        "in --socket-path before running the guest",
    )
    sim.add_argument(
        "--io-mib",
        type=int,
        default=16,
        metavar="MIB",
        help="how much data the guest writes and reads back per block device "
        "(default: %(default)s)",
    )
    sim.add_argument(
        "--xenstore-socket",
        metavar="PATH",
        help="also leave the simulated xenstored listening at PATH (for xenstore-ls)",
    )
    # The daemon's own options live at top level so that
    # `xen-vhost-frontend --socket-path DIR` works without a subcommand.
    daemon = parser.add_argument_group("daemon options")
    add_frontend_options(daemon)
    daemon.add_argument(
        "--ioreq-only",
        action="store_true",
        help="handle every QueueNotify and interrupt in xvf even where the Dom0 kernel "
        "could take them over (privcmd ioeventfd/irqfd, Linux 6.7+)",
    )
    daemon.add_argument(
        "--poll-us",
        metavar="MICROSECONDS",
        type=poll_time,
        default=0.0,
        help="after each event, spin this long on the guests' ioreq slots before sleeping "
        "on the event channel: lower access latency for a CPU kept busy (default: "
        "%(default)s, never spin)",
    )
    daemon.add_argument(
        "--service-threads",
        choices=SERVICE_THREADS,
        default="per-guest",
        help="per-guest (the default): each guest's ioreqs are served on a thread of its "
        "own without the GIL, so guests run on separate cores and none waits for "
        "another or for the daemon's Python; one: every guest on the daemon's thread",
    )
    daemon.add_argument(
        "--status-socket",
        metavar="PATH",
        default=DEFAULT_STATUS_SOCKET,
        help="root-only unix socket where `xvf status` asks the daemon what it serves "
        "(default: %(default)s; empty: none)",
    )
    daemon.add_argument(
        "--fs-tag",
        metavar="TAG",
        default="xvf",
        help="the mount tag virtio-fs guests read when the fs backend serves no config "
        "space itself, as QEMU's C virtiofsd (default: %(default)s)",
    )
    daemon.add_argument(
        "--sim",
        metavar="PATH",
        help="serve the software Xen whose sockets are in directory PATH (see `xvf sim`) "
        "instead of the real hypervisor under /dev/xen",
    )
    return parser
