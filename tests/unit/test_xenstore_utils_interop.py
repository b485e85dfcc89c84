"""Debian's xenstore-utils (the real libxenstore) against the simulator's XenStored.

libxenstore 4.17 takes the daemon's socket from $XENSTORED_PATH (it stat()s
the path and connects if it is a socket; strace-verified), so the tools talk
to XenStored exactly as they would to the C xenstored.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

TOOLS = ("xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-rm")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason="xenstore-utils not installed (apt-get install xenstore-utils)",
)


def tool(xsd, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, XENSTORED_PATH=xsd.path)
    r = subprocess.run(args, env=env, capture_output=True, timeout=10)
    if ok:
        assert r.returncode == 0, (args, r.stderr)
    return r


def test_python_write_tool_read(xsd, xs):
    xs.write("/vm/1/name", "guest-one")
    xs.write("/vm/1/raw", b"a\x01\xff\\b")
    assert tool(xsd, "xenstore-read", "/vm/1/name").stdout == b"guest-one\n"
    assert tool(xsd, "xenstore-read", "-R", "/vm/1/raw").stdout == b"a\x01\xff\\b"  # no newline
    # without -R the tool escapes non-printables the C way
    assert tool(xsd, "xenstore-read", "/vm/1/raw").stdout == b"a\\001\\xff\\\\b\n"
    r = tool(xsd, "xenstore-read", "/vm/1/missing", ok=False)
    assert r.returncode != 0 and b"couldn't read" in r.stderr


def test_tool_write_python_read(xsd, xs):
    tool(xsd, "xenstore-write", "/t/a", "1", "/t/b", "two words")
    tool(xsd, "xenstore-write", "/t/esc", "x\\x41y")  # the tool unescapes \xNN
    tool(xsd, "xenstore-write", "-R", "/t/raw", "x\\x41y")
    assert xs.directory("/t") == ["a", "b", "esc", "raw"]
    assert xs.read("/t/b") == "two words"
    assert xs.read_bytes("/t/esc") == b"xAy"
    assert xs.read_bytes("/t/raw") == b"x\\x41y"


def test_tool_write_fires_python_watch(xsd, xs):
    xs.watch("/watched", "tok")
    assert xs.wait_events(5) == [("/watched", "tok")]
    tool(xsd, "xenstore-write", "/watched/by/tool", "v")
    assert xs.wait_events(5) == [("/watched/by/tool", "tok")]


def test_ls_shows_tree_and_perms(xsd, xs):
    xs.write("/ls/a", "1")
    xs.write("/ls/b/c", "deep")
    xs.set_perms("/ls/b", ["n3", "r0"])
    out = tool(xsd, "xenstore-ls", "-f", "/ls").stdout.decode()
    assert out.splitlines() == ['/ls/a = "1"', '/ls/b = ""', '/ls/b/c = "deep"']
    perms = tool(xsd, "xenstore-ls", "-p", "/ls").stdout.decode().splitlines()
    assert perms[0].startswith('a = "1"') and perms[0].endswith("(n0)")
    assert perms[1].endswith("(n3,r0)")
    assert tool(xsd, "xenstore-read", "-p", "/ls/a").stdout == b"/ls/a: 1\n"


def test_ls_of_a_directory_too_big_for_one_reply(xsd, xs):
    """libxenstore falls back to XS_DIRECTORY_PART on E2BIG; XenStored must serve it."""
    names = [f"entry-with-a-long-name-{i:04d}" for i in range(250)]
    tx = xs.transaction_start()
    for i, n in enumerate(names):
        xs.write(f"/big/{n}", str(i), tx)
    assert xs.transaction_end(tx)
    lines = tool(xsd, "xenstore-ls", "-f", "/big").stdout.decode().splitlines()
    assert lines == [f'/big/{n} = "{i}"' for i, n in enumerate(names)]


def test_tool_rm(xsd, xs):
    xs.write("/rm/keep", "1")
    xs.write("/rm/gone/deep/er", "2")
    tool(xsd, "xenstore-rm", "/rm/gone")
    assert xs.directory("/rm") == ["keep"]
    xs.write("/trim/only/leaf", "x")
    tool(xsd, "xenstore-rm", "-t", "/trim/only/leaf")  # -t also removes emptied parents
    assert xs.read("/trim/only") is None
    assert xs.read("/trim") is None


def test_relative_paths_from_tool(xsd, xs):
    tool(xsd, "xenstore-write", "relative/key", "r")
    assert xs.read("/local/domain/0/relative/key") == "r"
    assert tool(xsd, "xenstore-read", "relative/key").stdout == b"r\n"
