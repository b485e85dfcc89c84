"""Run the xvf benchmarks side by side; print tables, save JSON and a PNG plot.

    python benchmarks/run.py [--quick] [--only NAME ...] [--out DIR] [--pin] [--readme]

Never use these numbers as pass/fail thresholds in tests: the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `xvf` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import e2e_blk, guests, mmio_roundtrip, notify, scale
from benchmarks.common import HERE, REPO

BENCHMARKS = {
    "mmio_roundtrip": mmio_roundtrip.run,
    "notify": notify.run,
    "e2e_blk": e2e_blk.run,
    "scale": scale.run,
    "guests": guests.run,
}
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(columns: list[str], rows: list[dict]) -> list[str]:
    """A GitHub-markdown table (also readable on a terminal)."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return out


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Measured {m['date']} on {m['machine']}, {m['nproc']} CPUs ({m['cpu_model']}), "
        f"Linux {m['kernel']}, Python {m['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}. Shared, noisy machine: "
        "compare the ratios of one run, not absolute numbers across runs. Times in µs.",
        "",
    ]
    for name, res in results["benchmarks"].items():
        lines.append(f"**{res.get('title', name)}**")
        lines.append("")
        if "skipped" in res:
            lines += [f"skipped: {res['skipped']}", ""]
            continue
        if "error" in res:
            lines += [f"failed: {res['error']}", ""]
            continue
        lines += table(res["columns"], res["rows"])
        if res.get("memory"):
            lines += ["", *table(["devices", "rss_kib"], res["memory"])]
        lines.append("")
        ratios = res.get("ratios", {})
        flat = []
        for key, value in ratios.items():
            if isinstance(value, dict):
                flat += [(f"{key}: {k}", v) for k, v in value.items()]
            else:
                flat.append((key, value))
        if flat:
            lines += table(["ratio", "value"], [{"ratio": k, "value": v} for k, v in flat])
            lines.append("")
        if res.get("goal"):
            lines += [f"Goal: {res['goal']}.", ""]
    return "\n".join(lines)


def plot(results: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install '.[bench]'): no plot"
    b = results["benchmarks"]
    panels = [
        n
        for n in ("mmio_roundtrip", "notify", "e2e_blk", "scale", "guests")
        if b.get(n, {}).get("rows")
    ]
    if not panels:
        return "nothing to plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        rows = b[name]["rows"]
        if name == "mmio_roundtrip":
            labels = [f"{r['impl']} {r['op'].split()[0]}" for r in rows]
            ax.bar(labels, [r["median_us"] for r in rows], label="median")
            ax.set_ylabel("µs per access")
        elif name == "notify":
            labels = [f"{r['impl']} {r['via'].split()[0]} {r['path'][:14]}" for r in rows]
            ax.bar(labels, [r["median_us"] for r in rows])
            ax.set_ylabel("µs")
        elif name == "e2e_blk":
            labels = [f"{r['path']} QD{r['qd']}" for r in rows]
            ax.bar(labels, [r["iops"] / 1e3 for r in rows])
            ax.set_ylabel("k IOPS (4 KiB random r/w)")
        elif name == "guests":
            for mode in guests.MODES:
                mine = [r for r in rows if r["threads"] == mode]
                xs, ys = [r["guests"] for r in mine], [r["exits_kps"] for r in mine]
                ax.plot(xs, ys, "o-", label=f"{mode} thread(s)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("guests issuing at once")
            ax.set_ylabel("k exits per second, all guests")
            ax.legend()
        else:
            ax.plot([r["devices"] for r in rows], [r["median_us"] for r in rows], "o-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("devices issuing at once")
            ax.set_ylabel("median µs per access")
        ax.set_title(name)
        if name not in ("scale", "guests"):
            ax.tick_params(axis="x", labelsize=6, labelrotation=70)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def update_readme(text: str) -> None:
    readme = os.path.join(REPO, "README.md")
    with open(readme) as f:
        content = f.read()
    start, end = content.index(README_START), content.index(README_END)
    link = "Details and caveats: [benchmarks/README.md](benchmarks/README.md)."
    body = f"{README_START}\n{text}\n{link}\n"
    with open(readme, "w") as f:
        f.write(content[:start] + body + content[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny iteration counts (smoke test)")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the outputs")
    p.add_argument("--pin", action="store_true", help="pin requester to CPU 0, responder to CPU 1")
    p.add_argument("--readme", action="store_true", help="put the tables into README.md")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    pin_cpus = (0, 1) if a.pin and (os.cpu_count() or 1) >= 2 else None
    results: dict = {"machine": machine(), "quick": a.quick, "pinned": pin_cpus, "benchmarks": {}}
    failed = False
    t_all = time.monotonic()
    for name in a.only or list(BENCHMARKS):
        t0 = time.monotonic()
        print(f"== {name} ...", flush=True)
        try:
            res = BENCHMARKS[name](quick=a.quick, pin_cpus=pin_cpus)
        except Exception as exc:  # report and go on with the others
            failed = True
            res = {"name": name, "error": f"{type(exc).__name__}: {exc}", "rows": []}
        res["seconds"] = round(time.monotonic() - t0, 1)
        results["benchmarks"][name] = res
    results["seconds"] = round(time.monotonic() - t_all, 1)
    text = report(results)
    note = plot(results, os.path.join(a.out, "results.png"))
    if note:
        text += f"\n({note})\n"
        results["plot"] = note
    else:
        results["plot"] = os.path.join(a.out, "results.png")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"JSON: {os.path.join(a.out, 'results.json')}  ({results['seconds']} s)")
    if a.readme and not a.quick:
        update_readme(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
