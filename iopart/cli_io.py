"""`iopart hw`, `iopart disk ...` and `iopart guest run`: the I/O side of the CLI."""

from __future__ import annotations

import argparse
import errno
import re
import signal
import subprocess
import sys
from typing import Any

from rich.table import Table

from iopart.errors import IopartError

_SIZE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_mib(text: str) -> int:
    """'64M', '1G', '512' (MiB) -> MiB; refuses what is not a whole MiB."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 64M, 1G or MiB as 64)")
    nbytes = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if nbytes <= 0 or nbytes % (1 << 20):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of MiB")
    return nbytes >> 20


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def cmd_hw(args: argparse.Namespace) -> int:
    from iopart import cli
    from iopart.hw import hw_report

    doc = hw_report()

    def show(d: dict[str, Any]) -> None:
        t = Table(title="block devices")
        for col in ("name", "kind", "size", "block", "ro", "model / backing file"):
            t.add_column(col)
        for b in d["block"]:
            t.add_row(b["name"], b["kind"], _human(int(b["size_bytes"])),
                      str(b["logical_block_size"]), "yes" if b["read_only"] else "",
                      str(b["backing_file"] or b["model"]))
        cli.out.print(t)
        n = Table(title="network devices")
        for col in ("name", "kind", "mac", "mtu", "state", "driver"):
            n.add_column(col)
        for x in d["net"]:
            n.add_row(x["name"], x["kind"], x["mac"], str(x["mtu"]), x["operstate"], x["driver"])
        cli.out.print(n)

    return cli._emit(args, doc, show)


def _disk_table(doc: dict[str, Any]) -> Table:
    t = Table(title="disks")
    for col in ("name", "server", "size", "path", "assigned"):
        t.add_column(col)
    for d in sorted(doc["disks"], key=lambda d: d["name"]):
        parts = []
        for p, mode in sorted(d["assigned"].items()):
            off, ln = d["extents"].get(p, [0, 0])
            parts.append(f"{p} {mode} [{_human(off)}, +{_human(ln or d['size'] - off)})")
        t.add_row(d["name"], d["server"], _human(d["size"]), d["path"], "\n".join(parts))
    return t


def _endpoint_table(eps: list[dict[str, Any]]) -> Table:
    t = Table(title="disk endpoints (live)")
    for col in ("partition", "disk", "mode", "reads", "writes", "MiB", "errors", "refused",
                "mean µs"):
        t.add_column(col, justify="left" if col in ("partition", "disk", "mode") else "right")
    for e in eps:
        s = e["stats"]
        ops = s["reads"] + s["writes"] + s["flushes"]
        mean = s["lat_sum_ns"] / ops / 1000 if ops else 0.0
        moved = (s["bytes_read"] + s["bytes_written"]) / (1 << 20)
        t.add_row(e["partition"], e["device"], e["mode"] + (" direct" if e["direct"] else ""),
                  str(s["reads"]), str(s["writes"]), f"{moved:.1f}", str(s["errors"]),
                  str(s["refused"]), f"{mean:.1f}")
    return t


def cmd_disk(args: argparse.Namespace) -> int:
    from iopart import cli

    a = args.action
    if a == "list":
        doc = cli._rpc(args, "disk.list")

        def show(d: dict[str, Any]) -> None:
            cli.out.print(_disk_table(d))
            if d["endpoints"]:
                cli.out.print(_endpoint_table(d["endpoints"]))

        return cli._emit(args, doc, show)
    if a == "add":
        params: dict[str, Any] = {"name": args.name, "path": args.path, "server": args.server}
        if args.create is not None:
            params["create_mib"] = args.create
        doc = cli._rpc(args, "disk.add", **params)
        return cli._emit(args, doc, lambda d: cli.out.print(
            f"added {d['disk']['name']} ({_human(d['disk']['size'])}) on "
            f"{d['disk']['server']} (tx {d['tx']})"))
    if a == "remove":
        doc = cli._rpc(args, "disk.remove", name=args.name)
        return cli._emit(args, doc, lambda d: cli.out.print(f"removed {d['removed']}"))
    if a == "assign":
        params = {"device": args.name, "partition": args.partition, "mode": args.mode}
        if args.size is not None:
            params["size_mib"] = args.size
        else:
            params["offset"], params["length"] = args.offset, args.length
        doc = cli._rpc(args, "disk.assign", **params)
    else:
        doc = cli._rpc(args, "disk.unassign", device=args.name, partition=args.partition)
    return cli._emit(args, doc, lambda d: cli.out.print(_disk_table({"disks": [d["disk"]]})))


def cmd_guest_run(args: argparse.Namespace) -> int:
    """Create (or reuse) the partition, assign its disk range, run CMD under a monitor."""
    from iopart import cli
    from iopart.rpc import RpcError

    prog = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not prog:
        raise IopartError("guest run needs a program after --", errno=errno.EINVAL)
    state = str(cli._state_dir(args))
    created = False
    try:
        cli._rpc(args, "partition.show", name=args.name)
    except RpcError as exc:
        if exc.errno != errno.ENOENT:
            raise
        params: dict[str, Any] = {"name": args.name, "memory_mib": args.memory}
        if args.cpu is not None:
            params["cpu"] = args.cpu
        cli._rpc(args, "partition.create", **params)
        created = True
    try:
        if args.disk:
            disks = {d["name"]: d for d in cli._rpc(args, "disk.list")["disks"]}
            d = disks.get(args.disk)
            if d is None:
                raise IopartError(f"no disk named {args.disk!r} (see `iopart disk list`)",
                                  errno=errno.ENOENT)
            if args.name not in d["assigned"]:
                assign: dict[str, Any] = {"device": args.disk, "partition": args.name,
                                          "mode": args.mode}
                if args.whole_disk:
                    assign["offset"], assign["length"] = 0, 0
                else:
                    assign["size_mib"] = args.disk_size
                cli._rpc(args, "disk.assign", **assign)
        nic = args.nic if args.nic is not None else ("nic0" if args.netns else "")
        if nic:
            nics = {d["name"]: d for d in cli._rpc(args, "nic.list")["nics"]}
            if nic not in nics:
                raise IopartError(f"no NIC named {nic!r} (see `iopart nic list`)",
                                  errno=errno.ENOENT)
            if args.name not in nics[nic]["assigned"]:
                cli._rpc(args, "disk.assign", device=nic, partition=args.name, mode="shared")
        argv = [sys.executable, "-m", "monitor_stubs.stub", "--state-dir", state,
                "--name", args.name, *(["--direct"] if args.direct else []),
                *(["--netns"] if args.netns else []), *(["--ip", args.ip] if args.ip else []),
                "--", *prog]
        proc = subprocess.Popen(argv)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, _f: proc.send_signal(s))
        return proc.wait()
    finally:
        if args.rm or (created and args.rm is None):
            try:
                cli._rpc(args, "partition.destroy", name=args.name)
            except (RpcError, IopartError) as exc:
                print(f"iopart: could not destroy {args.name}: {exc}", file=sys.stderr)


def cmd_nic(args: argparse.Namespace) -> int:
    from iopart import cli

    if args.action == "list":
        doc = cli._rpc(args, "nic.list")

        def show(d: dict[str, Any]) -> None:
            t = Table(title="NICs")
            for col in ("name", "server", "uplink", "assigned", "tx frames", "rx frames",
                        "dropped"):
                t.add_column(col)
            for n in d["nics"]:
                up = n.get("uplink", {})
                st = up.get("stats", {})
                t.add_row(n["name"], n["server"],
                          f"{up.get('kind', '?')} {up.get('interface', n['path'])}",
                          ", ".join(sorted(n["assigned"])), str(st.get("tx_frames", "")),
                          str(st.get("rx_frames", "")), str(st.get("rx_dropped", "")))
            cli.out.print(t)
            if d["ports"]:
                p = Table(title="guest NIC ports (live)")
                for col in ("partition", "nic", "mac", "tx", "rx", "rx dropped", "refused"):
                    p.add_column(col)
                for x in d["ports"]:
                    s = x["stats"]
                    p.add_row(x["partition"], x["device"], x["mac"], str(s["tx_frames"]),
                              str(s["rx_frames"]), str(s["rx_dropped"]),
                              str(s["spoofed"] + s["refused"] + s["runts"] + s["oversize"]))
                cli.out.print(p)

        return cli._emit(args, doc, show)
    if args.action == "add":
        path = (f"packet:{args.interface}" if args.interface else
                f"tap:{args.tap}" if args.tap else f"veth:{args.veth}")
        doc = cli._rpc(args, "nic.add", name=args.name, path=path, server=args.server)
        return cli._emit(args, doc, lambda d: cli.out.print(
            f"added {d['nic']['name']} ({d['nic']['path']}) on {d['nic']['server']}"))
    doc = cli._rpc(args, "nic.remove", name=args.name)
    return cli._emit(args, doc, lambda d: cli.out.print(f"removed {d['removed']}"))


def add_parsers(sub: Any, common: argparse.ArgumentParser, st: argparse.ArgumentParser) -> None:
    nk = sub.add_parser("nic", help="NICs the I/O partitions switch guests onto")
    nsub = nk.add_subparsers(dest="action", metavar="ACTION")
    nsub.required = True
    na = nsub.add_parser("add", parents=[st], help="add an uplink: an existing interface "
                         "(AF_PACKET) or a veth pair into a namespace of its own")
    na.add_argument("name")
    how = na.add_mutually_exclusive_group(required=True)
    how.add_argument("--interface", help="an existing interface of this host, e.g. eth1")
    how.add_argument("--veth", metavar="ADDR/PREFIX",
                     help="a veth pair whose far end has this address in its own namespace")
    how.add_argument("--tap", metavar="NAME", help="a TAP created for it (the host's side "
                     "is an ordinary interface)")
    na.add_argument("--server", default="iop-a", help="I/O partition serving it (default iop-a)")
    nsub.add_parser("list", parents=[st], help="NICs, uplinks, live guest ports")
    nsub.add_parser("remove", parents=[st], help="remove a NIC assigned to nobody"
                    ).add_argument("name")
    nk.set_defaults(func=cmd_nic)

    h = sub.add_parser("hw", parents=[common], help="block and network devices of this host "
                       "(sysfs, through pyudev)")
    h.set_defaults(func=cmd_hw)

    dk = sub.add_parser("disk", help="disks the I/O partitions serve, and who sees which range")
    dsub = dk.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True
    da = dsub.add_parser("add", parents=[st], help="add an image file or block device")
    da.add_argument("name")
    da.add_argument("path")
    da.add_argument("--server", default="iop-a", help="I/O partition serving it (default iop-a)")
    da.add_argument("--create", type=parse_mib, metavar="SIZE",
                    help="create the image file with this size first (e.g. 1G)")
    dsub.add_parser("list", parents=[st], help="disks, assignments, live endpoints")
    dsub.add_parser("remove", parents=[st], help="remove a disk assigned to nobody"
                    ).add_argument("name")
    das = dsub.add_parser("assign", parents=[st], help="give a partition a range of a disk")
    das.add_argument("name", help="the disk")
    das.add_argument("partition")
    das.add_argument("--mode", choices=("rw", "ro", "shared"), default="rw",
                     help="rw: exclusive writable range (default); shared: writable, may "
                     "overlap other shared ranges; ro: read-only")
    das.add_argument("--size", type=parse_mib, metavar="SIZE",
                     help="take the first free range of this size (e.g. 16M)")
    das.add_argument("--offset", type=int, default=0, help="byte offset (with --length)")
    das.add_argument("--length", type=int, default=0, help="bytes; 0 = to the end")
    dun = dsub.add_parser("unassign", parents=[st], help="take a range back")
    dun.add_argument("name")
    dun.add_argument("partition")
    dk.set_defaults(func=cmd_disk)

    g = sub.add_parser("guest", help="process guests under a monitor")
    gsub = g.add_subparsers(dest="action", metavar="ACTION")
    gsub.required = True
    gr = gsub.add_parser(
        "run", parents=[st], help="run a Python program as a guest partition",
        description="Create the partition (or reuse it), give it a range of a disk, and run "
        "the program under its monitor stub: only its memory mapped, seccomp filter, its "
        "CPU share. The program reaches its disk with iopart.client.open_disk().")
    gr.add_argument("name", help="the guest partition (created if it does not exist)")
    gr.add_argument("--memory", type=parse_mib, default=64, metavar="SIZE",
                    help="partition memory (default 64M)")
    gr.add_argument("--cpu", type=float, help="CPUs, e.g. 0.5 (default: policy)")
    gr.add_argument("--disk", default="disk0", help="disk to attach (default disk0; '' none)")
    gr.add_argument("--disk-size", type=parse_mib, default=16, metavar="SIZE",
                    help="size of the range taken on the disk (default 16M)")
    gr.add_argument("--whole-disk", action="store_true", help="the whole disk, not a range")
    gr.add_argument("--mode", choices=("rw", "ro", "shared"), default="rw",
                    help="rw: a range nobody else writes (default); shared: writable, may "
                    "overlap other shared ranges; ro: read-only")
    gr.add_argument("--direct", action="store_true", help="disk I/O with O_DIRECT")
    gr.add_argument("--nic", help="NIC to attach (default: nic0 with --netns, else none)")
    gr.add_argument("--netns", action="store_true",
                    help="run the program in a network namespace of its own whose TAP is "
                    "bridged to the guest's NIC: unmodified programs (ping, socat, iperf3) "
                    "use the shared NIC; such programs are exec'd and get no disk")
    gr.add_argument("--ip", metavar="ADDR/PREFIX",
                    help="address of the guest's interface in its namespace, e.g. "
                    "10.78.0.2/24 (the default uplink's far end is 10.78.0.1)")
    gr.add_argument("--rm", action="store_true", default=None,
                    help="destroy the partition when the program ends (default: only when "
                    "this run created it)")
    gr.add_argument("--keep", dest="rm", action="store_false",
                    help="keep a partition this run created")
    gr.add_argument("program", nargs="*",
                    help="-- python3 SCRIPT [ARGS] | python3 -m MODULE | python3 -c CODE "
                    "(run in the monitor's image: disks and NICs through iopart.client), or "
                    "any program (exec'd: network namespace and CPU share only)")
    g.set_defaults(func=cmd_guest_run)
