"""Entry point of xen-vhost-frontend / xvf."""

from __future__ import annotations

import sys

from xvf.argparser import build_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and not args.socket_path:
        parser.error("--socket-path is required")
    print("xvf: not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
