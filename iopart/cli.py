"""The `iopart` command line: parses arguments at the edge, calls the API, renders.

Human tables by default, `--json` for scripts. Errors are IopartError and exit 2
with one clear line (or a JSON error object with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iopart import __version__
from iopart.errors import IopartError

out = Console()
err = Console(stderr=True)


def _progress_bar() -> tuple[Progress, Callable[[str, float], None]]:
    bar = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("starting", total=1.0)

    def update(label: str, frac: float) -> None:
        bar.update(task, description=label, completed=frac)

    return bar, update


def render_bench(doc: dict[str, Any]) -> None:
    from bench.stats import fmt as f

    t = Table(title=f"iopart bench {doc['bench']}" + (" (quick)" if doc.get("quick") else ""))
    for col in ("path", "p50 µs", "p99 µs", "p99.9 µs", "ops/s"):
        t.add_column(col, justify="left" if col == "path" else "right")

    for r in doc["rows"]:
        t.add_row(r["path"], f(r["p50_us"]), f(r["p99_us"]), f(r["p999_us"]), f(r["ops_per_s"]))
    out.print(t)
    rt = Table(title="ratios")
    for col in ("ratio", "value", "target", "met"):
        rt.add_column(col)
    for k, v in doc["ratios"].items():
        met = doc.get("met", {}).get(k)
        rt.add_row(
            k,
            f(v),
            doc.get("targets", {}).get(k, ""),
            "" if met is None else ("[green]yes[/]" if met else "[red]no[/]"),
        )
    out.print(rt)


def cmd_version(args: argparse.Namespace) -> int:
    from iopart._native import NATIVE_ABI, build_stamp

    info = {"version": __version__, "native_abi": NATIVE_ABI, "native_build": build_stamp()}
    if args.json:
        print(json.dumps(info))
    else:
        out.print(f"iopart {__version__} (native ABI {NATIVE_ABI}, build {build_stamp()})")
    return 0


def _run_bench(args: argparse.Namespace, name: str, run: Callable[..., dict[str, Any]]) -> int:
    from bench import report

    bar, update = _progress_bar()
    with bar:
        doc = run(quick=args.quick, progress=update)
    if not args.no_save:
        report.save(doc)
    if getattr(args, "json", False):
        keys = ("bench", "rows", "ratios", "targets", "met", "quick")
        print(json.dumps({k: doc[k] for k in keys}))
    else:
        render_bench(doc)
        if not args.no_save:
            out.print(f"saved bench/results/{name}.json and regenerated BENCHMARKS.md")
    return 1 if args.check and not all(doc["met"].values()) else 0


def cmd_bench_channel(args: argparse.Namespace) -> int:
    from bench import channel

    return _run_bench(args, "channel", channel.run)


def cmd_bench_tx(args: argparse.Namespace) -> int:
    from bench import tx

    return _run_bench(args, "tx", tx.run)


def cmd_bench_report(args: argparse.Namespace) -> int:
    from bench import report

    path = report.write_report()
    out.print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from iopart import demo

    return demo.run(out, quick=not args.full)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iopart",
        description="I/O-partition virtual device server. Implemented so far: the host memory "
        "pool, memory channels with a native data path, and the channel benchmark.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # --json is accepted before or after the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )

    v = sub.add_parser(
        "version", parents=[common], help="print the version and the native build stamp"
    )
    v.set_defaults(func=cmd_version)

    d = sub.add_parser("demo", help="two processes over a channel, refusals, benchmark table")
    d.add_argument("--full", action="store_true", help="run the full benchmark instead of --quick")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks (iopart and its comparison points in one run)")
    bsub = b.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    benches = (
        (
            "channel",
            cmd_bench_channel,
            "null request round trip over a channel vs raw ring and eventfd",
        ),
        (
            "tx",
            cmd_bench_tx,
            "committed transactions/s through the command channel vs a durable SQLite loop",
        ),
    )
    for name, func, text in benches:
        bc = bsub.add_parser(name, parents=[common], help=text)
        bc.add_argument("--quick", action="store_true", help="short run (under 30 s)")
        bc.add_argument(
            "--no-save", action="store_true", help="do not write bench/results or BENCHMARKS.md"
        )
        bc.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
        bc.set_defaults(func=func)
    br = bsub.add_parser("report", help="regenerate BENCHMARKS.md from bench/results/*.json")
    br.set_defaults(func=cmd_bench_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except IopartError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": exc.to_dict()}))
        else:
            err.print(f"[red]iopart: {exc.kind}:[/] {exc.message}")
        return 2
    except KeyboardInterrupt:
        err.print("iopart: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
