"""Entry point of xen-vhost-frontend / xvf."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from xvf.app.argparser import build_parser
from xvf.errors import ConfigError, XvfError

if TYPE_CHECKING:  # the platforms themselves are imported only when chosen
    from xvf.platform.interface import Platform

log = logging.getLogger("xvf")


# syslog priorities: journald reads a "<N>" line prefix as the entry's level
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


class JournalFormatter(logging.Formatter):
    """No timestamp (the journal has its own) and a <N> priority prefix."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = 7
        for level, p in _PRIORITY.items():  # ascending: the last one reached wins
            if record.levelno >= level:
                prio = p
        if record.levelno >= logging.CRITICAL:
            prio = 2
        return f"<{prio}>" + super().format(record)


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal stream ($JOURNAL_STREAM is its dev:ino)."""
    try:
        dev, ino = os.environ["JOURNAL_STREAM"].split(":")
        st = os.fstat(sys.stderr.fileno())
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (KeyError, ValueError, OSError, AttributeError):
        return False


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def open_platform(sim_dir: str | None) -> Platform:
    if sim_dir:
        from xvf.platform.sim.platform import SimPlatform

        return SimPlatform(sim_dir)
    from xvf.platform.xen.platform import XenPlatform

    return XenPlatform()


def mapping_of(args) -> str:
    """--mapping, with --foreign-mapping as its older spelling; they must not disagree."""
    if args.foreign_mapping:
        if args.mapping not in (None, "foreign"):
            raise ConfigError(f"--foreign-mapping contradicts --mapping {args.mapping}")
        return "foreign"
    return args.mapping or "grant"


def open_status(path: str | None, frontend):
    """The status socket in the frontend's loop, or None (disabled, taken, failed)."""
    if not path:
        return None
    from xvf.app.status import StatusServer

    server = StatusServer(path, frontend.loop, frontend.status)
    try:
        return server if server.open() else None
    except OSError as exc:
        log.warning("no status socket at %s (`xvf status` will not work): %s", path, exc)
        return None


def run_daemon(args) -> int:
    from xvf.app.signals import install_signal_handlers
    from xvf.daemon.frontend import Frontend

    mapping = mapping_of(args)
    platform = open_platform(args.sim)
    try:
        frontend = Frontend(
            platform,
            args.socket_path,
            mapping=mapping,
            socket_timeout=args.socket_timeout,
            offload=not args.ioreq_only,
            fs_tag=args.fs_tag,
            poll_us=args.poll_us,
            guest_threads=args.service_threads == "per-guest",
        )
        install_signal_handlers(frontend, args.config)
        status = open_status(args.status_socket, frontend)
        try:
            frontend.run()
        finally:
            if status is not None:
                status.close()
            try:
                frontend.close()
            except XvfError as exc:  # the platform may be the thing that died
                log.warning("closing: %s", exc)
    finally:
        platform.close()
    if frontend.failure is not None:
        log.error("xvf stopped: %s", frontend.failure)
        return 1
    log.info("xvf stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.config:
            from xvf.app.config import load_config

            # The file's values become defaults, so explicit options still win.
            parser.set_defaults(**load_config(args.config))
            args = parser.parse_args(argv)
    except XvfError as exc:
        parser.error(str(exc))
    setup_logging(args.log_level)
    try:
        if args.command == "sim":
            from xvf.app.demo import run_demo

            return run_demo(args)
        if args.command == "check":
            from xvf.app.doctor import run_check

            return run_check(args)
        if args.command == "status":
            from xvf.app.status import run_status

            return run_status(args)
        if not args.socket_path:
            parser.error("--socket-path is required")
        return run_daemon(args)
    except XvfError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
