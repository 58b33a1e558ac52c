"""Process guests under their monitors, on a real stack: disks, isolation, 16 at once."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from iopart.ioarea import CHANNEL_LEN
from tests.stackutil import Stack, cli

pytestmark = pytest.mark.system


def script(tmp: Path, name: str, body: str) -> Path:
    p = tmp / f"{name}.py"
    p.write_text(textwrap.dedent(body))
    return p


def guest(s: Stack, name: str, prog: Path, *opts: str, timeout: float = 120,
          args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return cli("guest", "run", name, *s.sd(), *opts, "--", "python3", str(prog), *args,
               timeout=timeout)


def last_json(out: str) -> Any:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


def test_a_guest_writes_its_range_of_the_shared_disk(stack: Stack, tmp_path: Path) -> None:
    prog = script(tmp_path, "w", """
        import json
        from iopart import client
        d = client.open_disk()
        data = bytes(range(256)) * 32
        d.write(8192, data)
        d.flush()
        back = d.read(8192, len(data))
        odd = d.read(8195, 10)
        print(json.dumps({"ok": back == data, "odd": odd == data[3:13], "size": d.size}))
    """)
    res = guest(stack, "wr", prog, "--keep", "--disk-size", "8M")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = last_json(res.stdout)
    assert doc == {"ok": True, "odd": True, "size": 8 << 20}
    disks = stack.cli_json("disk", "list")["disks"]
    d0 = next(d for d in disks if d["name"] == "disk0")
    off, length = d0["extents"]["wr"]
    assert length == 8 << 20
    with open(d0["path"], "rb") as f:
        f.seek(off + 8192)
        assert f.read(8192) == bytes(range(256)) * 32
    # the partition was kept; a second guest of another name gets a disjoint range
    res = guest(stack, "wr2", prog, "--disk-size", "8M")
    assert res.returncode == 0, res.stdout + res.stderr
    off2 = None
    for d in stack.cli_json("disk", "list")["disks"]:
        if d["name"] == "disk0":
            off2 = d["extents"].get("wr2")
    assert off2 is None, "a guest created by the run is destroyed (and unassigned) after it"


def test_a_guest_sees_only_its_memory_and_cannot_reach_around(stack: Stack,
                                                              tmp_path: Path) -> None:
    uv_pid = stack.pids()["ultravisor"]
    prog = script(tmp_path, "iso", """
        import ctypes, json, os, sys
        from iopart import client
        from iopart.channels.channel import Descriptor, Fragment
        mem = client.memory()
        d = client.open_disk()
        maps = []
        for line in open("/proc/self/maps"):
            if "iopart-host-pool" in line:
                addr, _perm, off = line.split()[:3]
                lo, hi = (int(x, 16) for x in addr.split("-"))
                maps.append([int(off, 16), hi - lo])
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        res = {"maps": maps, "fds": fds, "regions": [[r.pool_off, r.len] for r in mem.regions]}
        try:
            open(f"/proc/{sys.argv[1]}/mem", "rb")
            res["proc_mem"] = "opened"
        except PermissionError:
            res["proc_mem"] = "refused"
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.process_vm_readv(int(sys.argv[1]), None, 0, None, 0, 0)
        res["vm_readv"] = ctypes.get_errno() if rc < 0 else 0
        # a request whose buffer lies past the partition's memory
        far = mem.size + (1 << 20)
        d.end.push(Descriptor(99, client.OP_READ, len=4096, offset=0,
                              frags=(Fragment(far, 4096, client.ACCESS_WRITE),)))
        d.end.publish()
        d.end.wait(5000)
        rsp = d.end.pop()
        res["far_status"] = rsp.status if rsp else None
        print(json.dumps(res))
    """)
    res = guest(stack, "iso", prog, "--memory", "16M", args=(str(uv_pid),))
    assert res.returncode == 0, res.stdout + res.stderr
    doc = last_json(res.stdout)
    assert not any("iopart-host-pool" in f for f in doc["fds"]), doc["fds"]
    regions = doc["regions"]
    assert sum(n for _, n in regions) == 16 << 20
    st = stack.status()
    assert any(r.get("role") == "active" for r in st["io"].values()), st["io"]
    for off, n in doc["maps"]:
        inside_memory = any(ro <= off and off + n <= ro + rn for ro, rn in regions)
        # the only other pool pages a guest maps are its channel's (not the record's
        # header or journal, which sit on the pages before it)
        assert inside_memory or n == CHANNEL_LEN, (off, n, regions)
    assert doc["proc_mem"] == "refused"
    assert doc["vm_readv"] == 1  # EPERM
    assert doc["far_status"] == -14  # EFAULT


def test_guest_run_refuses_what_does_not_exist(stack: Stack, tmp_path: Path) -> None:
    prog = script(tmp_path, "nop", "print('never')\n")
    res = guest(stack, "nodisk", prog, "--disk", "nosuchdisk")
    assert res.returncode == 2
    assert "no disk named 'nosuchdisk'" in res.stderr
    res = cli("guest", "run", "bad", *stack.sd(), "--", "/nonexistent/prog")
    assert res.returncode == 127 and "cannot run /nonexistent/prog" in res.stderr
    res = cli("guest", "run", "nonic", *stack.sd(), "--nic", "nosuchnic", "--", "true")
    assert res.returncode == 2 and "no NIC named 'nosuchnic'" in res.stderr
    res = cli("guest", "run", "x", *stack.sd(), "--memory", "12Q", "--", "python3", "-c", "1")
    assert res.returncode == 2 and "not a size" in res.stderr
    parts = stack.call("partition.list")["partitions"]
    assert not [p for p in parts if p["name"] in ("nodisk", "bad", "x", "nonic")]


def test_disk_commands_assign_ranges_and_refuse_clashes(stack: Stack, tmp_path: Path) -> None:
    img = tmp_path / "extra.img"
    doc = stack.cli_json("disk", "add", "extra", str(img), "--create", "32M")
    assert doc["disk"]["size"] == 32 << 20 and img.stat().st_size == 32 << 20
    stack.call("partition.create", name="pa", memory_mib=4)
    stack.call("partition.create", name="pb", memory_mib=4)
    stack.cli_json("disk", "assign", "extra", "pa", "--size", "16M")
    res = cli("disk", "assign", "extra", "pb", *stack.sd(), "--offset", "0",
              "--length", str(8 << 20))
    assert res.returncode == 2 and "overlaps" in res.stderr
    doc = stack.cli_json("disk", "assign", "extra", "pb", "--size", "16M")
    assert doc["disk"]["extents"] == {"pa": [0, 16 << 20], "pb": [16 << 20, 16 << 20]}
    res = cli("disk", "assign", "extra", "pa", *stack.sd(), "--mode", "ro")
    assert res.returncode == 2 and "already assigned" in res.stderr
    res = cli("disk", "assign", "extra", "pa", *stack.sd(), "--size", "1M")
    assert res.returncode == 2 and "no free 1 MiB range" in res.stderr
    res = cli("disk", "remove", "extra", *stack.sd())
    assert res.returncode == 2 and "assigned" in res.stderr
    res = cli("disk", "add", "missing", str(tmp_path / "nope.img"), *stack.sd())
    assert res.returncode == 2 and "nope.img" in res.stderr
    stack.cli_json("disk", "unassign", "extra", "pa")
    stack.call("partition.destroy", name="pb")  # also takes its range back
    stack.cli_json("disk", "remove", "extra")
    names = [d["name"] for d in stack.cli_json("disk", "list")["disks"]]
    assert names == ["disk0"]
    hw = json.loads(cli("hw", "--json").stdout)
    assert any(b["kind"] for b in hw["block"]) and any(n["name"] == "lo" for n in hw["net"])


SIXTEEN = """
    import json, sys
    from iopart import client
    d = client.open_disk()
    v = d.new_versions()
    seed = int(sys.argv[1])
    n = d.size // 4096
    a = d.run_job(n_ops=n, queue_depth=8, write_pct=100, verify=True, sequential=True,
                  versions=v, seed=seed, latencies=False)
    b = d.run_job(n_ops=2 * n, queue_depth=8, write_pct=50, verify=True, versions=v,
                  seed=seed, latencies=False)
    c = d.run_job(n_ops=n, queue_depth=8, write_pct=0, verify=True, sequential=True,
                  versions=v, seed=seed, latencies=False)
    print(json.dumps({"errors": a.errors + b.errors + c.errors,
                      "failures": a.verify_failures + b.verify_failures + c.verify_failures,
                      "verified": c.verified_bytes, "size": d.size}))
"""


def test_sixteen_guests_share_one_disk_with_every_byte_verified(stack: Stack,
                                                                tmp_path: Path) -> None:
    prog = script(tmp_path, "sixteen", SIXTEEN)
    procs = {}
    t0 = time.monotonic()
    for i in range(16):
        argv = [*cli_argv(), "guest", "run", f"g{i:02d}", *stack.sd(), "--memory", "8M",
                "--cpu", "0.1", "--disk-size", "4M", "--", "python3", str(prog), str(i + 1)]
        procs[i] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
    results = {}
    try:
        for i, p in procs.items():
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, f"guest {i}: {out}{err}"
            results[i] = last_json(out)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for i, r in results.items():
        assert r == {"errors": 0, "failures": 0, "verified": 4 << 20, "size": 4 << 20}, (i, r)
    assert len(results) == 16
    print(f"16 guests verified in {time.monotonic() - t0:.1f} s")


def cli_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "iopart.cli"]


def test_the_io_partition_is_restarted_and_serves_again(stack: Stack, tmp_path: Path) -> None:
    pid = stack.pids()["iop-a"]
    os.kill(pid, 9)
    stack.wait_healthy(restarts={"iop-a": 1})
    deadline = time.monotonic() + 20
    while not (stack.dir / "iop-a.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    prog = script(tmp_path, "again", """
        from iopart import client
        d = client.open_disk()
        d.write(0, b"z" * 512)
        assert d.read(0, 512) == b"z" * 512
        print("{}")
    """)
    res = guest(stack, "again", prog)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_running_guest_shows_in_status_and_metrics(stack: Stack, tmp_path: Path) -> None:
    import urllib.request

    gate = tmp_path / "go"
    prog = script(tmp_path, "live", f"""
        import json, os, time
        from iopart import client
        d = client.open_disk()
        for i in range(3):
            d.write(i * 4096, b"m" * 4096)
        d.read(0, 4096)
        print(json.dumps({{"cgroup": open("/proc/self/cgroup").read()}}), flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:
            time.sleep(0.05)
    """)
    argv = [*cli_argv(), "guest", "run", "live", *stack.sd(), "--cpu", "0.5", "--",
            "python3", str(prog)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ep: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rep = stack.active_io()
            eps = [e for e in rep.get("endpoints", []) if e["partition"] == "live"]
            if eps and eps[0]["stats"]["writes"] == 3:
                ep = eps[0]
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        assert ep, "the endpoint never showed its three writes"
        st = ep["stats"]
        assert st["reads"] >= 1 and st["bytes_written"] == 3 * 4096 and st["refused"] == 0
        assert sum(st["hist"]) == st["reads"] + st["writes"] + st["flushes"]
        with urllib.request.urlopen(rep["metrics_url"], timeout=10) as r:
            text = r.read().decode()
        line = next(ln for ln in text.splitlines()
                    if ln.startswith("iopart_disk_ops_total") and 'partition="live"' in ln
                    and 'op="write"' in ln)
        assert line.endswith(" 3.0"), line
        assert 'iopart_disk_latency_seconds_bucket{device="disk0"' in text
        table = cli("status", *stack.sd())
        assert "disk endpoints" in table.stdout and "live" in table.stdout
    finally:
        gate.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    cg = last_json(out)["cgroup"]
    assert any(ln.endswith("/live") for ln in cg.splitlines()), cg


def test_a_loop_device_is_served_like_a_file(stack: Stack, tmp_path: Path) -> None:
    backing = tmp_path / "loop.img"
    backing.write_bytes(bytes(8 << 20))
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        doc = stack.cli_json("disk", "add", "lo0", dev)
        assert doc["disk"]["size"] == 8 << 20 and doc["disk"]["path"] == dev
        prog = script(tmp_path, "loop", """
            from iopart import client
            d = client.open_disk("lo0")
            d.write(4096, b"on a block device".ljust(512, b"!"))
            d.flush()
            assert d.read(4096, 17) == b"on a block device"
            print("{}")
        """)
        res = guest(stack, "lg", prog, "--disk", "lo0", "--whole-disk")
        assert res.returncode == 0, res.stdout + res.stderr
        with open(backing, "rb") as f:
            f.seek(4096)
            assert f.read(17) == b"on a block device"
        stack.cli_json("disk", "remove", "lo0")  # the guest's partition is gone: unassigned
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
