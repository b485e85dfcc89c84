"""The command line users are promised: options, help, version, config file, bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from xvf import __version__
from xvf.app.argparser import build_parser
from xvf.app.config import load_config
from xvf.errors import ConfigError


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xvf", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def test_help_documents_the_seed_options():
    out = run_cli("--help").stdout
    for text in (
        "--socket-path DIR",
        "--foreign-mapping",
        "--version",
        "--log-level",
        "<device-name>.sock<N>",
        "grant mapping",
        "--config FILE",
        "sim",
    ):
        assert text in out, text


def test_both_console_scripts_are_the_same_program():
    for name in ("xen-vhost-frontend", "xvf"):
        exe = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
        if not os.path.exists(exe):
            pytest.skip(f"{name} is not installed next to {sys.executable}")
        res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        assert res.stdout.strip() == f"xen-vhost-frontend {__version__}"


def test_socket_path_is_required():
    res = run_cli()
    assert res.returncode == 2
    assert "--socket-path is required" in res.stderr


def test_defaults_are_grant_mapping():
    args = build_parser().parse_args(["--socket-path", "/x"])
    assert args.foreign_mapping is False
    assert args.socket_timeout == 30.0


def test_poll_us_is_off_by_default_and_bounded():
    assert build_parser().parse_args(["--socket-path", "/x"]).poll_us == 0
    assert build_parser().parse_args(["--socket-path", "/x", "--poll-us", "25"]).poll_us == 25
    for bad, why in (("-1", "outside"), ("2e6", "outside"), ("soon", "not a number")):
        res = run_cli("--socket-path", "/x", "--poll-us", bad)
        assert res.returncode == 2 and why in res.stderr, res.stderr


def test_missing_xen_gives_a_clear_error(tmp_path):
    res = run_cli("--socket-path", str(tmp_path), "--sim", str(tmp_path / "nowhere"))
    assert res.returncode == 1
    assert "no software Xen" in res.stderr


def test_config_file(tmp_path):
    cfg = tmp_path / "xvf.toml"
    cfg.write_text('socket_path = "/srv/sockets"\nforeign_mapping = true\nlog_level = "debug"\n')
    assert load_config(str(cfg)) == {
        "socket_path": "/srv/sockets",
        "foreign_mapping": True,
        "log_level": "debug",
    }
    for bad, why in (
        ('sockets = "/x"', "unknown key"),
        ("foreign_mapping = 1", "wrong type"),
        ('log_level = "loud"', "log_level must be"),
        ("socket_timeout = -1", "positive"),
        ("poll_us = -3", "poll_us must be within"),
        ('poll_us = "fast"', "wrong type"),
        ("socket_path = ", "not valid TOML"),
    ):
        cfg.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=why):
            load_config(str(cfg))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.toml"))


def test_command_line_wins_over_config_file(tmp_path):
    cfg = tmp_path / "xvf.toml"
    cfg.write_text(f'socket_path = "{tmp_path}"\nsocket_timeout = 5\n')
    res = run_cli("--config", str(cfg), "--sim", str(tmp_path / "nowhere"))
    assert "no software Xen" in res.stderr  # socket_path came from the file
    res = run_cli("--config", str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and "cannot read config file" in res.stderr


def test_build_without_a_compiler_names_the_package(tmp_path):
    # Only python itself on PATH: no cc, no gcc.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python3")
    env = {"PATH": str(bindir), "HOME": str(tmp_path)}
    res = subprocess.run(
        [str(bindir / "python3"), "setup.py", "build_ext"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode != 0
    assert "no C compiler found" in res.stderr
    assert "apt-get install gcc" in res.stderr
