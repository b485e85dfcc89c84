"""Build of xvf's Cython hot path and man page.

Everything declarative lives in pyproject.toml; this file only knows how to
compile the extensions and how to fail clearly when the toolchain is missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _require_toolchain() -> None:
    """Fail with one message naming the missing Debian package."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        sys.exit(
            f"xvf: no C compiler found ({cc!r} is not on PATH). Install one: apt-get install gcc"
        )
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        sys.exit(
            f"xvf: Python headers not found (no Python.h in {include}). "
            f"Install them: apt-get install python{ver}-dev"
        )
    # A compiler that cannot build a trivial program is as good as none.
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <stdint.h>\nint main(void){return 0;}\n")
        if shutil.which(cc) is None:
            cc = "cc"
        res = subprocess.run(
            [cc, src, "-o", os.path.join(tmp, "probe")], capture_output=True, text=True
        )
        if res.returncode != 0:
            sys.exit(
                f"xvf: the C compiler {cc!r} cannot build a trivial program:\n"
                f"{res.stderr.strip()}\nInstall a working toolchain: apt-get install gcc libc6-dev"
            )


def _extensions() -> list[Extension]:
    from Cython.Build import cythonize

    include_dirs = [os.path.join(HERE, "include")]
    common = dict(include_dirs=include_dirs, extra_compile_args=["-O2", "-Wall"])
    # Every .pyx of the hot path, and of the simulator's stand-ins for its kernel
    # interfaces, is an extension (the cross build and the rig's find them alike).
    sources = sorted(
        glob.glob(os.path.join("xvf", "hotpath", "*.pyx"))
        + glob.glob(os.path.join("xvf", "platform", "sim", "*.pyx"))
    )
    exts = [Extension(src[:-4].replace(os.sep, "."), [src], **common) for src in sources]
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )


def _cmdclass() -> dict:
    try:
        from build_manpages import build_manpages, get_build_py_cmd, get_install_cmd
    except ImportError:  # building without argparse-manpage: no man page
        return {}
    return {
        "build_manpages": build_manpages,
        "build_py": get_build_py_cmd(),
        "install": get_install_cmd(),
    }


building = len(sys.argv) > 1 and sys.argv[1] not in ("egg_info", "sdist", "--version", "clean")
if building or "bdist_wheel" in sys.argv or "build_ext" in sys.argv:
    _require_toolchain()

setup(
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    data_files=[("share/man/man1", ["man/xen-vhost-frontend.1"])],
)
