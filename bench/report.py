"""BENCHMARKS.md is generated from bench/results/*.json by this module, never by hand.

iopart bench report
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.stats import fmt

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPORT = HERE.parent / "BENCHMARKS.md"
DISK_PNG = "disk_latency.png"


def _section(doc: dict[str, Any]) -> list[str]:
    host = doc.get("host", {})
    out = [
        f"## {doc['bench']}",
        "",
        f"Command: `{doc['command']}` — {doc['when']}, {doc.get('seconds', '?')} s, "
        f"{host.get('cpus', '?')} CPUs, kernel {host.get('kernel', '?')}.",
        "",
        "| path | p50 µs | p99 µs | p99.9 µs | ops/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        out.append(
            f"| {r['path']} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | "
            f"{fmt(r['p999_us'])} | {fmt(r['ops_per_s'])} |"
        )
    out += _ratio_table(doc)
    if doc.get("notes"):
        out += ["", doc["notes"] + "."]
    return [*out, ""]


def _ratio_table(doc: dict[str, Any]) -> list[str]:
    out = ["", "| ratio | value | target | met |", "| --- | ---: | --- | --- |"]
    targets = doc.get("targets", {})
    met = doc.get("met", {})
    for k, v in doc["ratios"].items():
        t = targets.get(k, "")
        m = ("yes" if met.get(k) else "**no**") if k in met else ""
        out.append(f"| `{k}` | {fmt(v)} | {t} | {m} |")
    return out


def _failover_section(doc: dict[str, Any]) -> list[str]:
    """The failover benchmark: stall distributions per kind of fault, and the peer."""
    host = doc.get("host", {})
    out = [f"## {doc['bench']}", "",
           f"Command: `{doc['command']}` — {doc['when']}, {doc.get('seconds', '?')} s, "
           f"{host.get('cpus', '?')} CPUs, kernel {host.get('kernel', '?')}; heartbeat "
           f"deadline {doc.get('heartbeat_ms', '?')} ms.", "",
           "| path | faults | stall p50 ms | p99 ms | p99.9 ms | max ms |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in doc["rows"]:
        out.append(f"| {r['path']} | {r['faults']} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} "
                   f"| {fmt(r['p999_ms'])} | {fmt(r['max_ms'])} |")
    out += _ratio_table(doc)
    if doc.get("notes"):
        out += ["", doc["notes"] + "."]
    return [*out, ""]


def _disk_section(doc: dict[str, Any], image: str | None) -> list[str]:
    """The disk benchmark: rows grouped by workload, ratios to direct, the histogram."""
    host = doc.get("host", {})
    kind = " (tiny)" if doc.get("tiny") else " (quick)" if doc.get("quick") else ""
    out = [
        f"## {doc['bench']}{kind}",
        "",
        f"Command: `{doc['command']}` — {doc['when']}, {doc.get('seconds', '?')} s, "
        f"{host.get('cpus', '?')} CPUs, kernel {host.get('kernel', '?')}, {host.get('fio', '')}, "
        f"image on {host.get('image_fs', '?')}; servers on CPU {host.get('server_cpu', '?')}, "
        f"clients on CPU {host.get('client_cpu', '?')}.",
        "",
        "| path | workload | p50 µs | p99 µs | p99.9 µs | IOPS | p50 ÷ direct "
        "| IOPS ÷ direct | n |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        out.append(
            f"| {r['path']} | {r['workload']} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | "
            f"{fmt(r['p999_us'])} | {fmt(r['ops_per_s'])} | {fmt(r.get('p50_vs_direct'))} | "
            f"{fmt(r.get('iops_vs_direct'))} | {fmt(r.get('samples'))} |"
        )
    out += _ratio_table(doc)
    share = (doc.get("contention") or {}).get("share")
    if share is not None:
        out += ["", f"CPU contention: iopart's server threads and guest waited on the run queue "
                f"{100 * share:.1f} % of their randread job time"
                + (" — **other work was running; tails and IOPS are not representative**."
                   if share > 0.05 else ".")]
    g = doc.get("guests16")
    if g:
        bad = [i for i, x in enumerate(g["guests"]) if "error" in x or x["errors"]
               or x["verify_failures"] or x["verified_bytes"] != g["extent_bytes"]]
        out += ["", f"16 guests at once, {g['extent_bytes'] >> 20} MiB extent each, "
                f"{g['seconds']} s: " + (f"**guests {bad} failed**" if bad else
                                         "every extent read back and verified")
                + "."]
    if doc.get("notes"):
        out += ["", doc["notes"] + "."]
    if image:
        out += ["", f"![4 KiB random read latency, QD1]({image})"]
    return [*out, ""]


def plot_disk(doc: dict[str, Any], png: Path) -> Path | None:
    """The latency histogram of the disk benchmark (QD1 random read panels) as a PNG."""
    hist = doc.get("histograms") or {}
    panels = [p for p in hist.get("panels", []) if p.get("paths")]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    edges = np.asarray(hist["edges_us"], dtype=float)
    fig = Figure(figsize=(6.5 * len(panels), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        lo, hi = len(edges), 0
        for path, counts in panel["paths"].items():
            c = np.asarray(counts, dtype=float)
            if c.sum() <= 0:
                continue
            # x range: first sample to the 99.9th percentile of the slowest path
            cum = np.cumsum(c) / c.sum()
            lo = min(lo, int(np.nonzero(c)[0][0]))
            hi = max(hi, int(np.searchsorted(cum, 0.999)) + 1)
            ax.stairs(100.0 * c / c.sum(), edges, label=path)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if hi > lo:
            ax.set_xlim(edges[lo] / 1.2, edges[hi] * 1.2)
        ax.set_xlabel("latency (µs, log)")
        ax.set_ylabel("% of I/Os per bin")
        ax.set_title(panel["workload"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(png)
    return png


def render(results: Path = RESULTS, report_dir: Path | None = None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `iopart bench report` from `bench/results/*.json`; each benchmark",
        "runs iopart and its comparison points in the same run. This is a shared 2-core",
        "VM: compare medians and ratios, not absolute tails.",
        "",
    ]
    docs = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    if not docs:
        lines.append("No results yet: run `make bench`.")
    png = results / DISK_PNG
    for doc in docs:
        if doc.get("bench") == "disk":
            image = None
            if png.exists():
                image = os.path.relpath(png, report_dir or REPORT.parent)
            lines += _disk_section(doc, image)
        elif doc.get("bench") == "failover":
            lines += _failover_section(doc)
        else:
            lines += _section(doc)
    return "\n".join(lines).rstrip() + "\n"


def save(doc: dict[str, Any], results: Path = RESULTS) -> Path:
    """Write one benchmark's JSON (atomically) and regenerate BENCHMARKS.md."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{doc['bench']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    write_report(results)
    return path


def write_report(results: Path = RESULTS, report: Path = REPORT) -> Path:
    disk = results / "disk.json"
    if disk.exists():
        plot_disk(json.loads(disk.read_text()), results / DISK_PNG)
    tmp = report.with_suffix(".tmp")
    tmp.write_text(render(results, report.parent))
    tmp.replace(report)
    return report
