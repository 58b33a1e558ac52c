"""Failover between the two I/O partitions, on a real stack with real guests.

The chaos test: guests run verifying mixed 4k I/O (every write stamped, every read
checked against the last acknowledged version, every block again at the end), and
one NIC guest sends sequence-numbered frames to another, while the active I/O
partition is SIGKILLed at random moments, sometimes hung with SIGSTOP (the standby
fences it after the heartbeat deadline), and sometimes killed together with the
standby in the middle of its takeover. The count is IOPART_CHAOS_FAULTS (default 24
here; `make chaos` runs 200).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from iopart import faults
from tests.stackutil import Stack, cli

pytestmark = pytest.mark.system

FAULTS = int(os.environ.get("IOPART_CHAOS_FAULTS", "24"))


def start_load(s: Stack, name: str, stop: Path, what: str = "disk") -> subprocess.Popen[str]:
    dev = ["--disk-size", "8M"] if what == "disk" else ["--nic", "nic0"]
    argv = [sys.executable, "-m", "iopart.cli", "guest", "run", name, *s.sd(), "--memory",
            "32M", "--cpu", "0.3", *dev, "--", "python3", "-m", "iopart.loadgen", what,
            "--stop", str(stop)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str], timeout: float = 180) -> tuple[str, str]:
    """Wait for a guest (killed if it takes longer); its output."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.communicate()


def result(p: subprocess.Popen[str], out: tuple[str, str]) -> dict[str, Any]:
    lines = [ln for ln in out[0].splitlines() if ln.startswith("{")]
    assert p.returncode == 0 and lines, \
        f"guest failed ({p.returncode}): {out[0][-3000:]}{out[1][-3000:]}"
    doc: dict[str, Any] = json.loads(lines[-1])
    return doc


def fault_plan(n: int, rng: random.Random) -> list[str]:
    """Mostly kills, a fifth hangs, one in ten a kill of both during the takeover."""
    kinds = ["kill"] * n
    for i in range(n):
        r = rng.random()
        kinds[i] = "hang" if r < 0.2 else "double" if r < 0.3 else "kill"
    kinds[:3] = ["kill", "hang", "double"]  # every kind at least once
    rng.shuffle(kinds)
    return kinds


def test_chaos_faults_lose_and_duplicate_no_acknowledged_io(stack: Stack, tmp_path: Path
                                                            ) -> None:
    stop, stop_send, stop_recv = (tmp_path / n for n in ("stop", "stop-send", "stop-recv"))
    rng = random.Random(6)
    loads = [start_load(stack, f"chaos{i}", stop) for i in range(2)]
    recv = start_load(stack, "nicrecv", stop_recv, "nic-recv")
    send = start_load(stack, "nicsend", stop_send, "nic-send")
    try:
        faults.wait_redundant(stack.dir)
        time.sleep(1.0)
        for p in (*loads, send, recv):
            assert p.poll() is None, p.communicate()
        kinds = fault_plan(FAULTS, rng)
        t0 = time.monotonic()
        done = faults.run_faults(stack.dir, kinds, rng, pause_s=(0.02, 0.25))
        took = time.monotonic() - t0
        time.sleep(0.5)
        # while the guests still run: their endpoints, served by the active one
        active, standby = faults.wait_redundant(stack.dir)
        status = stack.status()
    finally:
        stop.touch()
        stop_send.touch()
        outs = [finish(p) for p in (*loads, send)]
        time.sleep(0.5)  # the last frames reach the receiver
        stop_recv.touch()
        outs.append(finish(recv))
    results = [result(p, o) for p, o in zip(loads, outs, strict=False)]
    sent, got = result(send, outs[2]), result(recv, outs[3])
    assert len(done) == FAULTS
    for r in results:
        summary = {k: r[k] for k in ("ops", "errors", "verify_failures", "duplicates")}
        assert r["verify_failures"] == 0, f"acknowledged writes lost or corrupt: {summary}"
        assert r["final"]["verify_failures"] == 0, f"final pass found lost writes: {r['final']}"
        assert r["duplicates"] == 0 and r["final"]["duplicates"] == 0, \
            f"completions delivered twice: {summary}"
        assert r["errors"] == 0 and r["final"]["errors"] == 0, f"I/O errors: {summary}"
        assert r["first_error"] == 0
        assert r["final"]["verified_bytes"] == r["span"], "not every block was read back"
        assert r["ops"] > 10 * FAULTS, f"the load hardly ran: {summary}"
        # a client left asleep (a lost doorbell) would wait out its 60 s timeout
        longest = max(((b - a) / 1e9 for a, b in r["gaps"]), default=0.0)
        assert longest < 10, f"I/O stalled for {longest:.1f} s"
    io = status["io"]
    assert io[active]["role"] == "active" and io[standby]["role"] == "standby"
    assert len(io[active]["endpoints"]) == 4, io[active]["endpoints"]  # every guest has a disk
    assert len(io[active]["nic_ports"]) == 2, io[active]["nic_ports"]
    # NIC: every frame the sender queued arrived, except frames that were already in a
    # receive buffer whose completion died with a switch (a receive drop, counted)
    ports = {p["partition"]: p for p in io[active]["nic_ports"]}
    rx_lost = ports["nicrecv"]["journal"]["requeued_rx"]
    missing = got["n_missing_below"] + max(0, sent["queued"] - 1 - got["max_seq"])
    assert sent["queued"] > 10 * FAULTS and sent["failed"] == 0, sent
    assert sent["duplicates"] == 0 and got["duplicates"] == 0, (sent, got)
    assert got["bad"] == 0, got
    assert missing <= rx_lost, (f"{missing} frames queued for transmit never arrived, "
                                f"only {rx_lost} receive drops counted at takeovers: "
                                f"{got['missing_below'][:20]} {sent} {got}")
    assert io[active]["failovers"] >= FAULTS - kinds.count("double")
    restarts = sum(c["restarts"] for n, c in status["boot"]["children"].items()
                   if n in ("iop-a", "iop-b"))
    assert restarts >= FAULTS + kinds.count("double")
    print(f"{FAULTS} faults ({kinds.count('kill')} kills, {kinds.count('hang')} hangs, "
          f"{kinds.count('double')} double) in {took:.1f} s; "
          f"{sum(r['ops'] for r in results)} verified requests, 0 lost, 0 duplicated; "
          f"{sent['queued']} frames queued, {got['received']} received ({got['twice']} twice), "
          f"{missing} missing <= {rx_lost} receive drops at takeovers")


def test_fail_cli_kills_the_active_and_the_standby_takes_over(stack: Stack) -> None:
    active, standby = faults.wait_redundant(stack.dir)
    bad = cli("fail", "iop-x", *stack.sd())
    assert bad.returncode != 0 and "iop-a" in bad.stderr
    res = cli("fail", active, *stack.sd(), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["partition"] == active and doc["signal"] == "SIGKILL"
    assert doc["standby"] == standby
    deadline = time.monotonic() + 20
    while faults.current_roles(stack.dir) != (standby, active):
        assert time.monotonic() < deadline, faults.current_roles(stack.dir)
        time.sleep(0.05)
    res = cli("fail", standby, *stack.sd(), "--hang", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["signal"] == "SIGSTOP"
    while faults.current_roles(stack.dir) != (active, standby):
        assert time.monotonic() < deadline, faults.current_roles(stack.dir)
        time.sleep(0.05)
    log = (stack.dir / "logs" / f"{active}.log").read_text()
    assert "missed its heartbeat" in log and "fencing it" in log
    # a hung standby is no standby: the active fences it and boot restarts it
    pid = stack.pids()[standby]
    res = cli("fail", standby, *stack.sd(), "--hang", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["role"] == "standby" and doc["standby"] is None, doc
    deadline = time.monotonic() + 20
    while not (faults.current_roles(stack.dir) == (active, standby)
               and stack.pids()[standby] != pid):
        assert time.monotonic() < deadline, faults.current_roles(stack.dir)
        time.sleep(0.05)
    log = (stack.dir / "logs" / f"{active}.log").read_text()
    assert log.count("fencing it") >= 2


HOSTILE = """
import json, sys, time
from pathlib import Path
from iopart import client
d = client.open_disk()
d.write(0, b"h" * 4096)
# scribble over our own channel: header signature and ring indices
raw = d.end._buf
raw[0:8] = b"garbage!"
raw[512:516] = (0x7FFFFFF0).to_bytes(4, "little")
print(json.dumps({"scribbled": True}), flush=True)
stop = Path(sys.argv[1])
while not stop.exists():
    time.sleep(0.05)
"""


def test_a_guest_that_scribbled_its_channel_is_not_taken_over_and_harms_nobody(
        stack: Stack, tmp_path: Path) -> None:
    """Its record cannot be served after a failover (the header and indices are checked);
    the others' I/O goes on, and the new active I/O partition keeps running."""
    stop = tmp_path / "stop"
    prog = tmp_path / "hostile.py"
    prog.write_text(HOSTILE)
    hostile = subprocess.Popen(
        [sys.executable, "-m", "iopart.cli", "guest", "run", "hostile", *stack.sd(),
         "--disk-size", "4M", "--", "python3", str(prog), str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    good = start_load(stack, "good", stop)
    try:
        _active, standby = faults.wait_redundant(stack.dir)
        deadline = time.monotonic() + 30
        while "scribbled" not in (hostile.stdout.readline() if hostile.stdout else ""):
            assert time.monotonic() < deadline and hostile.poll() is None
        time.sleep(0.5)
        faults.run_faults(stack.dir, ["kill", "kill"], random.Random(3))
        new_active, _ = faults.wait_redundant(stack.dir)
        time.sleep(0.5)
        io = stack.status()["io"][new_active]
    finally:
        stop.touch()
        out_good = finish(good)
        finish(hostile)
    r = result(good, out_good)
    assert r["verify_failures"] == 0 and r["errors"] == 0 and r["duplicates"] == 0, r
    assert r["final"]["verified_bytes"] == r["span"]
    served = {e["partition"] for e in io["endpoints"]}
    assert "good" in served and "hostile" not in served, served
    log = (stack.dir / "logs" / f"{standby}.log").read_text()
    assert "cannot take over record" in log and "hostile" in log
    # its record is reused only after its monitor (which mapped the pages) is gone
    deadline = time.monotonic() + 10
    while not any("of hostile freed: its monitor is gone" in p.read_text()
                  for p in (stack.dir / "logs").glob("iop-*.log")):
        assert time.monotonic() < deadline, "the unusable record was never freed"
        time.sleep(0.1)


def test_the_fd_store_answers_only_io_partitions(stack: Stack) -> None:
    from iopart.errors import ChannelError
    from iopart.uvlink import fdstore

    for op in ("get", "drop"):
        with pytest.raises(ChannelError, match="only a connected I/O partition"):
            fdstore(stack.dir, op, "ep0")
    r, w = os.pipe()
    try:
        with pytest.raises(ChannelError, match="only a connected I/O partition"):
            fdstore(stack.dir, "put", "ep0", [r])
    finally:
        os.close(r)
        os.close(w)


def test_a_trimmed_pool_view_keeps_its_data(tmp_path: Path) -> None:
    """The I/O partition's periodic trim: page-table entries dropped, pool data kept."""
    import mmap
    import select
    import signal as sig

    from iopart.pool import HostMemoryPool, resident_shmem, trim_view

    with HostMemoryPool(256 << 20) as pool:
        child = os.fork()
        if child == 0:  # the pool's view in another process, like an I/O partition's
            code = 0
            try:
                mm = mmap.mmap(pool.fd, pool.size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
                for off in range(0, 192 << 20, 4096):
                    mm[off] = 7
                held = trim_view(mm, 64 << 20)
                assert held >= 192 << 20 and resident_shmem() < 16 << 20
                assert trim_view(mm, 64 << 20) == 0  # nothing left to trim
                assert mm[4096 * 1000] == 7  # the data is in the pool, faulted back in
                time.sleep(60)
            except BaseException:  # a child reports by exit code only
                code = 1
            os._exit(code)
        pfd = os.pidfd_open(child)
        try:
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(child, os.WNOHANG)
                assert done == 0, f"the child failed: {status}"
                with open(f"/proc/{child}/status") as f:
                    text = f.read()
                shmem = int(text.split("RssShmem:")[1].split()[0]) << 10
                if shmem < 16 << 20 and "State:\tS" in text:
                    break
                assert time.monotonic() < deadline, "the child did not trim"
                time.sleep(0.05)
            t0 = time.monotonic()
            os.kill(child, sig.SIGKILL)
            assert select.select([pfd], [], [], 5)[0]
            exit_ms = (time.monotonic() - t0) * 1000
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig.SIGKILL)
            os.close(pfd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
        assert pool.mm[4096 * 1000] == 7
    print(f"exit after trim: {exit_ms:.1f} ms")  # a figure, not a check: bench/ measures
