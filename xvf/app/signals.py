"""The daemon's signals: SIGTERM/SIGINT stop it, SIGHUP re-reads the log level."""

from __future__ import annotations

import logging
import signal

from xvf.app.config import load_config
from xvf.daemon.frontend import Frontend
from xvf.errors import XvfError

log = logging.getLogger("xvf.daemon.frontend")


def install_signal_handlers(frontend: Frontend, config_path: str | None = None) -> None:
    def on_stop(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        frontend.stop()

    def on_hup(_signum: int, _frame: object) -> None:
        if config_path is None:
            log.info("SIGHUP: no --config file, nothing to reload")
            return

        try:
            level = load_config(config_path).get("log_level")
        except XvfError as exc:
            log.error("SIGHUP: keeping the current settings: %s", exc)
            return
        if level:
            # Said before the change, so that it shows even when raising the level.
            log.warning("SIGHUP: log level is now %s (other settings need a restart)", level)
            logging.getLogger().setLevel(level.upper())

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
