"""xvf's wheel for the arm64 Dom0, cross-built on the host (no emulation).

`pip install` of the checkout inside an emulated arm64 chroot compiles Cython and C under
qemu-user (about 20 minutes); here the host's Cython writes the C once, the host's
aarch64-linux-gnu-gcc compiles it against Debian 13's arm64 Python 3.13 headers, and the
wheel is zipped by hand, as setuptools would lay it out:
xvf-<version>-cp313-cp313-linux_aarch64.whl, for
`pip install --no-deps --break-system-packages` in the Dom0 (xvf needs no other package).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

from . import trixie
from .cache import cache_dir, fingerprint, log, stage

PY = "3.13"
PY_TAG = "cp313"
PLATFORM = "linux_aarch64"
TRIPLET = "aarch64-linux-gnu"
CC = os.environ.get("XVF_RIG_CROSS_CC", f"{TRIPLET}-gcc")
# where setup.py finds the extensions: the hot path and the simulator's stand-ins
EXTENSION_DIRS = ("xvf/hotpath", "xvf/platform/sim")
# The same directives as setup.py's cythonize() call.
DIRECTIVES = {"boundscheck": "False", "wraparound": "False", "cdivision": "True"}
# setup.py's -O2 -Wall, plus what Debian's sysconfig adds for extensions
CFLAGS = [
    "-O2",
    "-Wall",
    "-fPIC",
    "-DNDEBUG",
    "-fno-strict-overflow",
    "-Wsign-compare",
    "-Wno-unused-function",
]
# One fixed time for every zip entry, so an unchanged tree gives the same wheel bytes.
ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def _xvf_dir() -> Path:
    path = cache_dir() / "xvf"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str | Path], cwd: Path | None = None) -> None:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-4000:]}"
        )


def _cython(repo: Path) -> Path:
    """The host's cython: the repo's venv, then PATH, then a scratch venv in the cache."""
    for candidate in (repo / ".venv/bin/cython", shutil.which("cython")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    env = _xvf_dir() / "venv"
    tool = env / "bin/cython"
    if not tool.exists():
        log("xvf: no cython on the host; installing it into a scratch venv")
        venv.create(env, with_pip=True)
        _run([env / "bin/pip", "install", "-q", "cython>=3.0"])
    return tool


def _python_headers() -> Path:
    """Debian 13's arm64 Python 3.13 headers, unpacked into the cache (no other files)."""
    dest = _xvf_dir() / "sysroot"
    deb = trixie.download(f"libpython{PY}-dev", cache_dir() / "debs" / "single")

    def unpack() -> None:
        tmp = dest.with_name("sysroot.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        trixie.extract(deb, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)

    pyconfig = dest / f"usr/include/{TRIPLET}/python{PY}/pyconfig.h"
    stage("xvf-python-headers", fingerprint(deb.name), [pyconfig], unpack)
    return dest / "usr/include"


def _sources(repo: Path) -> list[Path]:
    """Everything the wheel is made of: xvf's sources, the C headers, the metadata."""
    files = [repo / "pyproject.toml"]
    for top, patterns in (
        ("xvf", ("*.py", "*.pyx", "*.pxd", "*.pyi", "py.typed", "*.service")),
        ("include", ("*",)),
    ):
        for pattern in patterns:
            files += [p for p in (repo / top).rglob(pattern) if p.is_file()]
    return sorted(set(files))


def _package_files(repo: Path, project: dict) -> list[str]:
    """Repo-relative paths of the pure-Python files, as setuptools picks them."""
    tool = project.get("tool", {}).get("setuptools", {})
    data = tool.get("package-data", {})
    paths: list[str] = []
    for package in _packages(repo, tool):
        pdir = repo / package.replace(".", "/")
        patterns = ["*.py", *data.get(package, [])]
        for pattern in patterns:
            paths += [str(p.relative_to(repo)) for p in pdir.glob(pattern) if p.is_file()]
    return sorted(set(paths))


def _packages(repo: Path, tool: dict) -> list[str]:
    """The packages `packages.find` picks: every folder with an __init__.py under the
    included tops (xvf*)."""
    tops = tool["packages"]["find"]["include"]
    found = []
    for init in repo.glob("*/**/__init__.py"):
        package = ".".join(init.parent.relative_to(repo).parts)
        if any(fnmatch.fnmatch(package, top) for top in tops):
            found.append(package)
    return sorted(found)


def _extensions(repo: Path) -> list[str]:
    """The Cython extensions, as setup.py finds them: every .pyx of EXTENSION_DIRS."""
    return sorted(
        str(p.relative_to(repo).with_suffix(""))
        for d in EXTENSION_DIRS
        for p in (repo / d).glob("*.pyx")
    )


def _metadata(meta: dict) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {meta['name']}",
        f"Version: {meta['version']}",
        f"Summary: {meta.get('description', '')}",
    ]
    if "license" in meta and "text" in meta["license"]:
        lines.append(f"License: {meta['license']['text']}")
    if "requires-python" in meta:
        lines.append(f"Requires-Python: {meta['requires-python']}")
    lines += [f"Classifier: {c}" for c in meta.get("classifiers", [])]
    lines += [f"Requires-Dist: {d}" for d in meta.get("dependencies", [])]
    for extra, deps in meta.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        for dep in deps:
            marker = f'extra == "{extra}"'
            if ";" in dep:
                req, cond = dep.split(";", 1)
                lines.append(f"Requires-Dist: {req.strip()}; ({cond.strip()}) and {marker}")
            else:
                lines.append(f"Requires-Dist: {dep}; {marker}")
    return "\n".join(lines) + "\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _compile(repo: Path, out: Path) -> dict[str, bytes]:
    """Cython on the host, then the cross compiler; returns wheel path -> .so bytes."""
    cython = _cython(repo)
    include = _python_headers()
    if shutil.which(CC) is None:
        raise RuntimeError(f"no {CC}: apt-get install gcc-aarch64-linux-gnu")
    work = out / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    directives = [a for k, v in DIRECTIVES.items() for a in ("-X", f"{k}={v}")]
    built: dict[str, bytes] = {}
    for ext in _extensions(repo):
        name = Path(ext).name
        c_file = work / f"{Path(ext).parent.name}_{name}.c"
        so = work / f"{name}.cpython-{PY_TAG[2:]}-{TRIPLET}.so"
        _run([cython, "-3", "-I", repo, *directives, f"{ext}.pyx", "-o", c_file], cwd=repo)
        # Python.h first; <aarch64-linux-gnu/python3.13/pyconfig.h> after the cross
        # compiler's own dirs, so none of the host's /usr/include is ever seen.
        _run(
            [
                CC,
                "-shared",
                *CFLAGS,
                "-I",
                repo / "include",
                "-I",
                include / f"python{PY}",
                "-idirafter",
                include,
                c_file,
                "-o",
                so,
            ]
        )
        built[f"{Path(ext).parent}/{so.name}"] = so.read_bytes()
    return built


def _assemble(repo: Path, wheel: Path, built: dict[str, bytes]) -> None:
    project = tomllib.loads((repo / "pyproject.toml").read_text())
    meta = project["project"]
    name, version = meta["name"], meta["version"]
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for rel in _package_files(repo, project):
        files[rel] = (repo / rel).read_bytes()
    files.update(built)
    files[f"{dist_info}/METADATA"] = _metadata(meta).encode()
    tag = f"{PY_TAG}-{PY_TAG}-{PLATFORM}"
    files[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\n"
        "Generator: xvf-rig (tests/xen/rig/xvf_build.py)\n"
        "Root-Is-Purelib: false\n"
        f"Tag: {tag}\n"
    ).encode()
    scripts = meta.get("scripts", {})
    if scripts:
        body = "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items()))
        files[f"{dist_info}/entry_points.txt"] = f"[console_scripts]\n{body}".encode()
    files[f"{dist_info}/top_level.txt"] = f"{name}\n".encode()
    record_name = f"{dist_info}/RECORD"
    record = [_record_line(n, d) for n, d in files.items()] + [f"{record_name},,"]
    files[record_name] = ("\n".join(record) + "\n").encode()

    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, data in files.items():  # dist-info last, RECORD at the very end
            info = zipfile.ZipInfo(n, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if n.endswith(".so") else 0o644) << 16
            zf.writestr(info, data)
    tmp.rename(wheel)


def build_xvf_wheel(repo: Path) -> Path:
    """Build (or reuse) the Dom0 wheel of the checkout at `repo`; returns its path.

    $XVF_RIG_CACHE/xvf/xvf-<version>-cp313-cp313-linux_aarch64.whl, rebuilt whenever a
    file under xvf/ or include/, pyproject.toml, the headers' package or this file changes.
    """
    repo = repo.resolve()
    out = _xvf_dir()
    version = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    wheel = out / f"xvf-{version}-{PY_TAG}-{PY_TAG}-{PLATFORM}.whl"
    sources = _sources(repo)
    digest = fingerprint(
        Path(__file__),
        *(str(p.relative_to(repo)) for p in sources),
        *sources,
        f"python{PY}",
        sys.platform,
    )

    def build() -> None:
        built = _compile(repo, out)
        _assemble(repo, wheel, built)
        shutil.rmtree(out / "build", ignore_errors=True)
        log(f"xvf: {wheel.name} ({wheel.stat().st_size // 1024} KiB)")

    stage("xvf-wheel", digest, [wheel], build)
    return wheel
