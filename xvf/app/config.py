"""The optional TOML configuration file (`--config FILE`).

Keys mirror the long options: socket_path, mapping, foreign_mapping,
socket_timeout, log_level, status_socket, fs_tag, poll_us, service_threads.
Command-line options win over the file. On SIGHUP the daemon re-reads the file
and applies log_level; other keys need a restart.
"""

from __future__ import annotations

import tomllib
from typing import Any

from xvf.app.argparser import LOG_LEVELS, MAPPINGS, MAX_POLL_US, SERVICE_THREADS
from xvf.errors import ConfigError

_TYPES: dict[str, type | tuple[type, ...]] = {
    "socket_path": str,
    "mapping": str,
    "foreign_mapping": bool,
    "status_socket": str,
    "socket_timeout": (int, float),
    "log_level": str,
    "fs_tag": str,
    "poll_us": (int, float),
    "service_threads": str,
}


def load_config(path: str) -> dict[str, Any]:
    """Read and validate `path`; ConfigError names the file and the bad key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        want = _TYPES.get(key)
        if want is None:
            known = ", ".join(sorted(_TYPES))
            raise ConfigError(f"{path}: unknown key {key!r} (known: {known})")
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise ConfigError(f"{path}: {key} = {value!r} has the wrong type")
    level = data.get("log_level")
    if level is not None and level not in LOG_LEVELS:
        raise ConfigError(f"{path}: log_level must be one of {', '.join(LOG_LEVELS)}")
    if "mapping" in data and data["mapping"] not in MAPPINGS:
        raise ConfigError(f"{path}: mapping must be one of {', '.join(MAPPINGS)}")
    if "socket_timeout" in data and data["socket_timeout"] <= 0:
        raise ConfigError(f"{path}: socket_timeout must be positive")
    if "poll_us" in data and not 0 <= data["poll_us"] <= MAX_POLL_US:
        raise ConfigError(f"{path}: poll_us must be within 0..{MAX_POLL_US:.0f}")
    if "service_threads" in data and data["service_threads"] not in SERVICE_THREADS:
        raise ConfigError(f"{path}: service_threads must be one of {', '.join(SERVICE_THREADS)}")
    return data
