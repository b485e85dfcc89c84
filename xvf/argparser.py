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
Guest memory is shared with the backend by grant mapping unless
--foreign-mapping is given. Grant mapping needs grant_usage=1 (the
default for a backend in Dom0) in the guest's virtio line; foreign mapping maps
the whole guest RAM and needs grant_usage=0.

The subcommand `sim` runs a software Xen (no hypervisor needed) with a guest
doing real I/O through xvf to a vhost-user backend; see `xvf sim --help`."""

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_frontend_options(parser: argparse._ActionsContainer) -> None:
    """Options shared by the daemon and the simulator demo."""
    parser.add_argument(
        "--socket-path",
        metavar="DIR",
        help="directory holding the backends' vhost-user sockets, named "
        "<device-name>.sock<N> (N from 0 per device name, e.g. i2c.sock0)",
    )
    parser.add_argument(
        "--foreign-mapping",
        action="store_true",
        help="map the whole guest RAM in advance (foreign mapping) instead of "
        "mapping the pages the guest grants on demand (grant mapping, the default)",
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
        help="TOML file with any of socket_path, foreign_mapping, socket_timeout, log_level; "
        "options given on the command line win; SIGHUP re-reads its log_level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
        "--sim",
        metavar="PATH",
        help="serve the software Xen whose sockets are in directory PATH (see `xvf sim`) "
        "instead of the real hypervisor under /dev/xen",
    )
    return parser
