"""The folders of xvf are layers (README, "Layout"): every import points down or
stays in its folder, so each layer can be read, tested and replaced from below."""

from __future__ import annotations

import ast
import re
from pathlib import Path

XVF = Path(__file__).parents[2] / "xvf"
# top to bottom; errors and ratelimit serve every layer
LAYERS = ["app", "daemon", "device", "guest", "platform", "protocols", "hotpath"]
SHARED = {"errors", "ratelimit"}
CIMPORT = re.compile(r"^\s*(?:from\s+xvf\.([\w.]+)\s+cimport|cimport\s+xvf\.([\w.]+))", re.M)


def _imports(path: Path) -> set[str]:
    """The xvf modules a .py imports (at any depth) or a .pyx/.pxd cimports."""
    text = path.read_text()
    if path.suffix != ".py":
        found = {a or b for a, b in CIMPORT.findall(text)}
        found |= set(re.findall(r"^\s*from\s+xvf\.([\w.]+)\s+import", text, re.M))
        return found
    names: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("xvf."):
                names.add(node.module[4:])
            elif node.module == "xvf":
                names |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name[4:] for a in node.names if a.name.startswith("xvf.")}
    return names


def test_every_import_points_down_or_sideways() -> None:
    upward = []
    checked = 0
    for path in sorted(XVF.rglob("*")):
        if path.suffix not in (".py", ".pyx", ".pxd") or path.parent == XVF:
            continue
        layer = path.relative_to(XVF).parts[0]
        assert layer in LAYERS, f"{path}: folder {layer!r} is in no layer (add it to LAYERS)"
        for name in _imports(path):
            target = name.split(".")[0]
            checked += 1
            if target in SHARED or target == "__version__":
                continue
            assert target in LAYERS, f"{path}: imports xvf.{name}, which is in no layer"
            if LAYERS.index(target) < LAYERS.index(layer):
                upward.append(f"{path.relative_to(XVF)} imports xvf.{name}")
    assert checked > 100  # the walk found the package
    assert upward == []


def test_only_the_platform_implementations_know_the_simulator() -> None:
    """Nothing above the platform seam names xen or sim, except the command line,
    which picks one (and runs the demo on the simulator)."""
    for path in sorted(XVF.rglob("*.py")):
        rel = path.relative_to(XVF)
        if rel.parts[0] in ("platform", "app") or path.parent == XVF:
            continue
        for name in _imports(path):
            assert not name.startswith(("platform.sim", "platform.xen")), f"{rel}: xvf.{name}"
