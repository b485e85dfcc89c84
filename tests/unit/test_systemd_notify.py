"""sd_notify without libsystemd, and logging for the journal.

The protocol is driven against a SOCK_DGRAM socket the test owns, first in-process and
then from a real xvf process serving the software Xen, as systemd would see it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_qsd
from xvf.app.cli import JournalFormatter
from xvf.daemon import systemd


@pytest.fixture
def notify_socket(run_dir, monkeypatch):
    path = os.path.join(run_dir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def messages(sock: socket.socket, count: int) -> list[str]:
    return [sock.recv(4096).decode() for _ in range(count)]


def test_nothing_is_sent_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_abstract_socket_names(monkeypatch):
    name = f"xvf-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_a_missing_socket_is_not_an_error(run_dir, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(run_dir, "gone.sock"))
    assert systemd.notify("READY=1") is False


def test_ready_once_status_on_change_stopping_once(notify_socket):
    n = systemd.Notifier()
    n.served(0, 0)
    n.served(0, 0)  # unchanged: nothing
    n.served(1, 2)
    n.served(1, 2)
    n.stop()
    n.stop()
    assert messages(notify_socket, 3) == [
        "READY=1\nSTATUS=0 guests, 0 devices served",
        "STATUS=1 guest, 2 devices served",
        "STOPPING=1",
    ]
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        notify_socket.recv(100)


@pytest.mark.parametrize(
    "level,prio",
    [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
     (logging.CRITICAL, 2)],
)  # fmt: skip
def test_journal_format_has_priorities_and_no_timestamp(level, prio):
    record = logging.LogRecord("xvf.device", level, __file__, 1, "dom1/blk0: %s", ("x",), None)
    assert JournalFormatter().format(record) == f"<{prio}>xvf.device: dom1/blk0: x"


def test_journal_stream_is_recognised_only_when_it_is_stderr(run_dir):
    code = "import logging; from xvf.app.cli import setup_logging; setup_logging('info'); "
    code += "logging.getLogger('xvf.t').warning('hello')"
    out = os.path.join(run_dir, "stderr")
    open(out, "wb").close()
    st = os.stat(out)
    for stream, journal in ((f"{st.st_dev}:{st.st_ino}", True), ("1:2", False)):
        env = {**os.environ, "JOURNAL_STREAM": stream}
        with open(out, "wb") as err:
            subprocess.run([sys.executable, "-c", code], stderr=err, env=env, cwd=REPO, check=True)
        text = open(out).read()
        if journal:
            assert text == "<4>xvf.t: hello\n"
        else:
            assert re.match(r"\d{4}-\d\d-\d\d .* WARNING xvf.t: hello\n", text), text


@needs_qsd
def test_a_real_xvf_notifies_systemd_and_logs_for_the_journal(
    hypervisor, sockets, start_frontend, start_blk_backend, run_dir, notify_socket, monkeypatch
):
    # start_frontend's first log file: made now, so that its dev:ino is the JOURNAL_STREAM
    # of xvf's stderr (the fixture reopens the same file for writing).
    log_path = os.path.join(run_dir, "xvf0.log")
    open(log_path, "wb").close()
    st = os.stat(log_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    start_blk_backend(sockets, "blk.sock0", size=16 << 20)
    fe = start_frontend(sockets, foreign=True)
    assert messages(notify_socket, 1) == ["READY=1\nSTATUS=0 guests, 0 devices served"]
    hypervisor.create_domain(
        "sd", memory_mib=32, vcpus=1,
        virtio='virtio = [ "type=virtio,device2, transport=mmio, grant_usage=0" ]',
    )  # fmt: skip
    assert messages(notify_socket, 1) == ["STATUS=1 guest, 1 device served"]
    fe.wait_log("serving virtio blk")
    fe.stop()
    assert messages(notify_socket, 1) == ["STOPPING=1"]
    lines = fe.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>xvf[.\w]*: ", ln) for ln in lines), lines[:5]
    assert any(ln.startswith("<6>xvf.device: dom1/blk0: serving virtio blk") for ln in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", ln) for ln in lines)
