"""The `iopart` command line: parses arguments at the edge, calls the API, renders.

Human tables by default, `--json` for scripts. Errors are IopartError and exit 2
with one clear line (or a JSON error object with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
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
    stalls = doc["bench"] == "failover"
    cols = (("path", "faults", "stall p50 ms", "p99 ms", "p99.9 ms", "max ms") if stalls
            else ("path", "p50 µs", "p99 µs", "p99.9 µs", "ops/s"))
    for col in cols:
        t.add_column(col, justify="left" if col == "path" else "right")
    for r in doc["rows"]:
        if stalls:
            t.add_row(r["path"], str(r["faults"]), f(r["p50_ms"]), f(r["p99_ms"]),
                      f(r["p999_ms"]), f(r["max_ms"]))
        else:
            t.add_row(r["path"], f(r["p50_us"]), f(r["p99_us"]), f(r["p999_us"]),
                      f(r["ops_per_s"]))
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


def cmd_bench_net(args: argparse.Namespace) -> int:
    from bench import net

    return _run_bench(args, "net", net.run)


def cmd_bench_disk(args: argparse.Namespace) -> int:
    from bench import disk

    doc = disk.run(args.quick, out_json=bool(getattr(args, "json", False)),
                   progress=not getattr(args, "json", False) or err.is_terminal,
                   save=not args.no_save)
    return 1 if args.check and not all(doc["met"].values()) else 0


def cmd_bench_failover(args: argparse.Namespace) -> int:
    from bench import failover

    return _run_bench(args, "failover", failover.run)


def cmd_bench_report(args: argparse.Namespace) -> int:
    from bench import report

    path = report.write_report()
    out.print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from iopart import demo

    return demo.run(out, quick=not args.full)


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB" if n % (1 << 20) else f"{n >> 20:,} MiB"


def _emit(args: argparse.Namespace, doc: Any, render: Callable[[Any], None]) -> int:
    if args.json:
        print(json.dumps(doc))
    else:
        render(doc)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from iopart import stack

    config = Path(args.config) if args.config else None
    bar, update = _progress_bar()
    with bar:
        info = stack.up(_state_dir(args), config, timeout=args.timeout, progress=update)

    def show(i: dict[str, Any]) -> None:
        if i["already_running"]:
            out.print(f"already up: boot pid {i['boot_pid']}, state in {i['state_dir']}")
        else:
            out.print(f"up: boot pid {i['boot_pid']}, command partition pid {i['command_pid']}, "
                      f"state in {i['state_dir']}")

    return _emit(args, info, show)


def cmd_down(args: argparse.Namespace) -> int:
    from iopart import stack

    info = stack.down(_state_dir(args), grace=args.timeout)

    def show(i: dict[str, Any]) -> None:
        if not i["was_running"]:
            out.print("not running")
        else:
            how = "killed after the grace time" if i["killed"] else "stopped cleanly"
            out.print(f"down: boot pid {i['boot_pid']} {how}")

    return _emit(args, info, show)


def cmd_fail(args: argparse.Namespace) -> int:
    from iopart import faults

    info = faults.inject(_state_dir(args), args.name, hang=args.hang)

    def show(i: dict[str, Any]) -> None:
        out.print(f"{i['partition']} (pid {i['pid']}): {i['signal']}; {i['note']}")

    return _emit(args, info, show)


def _rpc(args: argparse.Namespace, method: str, **params: Any) -> Any:
    from iopart.rpc import RpcClient

    with RpcClient(_state_dir(args)) as c:
        return c.call(method, **params)


def _partition_table(parts: list[dict[str, Any]], title: str = "partitions") -> Table:
    t = Table(title=title)
    for col in ("index", "name", "kind", "state", "cpu", "memory", "extents"):
        t.add_column(col, justify="right" if col in ("index", "cpu", "memory") else "left")
    for p in sorted(parts, key=lambda p: p["index"]):
        ext = p.get("extents", [])
        where = ", ".join(f"{o:#x}+{_mib(n)}" for o, n in ext[:3])
        where += " ..." if len(ext) > 3 else ""
        t.add_row(str(p["index"]), p["name"], p["kind"], p["state"], f"{p['cpu']:g}",
                  _mib(p["memory"]), where)
    return t


def render_status(doc: dict[str, Any]) -> None:
    db, uv, boot = doc["database"], doc["ultravisor"], doc["boot"]
    parts = list(db.get("partitions", {}).values())
    out.print(_partition_table(parts))
    r = Table(title="resources")
    for col in ("resource", "used", "total"):
        r.add_column(col, justify="left" if col == "resource" else "right")
    cpu_used = sum(p["cpu"] for p in parts)
    r.add_row("cpu", f"{cpu_used:g}", f"{db.get('cpu_capacity', 0):g}")
    if uv:
        used = uv["memory_bytes"] - uv["memory_free"]
        r.add_row("partition memory (page map)", _mib(used), _mib(uv["memory_bytes"]))
        r.add_row("host pool", "", _mib(uv["pool_size"]) + (" hugetlb" if uv["pool_hugetlb"]
                                                             else " 4 KiB pages"))
    r.add_row("channels", str(len(db.get("channels", {}))), "")
    r.add_row("devices", str(len(db.get("devices", {}))), "")
    out.print(r)
    h = Table(title="health")
    for col in ("partition", "pid", "state", "detail"):
        h.add_column(col)
    h.add_row("boot", str(boot.get("pid", "?")), "running" if boot else "unknown", "")
    for name, c in boot.get("children", {}).items():
        state = "[green]running[/]" if c["alive"] else "[red]down[/]"
        h.add_row(name, str(c["pid"]), state, f"restarts {c['restarts']}")
    if uv:
        h.add_row("transactions", "", "", f"replayed at start {uv['replayed']}; since: "
                  f"committed {uv['committed']}, refused {uv['refused']}, rolled back "
                  f"{uv['rolled_back']}, open {uv['open']}")
    else:
        h.add_row("ultravisor", "", "[red]unreachable[/]", "")
    out.print(h)
    from iopart.cli_io import _endpoint_table

    for name, rep in sorted(doc.get("io", {}).items()):
        if not rep:
            out.print(f"{name}: [red]down[/]")
            continue
        eps = rep.get("endpoints", [])
        role = rep.get("role", "?")
        if role == "active":
            last = rep.get("takeovers") or []
            took = (f"; took over {len(last)} time(s), last in {last[-1]['ms']} ms "
                    f"({last[-1]['why']})" if last else "")
            out.print(f"{name}: [green]active[/], serves {len(eps)} disk and "
                      f"{len(rep.get('nic_ports', []))} NIC endpoint(s){took}; failovers so far "
                      f"{rep.get('failovers', 0)}")
        else:
            out.print(f"{name}: [yellow]{role}[/], ready to take over "
                      f"{len(rep.get('standby_for', []))} endpoint(s) (heartbeat deadline "
                      f"{rep.get('heartbeat_ms', '?')} ms)")
        out.print(f"{name}: engine {rep['engine']}, {len(eps)} endpoint(s), "
                  f"{rep['refused_attaches']} attach(es) refused, metrics {rep['metrics_url']}")
        if eps:
            out.print(_endpoint_table(eps))
        ups = ", ".join(f"{n} ({u.get('kind')} {u.get('interface')})"
                        for n, u in sorted(rep.get("uplinks", {}).items()))
        out.print(f"{name}: switch with {len(rep.get('nic_ports', []))} guest NIC port(s); "
                  f"uplinks {ups or 'none'} (details: iopart nic list)")


def cmd_status(args: argparse.Namespace) -> int:
    return _emit(args, _rpc(args, "status"), render_status)


def cmd_partition(args: argparse.Namespace) -> int:
    a = args.action
    if a == "list":
        return _emit(args, _rpc(args, "partition.list"),
                     lambda d: out.print(_partition_table(d["partitions"])))
    if a == "create":
        params: dict[str, Any] = {"name": args.name}
        if args.cpu is not None:
            params["cpu"] = args.cpu
        if args.memory is not None:
            params["memory_mib"] = args.memory
        doc = _rpc(args, "partition.create", **params)
    elif a == "show":
        doc = _rpc(args, "partition.show", name=args.name)
        return _emit(args, doc, lambda d: out.print_json(json.dumps(d)))
    elif a == "destroy":
        doc = _rpc(args, "partition.destroy", name=args.name)
        return _emit(args, doc, lambda d: out.print(f"destroyed {d['destroyed']} (tx {d['tx']})"))
    elif a == "set-cpu":
        doc = _rpc(args, "partition.set_cpu", name=args.name, cpu=args.cpu)
    else:
        doc = _rpc(args, "partition.set_memory", name=args.name, memory_mib=args.memory)
    return _emit(args, doc, lambda d: out.print(
        _partition_table([d["partition"]], title=f"committed (tx {d['tx']})")))


def _audit_table(recs: list[dict[str, Any]]) -> Table:
    t = Table(title="audit log")
    for col in ("seq", "time", "origin", "outcome", "steps", "detail"):
        t.add_column(col)
    import time as _time

    for r in recs:
        when = _time.strftime("%H:%M:%S", _time.localtime(r["ts"]))
        ops = ", ".join(o["op"] + ("(" + o["name"] + ")" if "name" in o else "") for o in r["ops"])
        detail = r["result"].get("error", {}).get("message", r["result"].get("reason", ""))
        color = {"committed": "green", "refused": "red"}.get(r["outcome"], "yellow")
        t.add_row(str(r["seq"]), when, r["origin"], f"[{color}]{r['outcome']}[/]", ops, detail)
    return t


def cmd_audit(args: argparse.Namespace) -> int:
    if args.action == "list":
        doc = _rpc(args, "audit.list", since=args.since, limit=args.limit)
        return _emit(args, doc, lambda d: out.print(_audit_table(d["records"])))
    doc = _rpc(args, "audit.show", seq=args.seq)
    return _emit(args, doc, lambda d: out.print_json(json.dumps(d)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iopart",
        description="I/O-partition virtual device server. Implemented so far: the host memory "
        "pool, memory channels with a native data path, the system partitions (boot, "
        "ultravisor, command) with the resource database, audit log and resource service, "
        "an I/O partition serving disks to process guests under monitors, and the channel, "
        "transaction and disk benchmarks.",
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

    d = sub.add_parser(
        "demo", help="channel refusals, system partitions with SIGKILL recovery, four guests "
        "sharing one disk and a NIC, failover between the I/O partitions, the disk benchmark"
    )
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
        (
            "net",
            cmd_bench_net,
            "frame round trips guest<->guest and guest<->uplink, throughput, vs veth and TAP",
        ),
        (
            "disk",
            cmd_bench_disk,
            "4 KiB random I/O through the I/O partition vs direct, nbdkit, qemu-storage-daemon",
        ),
        (
            "failover",
            cmd_bench_failover,
            "guest I/O stall when the active I/O partition is killed or hangs, vs "
            "qemu-storage-daemon killed and restarted under a retrying libnbd client",
        ),
    )
    for name, func, text in benches:
        bc = bsub.add_parser(name, parents=[common], help=text)
        bc.add_argument("--quick", action="store_true",
                        help="short run (under 3 minutes for disk and failover (100 faults of "
                             "each kind), 30 s for the others)")
        bc.add_argument(
            "--no-save", action="store_true", help="do not write bench/results or BENCHMARKS.md"
        )
        bc.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
        bc.set_defaults(func=func)
    br = bsub.add_parser("report", help="regenerate BENCHMARKS.md from bench/results/*.json")
    br.set_defaults(func=cmd_bench_report)

    # the host stack: --state-dir is accepted on every stack command
    st = argparse.ArgumentParser(add_help=False, parents=[common])
    st.add_argument(
        "--state-dir",
        default=os.environ.get("IOPART_STATE_DIR", ".iopart"),
        help="state directory: audit log, sockets, logs (default ./.iopart or $IOPART_STATE_DIR)",
    )
    u = sub.add_parser("up", parents=[st], help="start boot, ultravisor and command partitions")
    u.add_argument("--config", help="host TOML config (default: built-in defaults)")
    u.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    u.set_defaults(func=cmd_up)
    dn = sub.add_parser("down", parents=[st], help="stop the stack cleanly")
    dn.add_argument("--timeout", type=float, default=30.0,
                    help="grace seconds before everything is killed (default 30)")
    dn.set_defaults(func=cmd_down)
    sub.add_parser("status", parents=[st], help="partitions, resources, channels, health"
                   ).set_defaults(func=cmd_status)
    fl = sub.add_parser("fail", parents=[st], help="inject a fault into an I/O partition: "
                        "SIGKILL, or with --hang SIGSTOP (the standby takes over)")
    fl.add_argument("name", help="iop-a or iop-b")
    fl.add_argument("--hang", action="store_true",
                    help="stop it instead of killing it: the standby fences it (SIGKILL) once "
                         "it misses its heartbeat deadline ([io] heartbeat_ms), then takes over")
    fl.set_defaults(func=cmd_fail)

    pp = sub.add_parser("partition", help="create, list, show, destroy, resize partitions")
    psub = pp.add_subparsers(dest="action", metavar="ACTION")
    psub.required = True
    pc = psub.add_parser("create", parents=[st], help="create a guest partition")
    pc.add_argument("name")
    pc.add_argument("--cpu", type=float, help="CPUs, e.g. 0.25 or 2 (default: policy)")
    pc.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB (default: policy)")
    psub.add_parser("list", parents=[st], help="every partition")
    for action, text in (("show", "one partition with its descriptor"),
                         ("destroy", "destroy a guest partition")):
        psub.add_parser(action, parents=[st], help=text).add_argument("name")
    sc = psub.add_parser("set-cpu", parents=[st], help="change CPU assignment")
    sc.add_argument("name")
    sc.add_argument("cpu", type=float, help="CPUs, e.g. 0.5")
    sm = psub.add_parser("set-memory", parents=[st], help="grow or shrink memory")
    sm.add_argument("name")
    sm.add_argument("memory", type=int, metavar="MIB", help="memory in MiB")
    pp.set_defaults(func=cmd_partition)

    au = sub.add_parser("audit", help="the audit log of transactions")
    asub = au.add_subparsers(dest="action", metavar="ACTION")
    asub.required = True
    al = asub.add_parser("list", parents=[st], help="records after --since")
    al.add_argument("--since", type=int, default=0, help="after this sequence number")
    al.add_argument("--limit", type=int, default=50, help="at most this many (1-1000)")
    ash = asub.add_parser("show", parents=[st], help="one record")
    ash.add_argument("seq", type=int)
    au.set_defaults(func=cmd_audit)

    from iopart.cli_io import add_parsers

    add_parsers(sub, common, st)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # everything after `--` is a guest's program; argparse's subparsers mishandle it
    rest: list[str] | None = None
    if "--" in words:
        i = words.index("--")
        words, rest = words[:i], words[i + 1 :]
    args = build_parser().parse_args(words)
    if rest is not None:
        if not hasattr(args, "program"):
            build_parser().error("`--` is only for `iopart guest run NAME -- PROGRAM`")
        args.program = [*args.program, *rest]
    try:
        rc: int = args.func(args)
        return rc
    except IopartError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": exc.to_dict()}))
        else:
            err.print(f"[red]iopart: {exc.kind}:[/] {escape(exc.message)}")
        return 2
    except KeyboardInterrupt:
        err.print("iopart: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
