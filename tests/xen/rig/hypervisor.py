"""The hypervisor image the rig boots: an arm64 Xen built with CONFIG_IOREQ_SERVER=y.

Debian's own arm64 hypervisor is built without CONFIG_IOREQ_SERVER (on Arm it sits
behind CONFIG_EXPERT), so no device model, xvf included, can serve a guest on it. The
image is therefore an input of the rig: $XVF_XEN_IMAGE, or $XVF_RIG_CACHE/inputs/xen.
When the mirror serves Debian's xen 4.20 source, build_from_debian_source() rebuilds
just the hypervisor from it with Debian's config plus IOREQ_SERVER.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from . import trixie
from .cache import cache_dir, log

MIN_VERSION = (4, 18)  # first release whose xl knows `virtio = [...]` devices
SOURCE_SUITES = ("trixie", "sid")
# Debian's hypervisor package, which carries Debian's config as /boot/xen-4.20-arm64.config
HYPERVISOR_DEB = "xen-hypervisor-4.20-arm64"
CROSS = ["XEN_TARGET_ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]

NEEDED = (
    "an arm64 Xen >= 4.18 hypervisor image built with CONFIG_EXPERT=y and CONFIG_IOREQ_SERVER=y"
)
WHY_NOT_DEBIAN = (
    "Debian's own arm64 hypervisor (xen-hypervisor-4.20-arm64) does not do: it is built without "
    "CONFIG_IOREQ_SERVER, so no device model (xvf included) can serve a guest on it"
)
IOREQ_ON = re.compile(r"^CONFIG_IOREQ_SERVER=y$", re.M)


class RigInputMissing(RuntimeError):
    """An input only the user can provide is missing or unusable.

    `buildable` is True when build_from_debian_source() could make the image instead.
    """

    def __init__(self, message: str, buildable: bool = False) -> None:
        super().__init__(message)
        self.buildable = buildable


def cached_image() -> Path:
    return cache_dir() / "inputs" / "xen"


def hypervisor_image() -> Path:
    """The image to boot: $XVF_XEN_IMAGE, else the cached one; checked by check_image()."""
    given = os.environ.get("XVF_XEN_IMAGE")
    if given:
        if not Path(given).is_file():
            raise RigInputMissing(f"XVF_XEN_IMAGE={given} does not exist; it must name {NEEDED}.")
        check_image(Path(given))
        return Path(given)
    path = cached_image()
    if path.is_file():
        check_image(path)
        return path
    version, status = debian_source_status()
    if version:
        hint = f"The mirror serves Debian's xen {version} source: build_from_debian_source({path})"
        hint += " builds the image from it"
    else:
        hint = f"Debian's xen 4.20 source cannot be built instead: {status}"
    raise RigInputMissing(
        f"no hypervisor image. The rig needs {NEEDED}: give it as XVF_XEN_IMAGE=/path/to/xen or "
        f"put it at {path} (its final .config, if any, as {path}.config). "
        f"{WHY_NOT_DEBIAN}. {hint}.",
        buildable=version is not None,
    )


def check_image(path: Path) -> str:
    """Refuse anything but an IOREQ-enabled arm64 Xen >= 4.18; return its version string."""
    data = path.read_bytes()
    # The arm64 Image header has its magic at 0x38 (Xen's header starts with the EFI "MZ").
    if data[0x38:0x3C] != b"ARM\x64":
        raise RigInputMissing(f"{path} is not an arm64 Image (no ARM\\x64 magic); need {NEEDED}.")
    if b"Xen version %d.%d%s" not in data:
        raise RigInputMissing(f"{path} is an arm64 Image but not Xen; need {NEEDED}.")
    version = _version(data)
    found = re.match(r"(\d+)\.(\d+)", version or "")
    if not found or (int(found[1]), int(found[2])) < MIN_VERSION:
        raise RigInputMissing(f"{path} is Xen {version or '(version unknown)'}; need {NEEDED}.")
    beside = (path.with_name(path.name + ".config"), path.with_suffix(".config"))
    for config in dict.fromkeys((*beside, path.parent / "xen.config")):
        if config.is_file():
            if not IOREQ_ON.search(config.read_text()):
                raise RigInputMissing(
                    f"{path} (Xen {version}) was built without CONFIG_IOREQ_SERVER=y, says "
                    f"{config}; need {NEEDED}. {WHY_NOT_DEBIAN}."
                )
            break
    # The rangeset name ioreq.c formats exists only when the ioreq server is built in.
    if b"ioreq_server %d" not in data:
        raise RigInputMissing(
            f"{path} (Xen {version}) has no ioreq server in it; need {NEEDED}. {WHY_NOT_DEBIAN}."
        )
    return version


def _version(data: bytes) -> str | None:
    # The EFI loader's banner is UTF-16LE: "Xen 4.20.4 (c/s ...) EFI loader".
    efi = re.search(rb"X\0e\0n\0 \0((?:[0-9A-Za-z.+~-]\0)+) \0\(\0c\0/\0s\0", data)
    if efi:
        return efi[1][::2].decode()
    compat = re.search(rb"xen,xen-(\d+\.\d+)\0", data)  # the Dom0 device tree's compatible
    return compat[1].decode() if compat else None


def debian_source_status() -> tuple[str | None, str]:
    """The xen 4.20 source version the mirror really serves (None if none), and what was seen."""
    try:
        _apt_src("apt-get", "update")
        listed = _apt_src("apt-cache", "showsrc", "xen")
    except RuntimeError as e:
        return None, f"apt could not read the {'/'.join(SOURCE_SUITES)} source lists: {e}"
    answers = []
    for stanza in listed.split("\n\n"):
        fields = dict(re.findall(r"^(Version|Directory): (.+)$", stanza, re.M))
        dsc = re.search(r"^ \S+ \d+ (\S+\.dsc)$", stanza, re.M)
        if not (dsc and fields.get("Version", "").startswith("4.20") and "Directory" in fields):
            continue
        url = f"{trixie.MIRROR}/{fields['Directory']}/{dsc[1]}"
        code = _head(url)
        if code == "200":
            return fields["Version"], f"{url} answers 200"
        answers.append(f"{url} answers {code}")
    if not answers:
        return None, f"{trixie.MIRROR} lists no xen 4.20 source in {'/'.join(SOURCE_SUITES)}"
    return None, "the Sources index lists it, but " + "; ".join(dict.fromkeys(answers))


def build_from_debian_source(dest: Path) -> Path:
    """Build only the hypervisor from Debian's xen 4.20 source, cross-compiled, into `dest`.

    Debian's own config plus EXPERT and IOREQ_SERVER; the final config goes to dest.config.
    """
    version, status = debian_source_status()
    if version is None:
        raise RigInputMissing(f"cannot build Xen from Debian's source: {status}.")
    log(f"hypervisor: building Xen from Debian's xen {version} source")
    sources = cache_dir() / "debs" / "src"
    sources.mkdir(parents=True, exist_ok=True)
    _apt_src("apt-get", "source", "--download-only", f"xen={version}", cwd=sources)
    dsc = sources / f"xen_{version.split(':')[-1]}.dsc"
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tree = Path(tmp) / "xen"
        _run(["dpkg-source", "-x", str(dsc), str(tree)])
        xen = tree / "xen"
        config = [
            line
            for line in _debian_config().splitlines()
            if not re.match(r"(# )?CONFIG_(EXPERT|IOREQ_SERVER)\b", line)
        ]
        config += ["CONFIG_EXPERT=y", "CONFIG_IOREQ_SERVER=y", ""]
        (xen / ".config").write_text("\n".join(config))
        make = ["nice", "-n", "10", "make", "-C", str(xen), *CROSS]
        _run([*make, "olddefconfig"])
        if not IOREQ_ON.search((xen / ".config").read_text()):
            raise RuntimeError("olddefconfig dropped CONFIG_IOREQ_SERVER=y")
        _run([*make, f"-j{os.cpu_count() or 1}"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Config first, image last (each renamed into place), so a dest that exists is whole.
        for built, name in ((xen / ".config", dest.name + ".config"), (xen / "xen", dest.name)):
            shutil.copyfile(built, dest.with_name(name + ".tmp"))
            dest.with_name(name + ".tmp").replace(dest.with_name(name))
    log(f"hypervisor: Xen {check_image(dest)} at {dest}")
    return dest


def _debian_config() -> str:
    debs = cache_dir() / "debs" / "single"
    if not any(debs.glob(f"{HYPERVISOR_DEB}_*.deb")):
        trixie.update()
    with tempfile.TemporaryDirectory() as tmp:
        trixie.extract(trixie.download(HYPERVISOR_DEB, debs), Path(tmp))
        configs = sorted(Path(tmp).glob("boot/xen-*.config"))
        if not configs:
            raise RuntimeError(f"{HYPERVISOR_DEB} has no /boot/xen-*.config")
        return configs[0].read_text()


def _apt_src(tool: str, *args: str, cwd: Path | None = None) -> str:
    """apt-get/apt-cache against deb-src entries in a private state dir (cf. trixie.py)."""
    root = cache_dir() / "apt-src"
    for sub in ("etc/apt/sources.list.d", "var/lib/apt/lists/partial", "var/lib/dpkg"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    want = "".join(
        f"deb-src [signed-by={trixie.KEYRING}] {trixie.MIRROR} {suite} main\n"
        for suite in SOURCE_SUITES
    )
    sources = root / "etc/apt/sources.list"
    if not sources.exists() or sources.read_text() != want:
        sources.write_text(want)
    (root / "var/lib/dpkg/status").touch()
    return _run([tool, "-q", *trixie._apt_options(root), *args], cwd=cwd)


def _head(url: str) -> str:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
            return str(r.status)
    except urllib.error.HTTPError as e:
        return str(e.code)
    except OSError as e:
        return f"no answer ({e})"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({done.returncode}):\n{output}")
    return done.stdout
