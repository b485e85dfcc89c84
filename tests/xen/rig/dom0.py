"""The Dom0 root filesystem: Debian 13 arm64 packages unpacked on the host, as an ext4 image.

Configuring packages under qemu-user (dpkg, triggers, initramfs) is what made earlier rigs
slow, so nothing runs emulated here except one `ldconfig`: every .deb of the closure is
unpacked with dpkg-deb, and the few things the maintainer scripts would have done that the
rig needs (accounts, alternatives links, /var/run, the loader cache) are done by this file.
The Dom0 boots without systemd: tests/xen/dom0/init is PID 1 and starts the Xen daemons.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

from . import trixie
from .cache import cache_dir, fingerprint, log, stage
from .images import make_ext4

# What the Dom0 runs: the Xen toolstack and daemons, the backends the tests start, Python
# for xvf and the test cases, and enough of a base system for init, run.sh and debugging.
PACKAGES = [
    # Xen 4.20 toolstack (xl, xenstored, xenconsoled, xen-init-dom0) and xenstore-* tools
    "xen-utils-4.20",
    "xen-utils-common",
    "xenstore-utils",
    # vhost-user backends: qemu-storage-daemon (in qemu-utils on trixie), virtiofsd
    "qemu-utils",
    "virtiofsd",
    # xvf and the tests (numpy from Debian; xvf's own wheel is cross-built, see xvf_build.py)
    "python3",
    "python3-pip",
    "python3-pytest",
    "python3-pytest-timeout",
    "python3-hypothesis",
    "python3-numpy",
    # base system (the Essential set a debootstrap would bring, minus package management)
    "base-files",
    "base-passwd",
    "netbase",
    "bash",
    "dash",
    "coreutils",
    "util-linux",
    "mount",
    "procps",
    "iproute2",
    "kmod",
    "e2fsprogs",
    "libc-bin",
    "findutils",
    "grep",
    "sed",
    "mawk",
    "gzip",
    "tar",
    "cpio",
    "diffutils",
    "hostname",
    # busybox for `poweroff -f` (no systemd here) and as a fallback toolbox
    "busybox-static",
    # debugging by hand and device tests
    "strace",
    "i2c-tools",
    "gpiod",
    # udev (required by xen-utils-common) wants a sysusers; this one avoids all of systemd
    "systemd-standalone-sysusers",
]

DOM0_FILES = Path(__file__).resolve().parent.parent / "dom0"
INIT_PATH = "usr/sbin/xvf-rig-init"  # /sbin/xvf-rig-init through the merged-/usr link
IMAGE_SIZE = "3G"  # sparse; the unpacked tree is about 700 MB
LABEL = "xvf-dom0"
HOSTNAME = "xvf-dom0"
PYTHON = "3.13"

# Documentation is most of the files and none of the function; dpkg's path-exclude does
# the same on minimal images. Copyright files stay.
_PRUNE = ["usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian"]


def _dom0_dir() -> Path:
    path = cache_dir() / "dom0"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _debs_dir() -> Path:
    return cache_dir() / "debs" / "dom0"


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def resolve() -> dict[str, str]:
    """Package name -> version of the whole closure, as apt would install it now."""
    try:
        out = trixie.apt("install", "-s", *PACKAGES)
    except RuntimeError:  # no package lists yet (a fresh cache)
        trixie.update()
        out = trixie.apt("install", "-s", *PACKAGES)
    found = dict(re.findall(r"^Inst (\S+) \((\S+)", out, flags=re.M))
    if not found:
        raise RuntimeError("apt resolved no packages for the Dom0 (are the trixie lists there?)")
    return found


def _deb_fields(deb: Path) -> tuple[str, str]:
    out = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"]).stdout
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields["Package"], fields["Version"]


def _select_debs(closure: dict[str, str]) -> list[Path]:
    """Exactly the resolved closure's .debs: the shared download dir may hold older versions."""
    debs = trixie.download_with_dependencies(PACKAGES, _debs_dir())
    chosen: dict[str, Path] = {}
    for deb in debs:
        name, version = _deb_fields(deb)
        if closure.get(name) == version:
            chosen[name] = deb
    missing = sorted(set(closure) - set(chosen))
    if missing:
        raise RuntimeError(f"no downloaded .deb for {', '.join(missing)}")
    return [chosen[name] for name in sorted(chosen)]


def _postinst(deb: Path) -> str:
    ctrl = subprocess.Popen(["dpkg-deb", "--ctrl-tarfile", str(deb)], stdout=subprocess.PIPE)
    done = subprocess.run(
        ["tar", "-xO", "--wildcards", "*postinst"], stdin=ctrl.stdout, capture_output=True
    )
    ctrl.wait()
    return done.stdout.decode(errors="replace") if done.returncode == 0 else ""


_ALT = re.compile(r"update-alternatives\s+--install\s+(.*)")


def _alternatives(debs: list[Path]) -> dict[str, tuple[int, list[tuple[str, str]]]]:
    """The `update-alternatives --install` calls of the postinst scripts, by name.

    Each is (priority, [(link, target), ...]) with the master link first and its slaves
    after; when two packages offer the same name the higher priority wins, as it would
    in auto mode. Calls built from shell variables are skipped (none matter here).
    """
    chosen: dict[str, tuple[int, list[tuple[str, str]]]] = {}
    for deb in debs:
        script = _postinst(deb).replace("\\\n", " ")
        for m in _ALT.finditer(script):
            try:
                words = shlex.split(m[1], comments=True)
            except ValueError:
                continue
            if len(words) < 4 or any("$" in w for w in words[:4]):
                continue
            link, name, target, prio = words[:4]
            if not prio.isdigit():
                continue
            links = [(link, target)]
            rest = words[4:]
            while len(rest) >= 4 and rest[0] == "--slave":
                links.append((rest[1], rest[3]))
                rest = rest[4:]
            if name not in chosen or chosen[name][0] < int(prio):
                chosen[name] = (int(prio), links)
    return chosen


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _symlink(root: Path, link: str, target: str) -> None:
    where = _inside(root, link)
    if where.is_symlink() or where.exists():
        where.unlink()
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(target)


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    where = _inside(root, path)
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(text)
    where.chmod(mode)


def _members(deb: Path) -> list[str]:
    fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    names = subprocess.run(["tar", "-t"], stdin=fsys.stdout, capture_output=True, text=True)
    fsys.wait()
    if fsys.returncode != 0 or names.returncode != 0:
        raise RuntimeError(f"listing {deb.name} failed: {names.stderr[-2000:]}")
    return names.stdout.splitlines()


def _check_no_escape(root: Path, deb: Path) -> None:
    """Refuse a .deb whose files would be written through a symlink leading out of the tree.

    tar --keep-directory-symlink follows directory symlinks already in the tree (which is
    what keeps merged /usr intact), so a file under, say, an absolute link shipped by an
    earlier package would land on the host. Nothing in the closure does this today.
    """
    real_root = os.path.realpath(root)
    seen: set[str] = set()
    for name in _members(deb):
        parts = name.removeprefix("./").rstrip("/").split("/")[:-1]
        for n in range(1, len(parts) + 1):
            prefix = "/".join(parts[:n])
            if prefix in seen:
                continue
            seen.add(prefix)
            path = root / prefix
            if path.is_symlink():
                real = os.path.realpath(path)
                if os.readlink(path).startswith("/") or not real.startswith(real_root + "/"):
                    raise RuntimeError(
                        f"{deb.name} writes {name} through the symlink {prefix} -> "
                        f"{os.readlink(path)}, which leads out of the Dom0 tree"
                    )


def _byte_compile(root: Path) -> None:
    """Write the .pyc files python3's postinst (py3compile) would have.

    Without them every Python start in the Dom0 compiles pip, pytest and numpy from
    source again (boots use snapshot=on, so nothing written sticks): `pip --version`
    took 40 s instead of 7 s under qemu-user. The host's Python is 3.11 and cannot write
    3.13 bytecode, so the arm64 interpreter does it under qemu-user (about 3 minutes of
    the cold build; not package configuration, only py_compile). Two processes, one per
    tree, since compileall's own workers need semaphores qemu-user lacks.
    """
    if shutil.which("qemu-aarch64-static") is None:
        log("dom0: no qemu-aarch64-static, skipping byte-compilation (Python starts slower)")
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    python = root / "usr/bin/python3"
    procs = [
        subprocess.Popen(
            [
                "qemu-aarch64-static",
                "-L",
                str(root),
                str(python),
                "-m",
                "compileall",
                "-q",
                "-s",
                str(root),
                "-p",
                "/",
                str(root / tree),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for tree in (f"usr/lib/python{PYTHON}", "usr/lib/python3/dist-packages")
    ]
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"compileall under qemu-user failed:\n{out[-3000:]}")


def _configure(root: Path, debs: list[Path]) -> None:
    """What the maintainer scripts would have done, as far as a systemd-less Dom0 needs."""
    # base-passwd: the static accounts (update-passwd copies these masters on first install)
    share = root / "usr/share/base-passwd"
    shutil.copyfile(share / "passwd.master", root / "etc/passwd")
    shutil.copyfile(share / "group.master", root / "etc/group")
    users = [line.split(":", 1)[0] for line in (root / "etc/passwd").read_text().splitlines()]
    groups = [line.split(":", 1)[0] for line in (root / "etc/group").read_text().splitlines()]
    # root logs in without a password (console only; the machine has no network)
    shadow = "".join(f"{u}:{'' if u == 'root' else '*'}:20000:0:99999:7:::\n" for u in users)
    _write(root, "etc/shadow", shadow, 0o640)
    _write(root, "etc/gshadow", "".join(f"{g}:*::\n" for g in groups), 0o640)
    if os.geteuid() == 0:
        shadow_gid = next(
            int(line.split(":")[2])
            for line in (root / "etc/group").read_text().splitlines()
            if line.startswith("shadow:")
        )  # base-passwd's group.master always has it
        for name in ("etc/shadow", "etc/gshadow"):
            os.chown(root / name, 0, shadow_gid)
    _write(root, "etc/hostname", f"{HOSTNAME}\n")
    _write(root, "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost\n")
    # init mounts everything itself; this is for `mount -o remount` and tools that read it
    _write(root, "etc/fstab", "/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n")

    # base-files: /var/run and /var/lock become links into /run (made only now, after
    # unpacking, so tar never follows an absolute link out of the tree)
    for old, new in (("var/run", "/run"), ("var/lock", "/run/lock")):
        where = root / old
        if where.is_dir() and not where.is_symlink():
            shutil.rmtree(where)
        _symlink(root, old, new)
    for path, text in (
        ("root/.profile", "dot.profile"),
        ("root/.bashrc", "dot.bashrc"),
        ("etc/profile", "profile"),
        ("etc/motd", "motd"),
    ):
        if not (root / path).exists():
            shutil.copyfile(root / "usr/share/base-files" / text, root / path)
    for d in ("mnt", "opt", "srv", "media", "usr/local/bin", "usr/local/lib"):
        (root / d).mkdir(parents=True, exist_ok=True)

    # update-alternatives (awk -> mawk, libblas.so.3 for numpy, which, ...), straight to
    # the target instead of through /etc/alternatives, and relative, so the tree also
    # works under `qemu-aarch64-static -L ROOT` on the host
    for _name, (_prio, links) in sorted(_alternatives(debs).items()):
        for n, (link, target) in enumerate(links):
            if n == 0 or _inside(root, target).exists():
                rel = os.path.relpath(target, os.path.dirname(link))
                _symlink(root, link, rel)

    # ca-certificates: update-ca-certificates concatenates the bundle pip's TLS setup
    # loads at import time (even for a local --no-index install)
    pems = [c.read_text() for c in sorted((root / "usr/share/ca-certificates").rglob("*.crt"))]
    bundle = "".join(pem if pem.endswith("\n") else pem + "\n" for pem in pems)
    _write(root, "etc/ssl/certs/ca-certificates.crt", bundle)

    # the Xen daemons' state and log directories (xen-utils-common ships /var/lib/xen)
    for d in ("var/lib/xen", "var/lib/xenstored", "var/log/xen/console", "xvf"):
        (root / d).mkdir(parents=True, exist_ok=True)

    # The console the kernel opens for PID 1 before anything is mounted on /dev.
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        for name, major, minor, mode in (("console", 5, 1, 0o600), ("null", 1, 3, 0o666)):
            node = dev / name
            if not node.exists():
                os.mknod(node, mode | stat.S_IFCHR, os.makedev(major, minor))

    for path in _PRUNE:
        shutil.rmtree(root / path, ignore_errors=True)

    # The rig's own files: PID 1, and anything else under tests/xen/dom0/rootfs/.
    init = root / INIT_PATH
    shutil.copyfile(DOM0_FILES / "init", init)
    init.chmod(0o755)
    extra = DOM0_FILES / "rootfs"
    if extra.is_dir():
        shutil.copytree(extra, root, symlinks=True, dirs_exist_ok=True)

    log("dom0: byte-compiling Python (arm64 python3 under qemu-user)")
    _byte_compile(root)

    # libc-bin's trigger: /etc/ld.so.cache. Not required (every library of the closure is
    # in the multiarch dirs the loader searches anyway; xl, python3 and numpy were checked
    # without it) but it spares each process start that search. The arm64 ldconfig is
    # static and chroots into -r itself, so one short run under qemu-user does it.
    if os.geteuid() == 0:
        _run(["qemu-aarch64-static", str(root / "usr/sbin/ldconfig"), "-r", str(root)])
    else:
        log("dom0: not root, skipping ldconfig (the loader falls back to its default dirs)")


def _inputs_digest(closure: dict[str, str]) -> str:
    files = sorted(p for p in DOM0_FILES.rglob("*") if p.is_file())
    return fingerprint(
        Path(__file__),
        " ".join(f"{n}={v}" for n, v in sorted(closure.items())),
        *(str(p.relative_to(DOM0_FILES)) for p in files),
        *files,
    )


def build_dom0_rootfs() -> Path:
    """Build (or reuse) the Dom0 root filesystem; returns $XVF_RIG_CACHE/dom0/rootfs.img.

    The image is ext4 labelled xvf-dom0, rebuilt when the package list, the resolved
    versions, tests/xen/dom0/ or this file change. Boot it with snapshot=on (boot.py does)
    so a run never changes the cached image.
    """
    out = _dom0_dir()
    image = out / "rootfs.img"
    closure = resolve()

    def build() -> None:
        debs = _select_debs(closure)
        root = out / "rootfs.tmp"
        if root.exists():
            shutil.rmtree(root)
        # merged /usr first: the .debs still ship a few files under /bin, /sbin and /lib
        for d in ("bin", "sbin", "lib"):
            (root / "usr" / d).mkdir(parents=True)
            (root / d).symlink_to(f"usr/{d}")
        log(f"dom0: unpacking {len(debs)} packages")
        for deb in debs:
            _check_no_escape(root, deb)
            trixie.extract(deb, root)
        _configure(root, debs)
        tmp = image.with_name("rootfs.img.tmp")
        log(f"dom0: mke2fs -d ({IMAGE_SIZE} sparse)")
        make_ext4(root, tmp, IMAGE_SIZE, LABEL)
        tmp.rename(image)
        shutil.rmtree(root)

    stage("dom0-rootfs", _inputs_digest(closure), [image], build)
    return image
