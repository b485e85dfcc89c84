"""Entry point of xen-vhost-frontend / xvf."""

from __future__ import annotations

import logging
import sys

from xvf.argparser import build_parser
from xvf.errors import ConfigError, XvfError

log = logging.getLogger("xvf")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def open_platform(sim_dir: str | None):
    if sim_dir:
        from xvf.sim.platform import SimPlatform

        return SimPlatform(sim_dir)
    from xvf.xen.platform import XenPlatform

    return XenPlatform()


def mapping_of(args) -> str:
    """--mapping, with --foreign-mapping as its older spelling; they must not disagree."""
    if args.foreign_mapping:
        if args.mapping not in (None, "foreign"):
            raise ConfigError(f"--foreign-mapping contradicts --mapping {args.mapping}")
        return "foreign"
    return args.mapping or "grant"


def run_daemon(args) -> int:
    from xvf.frontend import Frontend, install_signal_handlers

    mapping = mapping_of(args)
    platform = open_platform(args.sim)
    try:
        frontend = Frontend(
            platform,
            args.socket_path,
            mapping=mapping,
            socket_timeout=args.socket_timeout,
            offload=not args.ioreq_only,
        )
        install_signal_handlers(frontend, args.config)
        try:
            frontend.run()
        finally:
            frontend.close()
    finally:
        platform.close()
    log.info("xvf stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.config:
            from xvf.config import load_config

            # The file's values become defaults, so explicit options still win.
            parser.set_defaults(**load_config(args.config))
            args = parser.parse_args(argv)
    except XvfError as exc:
        parser.error(str(exc))
    setup_logging(args.log_level)
    try:
        if args.command == "sim":
            from xvf.sim.demo import run_demo

            return run_demo(args)
        if args.command == "check":
            from xvf.doctor import run_check

            return run_check(args)
        if args.command == "status":
            from xvf.status import run_status

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
