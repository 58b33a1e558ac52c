"""Disk benchmark: 4 KiB random I/O through an I/O partition's block path and its peers.

One disk image (random data, fsync'ed, on the real disk: /var/tmp unless that is tmpfs),
measured in one run, cache hot (buffered, the whole image read first) and O_DIRECT, at QD1
and QD32, random read and random write, along these paths:

* direct psync (fio ``psync``) and direct io_uring (fio ``io_uring``): the kernel, no hop;
* iopart spinning: the native block server (io_uring engine, 200 us server spin) on the
  server CPU, the native client loop spinning (1 s budget) in a guest process on the
  client CPU;
* iopart doorbell: the same with spin budget 0 on both ends: every wait sleeps on an
  eventfd doorbell;
* iopart spinning, psync engine (QD1 only): the block server doing preadv/pwritev itself;
* nbdkit's file plugin on a Unix socket, driven by fio's ``nbd`` engine;
* qemu-storage-daemon's NBD export (file -> raw, aio=io_uring), driven by fio's ``nbd``.

Servers (iopart's block server thread, nbdkit, qemu-storage-daemon) run on the server CPU,
clients (the guest process, fio's job thread) on the client CPU. The guest process is
forked once, after the block rigs are built, and owns every benchmark endpoint's client
end: a channel end's private ring indices live in process memory, so one long-lived
owner keeps them right where a fork per measurement would not.

Rounds interleave every path for a short time each (the order rotates every round), so
drift hits every path alike. iopart percentiles are over all client samples of all rounds;
fio reports percentiles from its own histogram, so for fio paths the row is the median
over rounds of fio's per-run ``lat`` percentiles (and IOPS). Hot rows run after a warm
pass over the image; the image is fsync'ed before the O_DIRECT rows so that no dirty page
is written back under them. nbdkit 1.32's file plugin has no ``direct=true``: its
"O_DIRECT" rows use ``cache=none`` (pages dropped after each request) instead.

Last, 16 guest processes run at once against 16 endpoints (8 MiB each, alternately
buffered and O_DIRECT): a sequential verified fill, a random 50 % write verified job,
then a sequential verified read of the whole extent.

    iopart bench disk [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from bench import report
from bench.blockrig import BlockRig, block_rig
from bench.peers import fio as fiomod
from bench.peers.fio import FioResult, fio_command, fio_version
from bench.peers.nbd import NbdkitFile, QemuStorageDaemon
from bench.stats import fmt, ratio
from iopart.client import DiskEndpoint
from iopart.drivers.blockserver import Engine, Extent

TARGETS: dict[str, tuple[str, float]] = {
    "hot_qd1_over_direct_us": ("<=", 1.5),
    "nbdkit_over_iopart_p50": (">=", 20.0),
    "odirect_qd1_vs_direct": ("<=", 1.05),
    "qd32_iops_vs_iouring": (">=", 0.9),
    "guests16_verified": ("==", 1),
}

BS = 4096
CLIENT_SPIN_NS = 1_000_000_000  # spinning client: 1 s budget, i.e. it never sleeps
SERVER_SPIN_NS = 200_000  # spinning block server: 200 us after its last progress
GUEST_AREA = 1 << 20  # guest memory of each concurrent guest process
N_GUESTS = 16
CONTENDED = 0.05  # run-queue wait share above which a run is flagged as contended
EDGES_US = np.geomspace(0.25, 100_000.0, 161)  # histogram bins: 0.25 us .. 100 ms

PATHS = {
    "psync": "direct psync (fio)",
    "uring": "direct io_uring (fio)",
    "spin": "iopart spinning",
    "door": "iopart doorbell",
    "spin_psync": "iopart spinning, psync engine",
    "nbdkit": "nbdkit file, fio nbd",
    "qsd": "qemu-storage-daemon, fio nbd",
}
FIO_PATHS = ("psync", "uring", "nbdkit", "qsd")
# iopart path -> (rig, client spin budget)
IOPART_PATHS = {"spin": ("spin", CLIENT_SPIN_NS), "door": ("door", 0),
                "spin_psync": ("psync", CLIENT_SPIN_NS)}
# rig -> (server engine, server spin budget)
RIGS = {"spin": (Engine.IO_URING, SERVER_SPIN_NS), "door": (Engine.IO_URING, 0),
        "psync": (Engine.PSYNC, SERVER_SPIN_NS)}
QD1_PATHS = ("psync", "uring", "spin", "door", "spin_psync", "nbdkit", "qsd")
QD32_PATHS = ("uring", "spin", "door", "nbdkit", "qsd")


@dataclass(frozen=True)
class Workload:
    rw: str  # randread | randwrite
    cache: str  # hot | odirect
    qd: int

    @property
    def label(self) -> str:
        return f"{self.rw} 4k, {'hot' if self.cache == 'hot' else 'O_DIRECT'}, QD{self.qd}"

    def runtime(self, plan_s: float) -> float:
        """O_DIRECT at QD32 is bounded by the host's disk emulation, whose throughput
        drifts by 10-20 % over seconds here: those rows get 4x the time, so the IOPS
        ratio is not decided by one noisy quarter second."""
        return plan_s * 4 if self.cache == "odirect" and self.qd > 1 else plan_s


@dataclass(frozen=True)
class Plan:
    rounds: int
    runtime_s: float
    disk_size: int
    guest_extent: int
    guest_ops: int
    groups: tuple[tuple[Workload, tuple[str, ...]], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "runtime_s": self.runtime_s,
            "disk_size": self.disk_size,
            "guest_extent": self.guest_extent,
            "guest_ops": self.guest_ops,
            "workloads": [{"workload": w.label, "paths": list(p)} for w, p in self.groups],
        }


HIST = (Workload("randread", "hot", 1), Workload("randread", "odirect", 1))


def _plan(quick: bool, tiny: bool) -> Plan:
    if tiny:
        groups = (
            (Workload("randread", "hot", 1), ("psync", "spin", "door", "nbdkit", "qsd")),
            (Workload("randread", "odirect", 1), ("psync", "spin")),
            (Workload("randread", "odirect", 32), ("uring", "spin")),
        )
        return Plan(1, 0.2, 64 << 20, 1 << 20, 1024, groups)
    full = tuple(
        (Workload(rw, cache, qd), QD1_PATHS if qd == 1 else QD32_PATHS)
        for cache in ("hot", "odirect")
        for rw in ("randread", "randwrite")
        for qd in (1, 32)
    )
    if quick:
        return Plan(3, 0.25, 256 << 20, 8 << 20, 4096, full)
    return Plan(5, 1.0, 256 << 20, 8 << 20, 16384, full)


def _cpus() -> tuple[int, int]:
    """(client CPU, server CPU): CPU 1 and CPU 0 when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[1], cpus[0]) if len(cpus) >= 2 else (-1, -1)


# -- framing between the benchmark and its guest processes ------------------------------------
def _send(sock: socket.socket, head: dict[str, Any], payload: bytes = b"") -> None:
    hb = json.dumps(head).encode()
    sock.sendall(len(hb).to_bytes(4, "little") + len(payload).to_bytes(8, "little") + hb + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("guest process closed its socket")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    pre = _recv_exact(sock, 12)
    hlen, plen = int.from_bytes(pre[:4], "little"), int.from_bytes(pre[4:], "little")
    head: dict[str, Any] = json.loads(_recv_exact(sock, hlen))
    return head, _recv_exact(sock, plen)


def _child(fn: Callable[[], None]) -> NoReturn:
    """Run fn in a forked child and leave with os._exit: never back into the parent's code."""
    code = 0
    try:
        fn()
    except BaseException:
        code = 1
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(code)


def _pin(cpu: int) -> None:
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})


def _runq_wait_ms(pid: int) -> float:
    """Time the threads of pid spent runnable but not running (schedstat), in ms.

    Spinning ends hold their CPUs: when other work on the VM wants those CPUs, the spinning
    server or client waits on the run queue and I/Os stall for whole time slices. This
    shows how much of that happened during a measurement.
    """
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            task = Path(f"/proc/{pid}/task/{tid}")
            with contextlib.suppress(OSError, IndexError, ValueError):
                # io_uring's own workers (iou-wrk-*, iou-sqp-*) are not the spinning ends
                if not (task / "comm").read_text().startswith("iou-"):
                    total += int((task / "schedstat").read_text().split()[1])
    return total / 1e6


def _reap(pid: int, timeout_s: float) -> int:
    """Wait for a child we forked; SIGKILL it after timeout_s. Returns its wait status."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.01)


# -- the guest side ---------------------------------------------------------------------------
def _job_loop(ep: DiskEndpoint, cmd: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Run 4 KiB random jobs on ep for about cmd['budget_s']; latencies as uint64 bytes."""
    qd, spin = int(cmd["qd"]), int(cmd["spin_ns"])
    wpct = 100 if cmd["rw"] == "randwrite" else 0
    seed = int(cmd["seed"])
    mem = ep.memory

    def job(n: int, s: int, lat: bool) -> Any:
        mem.reset()  # every job takes its buffer from the start of this guest's memory
        return ep.run_job(n_ops=n, block_size=BS, queue_depth=qd, write_pct=wpct, seed=s,
                          latencies=lat, spin_ns=spin)

    job(max(64, 4 * qd), seed, False)  # warm-up: buffer faulted in, server awake
    lats: list[np.ndarray[Any, Any]] = []
    ops = elapsed = errors = first_error = 0
    deadline = time.monotonic() + float(cmd["budget_s"])
    n, i = 64, 0
    while True:
        i += 1
        r = job(n, seed * 7919 + i, True)
        lats.append(np.asarray(r.latencies_ns, dtype=np.uint64))
        ops += r.ops
        elapsed += r.elapsed_ns
        errors += r.errors
        first_error = first_error or r.first_error
        left = deadline - time.monotonic()
        if left <= 0:
            break
        per_op = r.elapsed_ns / max(r.ops, 1)
        n = int(min(1 << 16, max(2 * qd, 16, left * 1e9 / per_op)))
    lat = np.concatenate(lats)
    head = {"ops": ops, "elapsed_ns": elapsed, "errors": errors, "first_error": first_error,
            "jobs": i}
    return head, lat.tobytes()


def _serve(sock: socket.socket, endpoints: dict[str, DiskEndpoint], cpu: int) -> None:
    _pin(cpu)
    while True:
        try:
            cmd, _ = _recv(sock)
        except EOFError:
            return
        if cmd.get("op") == "exit":
            return
        try:
            head, payload = _job_loop(endpoints[cmd["ep"]], cmd)
        except Exception as e:
            head, payload = {"error": f"{type(e).__name__}: {e}"}, b""
        _send(sock, head, payload)


class _Guest:
    """The guest process: owns the benchmark endpoints' client ends, runs jobs on request."""

    def __init__(self, endpoints: dict[str, DiskEndpoint], cpu: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _child(lambda: _serve(theirs, endpoints, cpu))
        theirs.close()
        self.sock, self.pid = ours, pid

    def run(self, ep: str, wl: Workload, *, budget_s: float, seed: int,
            spin_ns: int) -> tuple[dict[str, Any], np.ndarray[Any, Any]]:
        w0 = _runq_wait_ms(os.getpid()) + _runq_wait_ms(self.pid)
        _send(self.sock, {"op": "job", "ep": ep, "rw": wl.rw, "qd": wl.qd,
                          "budget_s": budget_s, "seed": seed, "spin_ns": spin_ns})
        self.sock.settimeout(budget_s + 120)
        head, payload = _recv(self.sock)
        head["runq_wait_ms"] = round(_runq_wait_ms(os.getpid()) + _runq_wait_ms(self.pid) - w0, 2)
        if "error" in head:
            raise RuntimeError(f"guest job on {ep} ({wl.label}) failed: {head['error']}")
        return head, np.frombuffer(payload, dtype=np.uint64)

    def close(self) -> None:
        if self.pid:
            with contextlib.suppress(OSError):
                _send(self.sock, {"op": "exit"})
            _reap(self.pid, 10)
            self.pid = 0
        self.sock.close()


def _verify_guest(ep: DiskEndpoint, idx: int, guest_ops: int) -> dict[str, Any]:
    """One of the 16 guests: verified fill, random 50 % write job, sequential verified read."""
    mem = ep.memory
    mem.reset()
    mem.alloc((idx + 1) * GUEST_AREA)  # this guest's buffers start at its own area
    versions = ep.new_versions(BS)
    nblocks = ep.size // BS
    kw: dict[str, Any] = {"block_size": BS, "queue_depth": 8, "verify": True,
                          "versions": versions, "seed": idx + 1, "latencies": False,
                          "spin_ns": 0}
    jobs = [
        ep.run_job(n_ops=nblocks, write_pct=100, sequential=True, **kw),
        ep.run_job(n_ops=guest_ops, write_pct=50, **kw),
        ep.run_job(n_ops=nblocks, write_pct=0, sequential=True, **kw),
    ]
    return {
        "ops": sum(j.ops for j in jobs),
        "errors": sum(j.errors for j in jobs),
        "verify_failures": sum(j.verify_failures for j in jobs),
        "first_error": next((j.first_error for j in jobs if j.first_error), 0),
        "random_verified_bytes": jobs[1].verified_bytes,
        "verified_bytes": jobs[2].verified_bytes,
    }


def _guests16(rig: BlockRig, plan: Plan, cpu: int) -> dict[str, Any]:
    eps = [rig.endpoint(Extent(i * plan.guest_extent, plan.guest_extent), direct=bool(i % 2))[1]
           for i in range(N_GUESTS)]
    kids: list[tuple[int, socket.socket]] = []
    t0 = time.monotonic()
    try:
        for i, ep in enumerate(eps):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:
                ours.close()

                def guest(i: int = i, ep: DiskEndpoint = ep, s: socket.socket = theirs) -> None:
                    _pin(cpu)
                    try:
                        head = _verify_guest(ep, i, plan.guest_ops)
                    except Exception as e:
                        head = {"error": f"{type(e).__name__}: {e}"}
                    _send(s, head)

                _child(guest)
            theirs.close()
            kids.append((pid, ours))
        guests = []
        for _pid, s in kids:
            s.settimeout(300)
            try:
                head, _ = _recv(s)
            except (OSError, EOFError) as e:
                head = {"error": f"no result: {e}"}
            guests.append(head)
    finally:
        for pid, s in kids:
            s.close()
            _reap(pid, 10)
    ok = all(
        "error" not in g and g["errors"] == 0 and g["verify_failures"] == 0
        and g["verified_bytes"] == plan.guest_extent
        for g in guests
    )
    return {"verified": int(ok), "extent_bytes": plan.guest_extent,
            "seconds": round(time.monotonic() - t0, 2), "guests": guests}


# -- the peers --------------------------------------------------------------------------------
def _fio(key: str, wl: Workload, *, img: Path, uri: str | None, cpu: int, runtime_s: float,
         hist: bool) -> tuple[FioResult, np.ndarray[Any, Any] | None]:
    """One fio run; with hist, also its lat histogram rebinned onto EDGES_US.

    Uses fio.py's command line and JSON reading; json+ (fio's full histogram) is asked for
    when the histogram is wanted, which run_fio does not return.
    """
    kw: dict[str, Any] = {"rw": wl.rw, "bs": BS, "iodepth": wl.qd, "runtime_s": runtime_s,
                          "cpu": cpu if cpu >= 0 else None,
                          # the warm pass and the fsync are the benchmark's; keep the cache
                          "extra_args": ["--invalidate=0"]}
    if key in ("psync", "uring"):
        kw |= {"ioengine": "psync" if key == "psync" else "io_uring", "filename": str(img),
               "direct": wl.cache == "odirect"}
    else:
        kw |= {"ioengine": "nbd", "uri": uri, "direct": False}
    name = f"{key}-{wl.rw}-{wl.cache}-qd{wl.qd}"
    cmd = fio_command(name, **kw)
    if hist:
        cmd.append("--output-format=json+")  # the last --output-format wins
    doc = fiomod._run_json(cmd, runtime_s + 120)
    direction = "read" if wl.rw == "randread" else "write"
    res = fiomod._parse(name, doc, direction, " ".join(cmd))
    counts = None
    bins = doc["jobs"][0][direction].get("lat_ns", {}).get("bins")
    if hist and bins:
        v = np.array([float(k) for k in bins]) / 1000.0
        w = np.array([float(c) for c in bins.values()])
        counts = np.histogram(v, EDGES_US, weights=w)[0]
    return res, counts


@contextlib.contextmanager
def _nbd_servers(img: Path, cache: str, cpu: int, needed: set[str]) -> Iterator[dict[str, Any]]:
    """nbdkit and qemu-storage-daemon for one cache mode (qsd locks the image: one at a time)."""
    c = cpu if cpu >= 0 else None
    odirect = cache == "odirect"
    with contextlib.ExitStack() as stack:
        srv: dict[str, Any] = {}
        if "nbdkit" in needed:
            srv["nbdkit"] = stack.enter_context(
                NbdkitFile(img, direct=odirect, fadvise="random", cpu=c))
        if "qsd" in needed:
            srv["qsd"] = stack.enter_context(
                QemuStorageDaemon(img, direct=odirect, aio="io_uring", cpu=c))
        yield srv


# -- the image --------------------------------------------------------------------------------
def _fs_type(path: Path) -> str:
    best, fstype = "", "?"
    p = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    return fstype


def _work_dir() -> Path:
    """A directory on the real disk: /var/tmp, or bench/results/.work if that is tmpfs."""
    for base in (Path("/var/tmp"), report.RESULTS / ".work"):
        base.mkdir(parents=True, exist_ok=True)
        if _fs_type(base) not in ("tmpfs", "ramfs"):
            return Path(tempfile.mkdtemp(prefix="iopart-bench-disk-", dir=base))
    raise RuntimeError("no directory on a real disk for the benchmark image")


def _make_image(path: Path, size: int) -> None:
    rng = np.random.default_rng()
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(rng.bytes(1 << 20))
        f.flush()
        os.fsync(f.fileno())


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- results ----------------------------------------------------------------------------------
@dataclass
class _Acc:
    lat: list[np.ndarray[Any, Any]] = field(default_factory=list)
    iops: list[float] = field(default_factory=list)  # one per round
    runq_wait_ms: list[float] = field(default_factory=list)  # one per round
    ops: int = 0
    elapsed_ns: int = 0
    errors: int = 0
    fio: list[FioResult] = field(default_factory=list)
    hist: np.ndarray[Any, Any] | None = None

    def add_hist(self, counts: np.ndarray[Any, Any]) -> None:
        self.hist = counts if self.hist is None else self.hist + counts


def _describe(key: str, wl: Workload, nbdkit_mode: dict[str, str]) -> str:
    if key in IOPART_PATHS:
        rig, cspin = IOPART_PATHS[key]
        engine, sspin = RIGS[rig]
        return (f"server {engine.name.lower()} engine, spin {sspin // 1000} us; "
                f"client spin {cspin // 1000} us")
    if key == "nbdkit":
        return f"nbdkit file {nbdkit_mode.get(wl.cache, '')}, fio nbd engine"
    if key == "qsd":
        return (f"qsd file cache.direct={'on' if wl.cache == 'odirect' else 'off'} "
                "aio=io_uring, fio nbd engine")
    return f"fio {'psync' if key == 'psync' else 'io_uring'} on the image file"


def _row(key: str, wl: Workload, acc: _Acc, nbdkit_mode: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {"path": PATHS[key], "key": key, "workload": wl.label, "rw": wl.rw,
                           "cache": wl.cache, "qd": wl.qd}
    if key in FIO_PATHS:
        rs = acc.fio
        row |= {
            "p50_us": round(float(np.median([r.p50_us for r in rs])), 3),
            "p99_us": round(float(np.median([r.p99_us for r in rs])), 3),
            "p999_us": round(float(np.median([r.p999_us for r in rs])), 3),
            "ops_per_s": round(float(np.median([r.iops for r in rs])), 1),
            "samples": int(sum(r.ios for r in rs)),
            "errors": 0,
            "source": "fio lat percentiles, median of rounds",
            "rounds_p50_us": [round(r.p50_us, 3) for r in rs],
            "rounds_ops_per_s": [round(r.iops, 1) for r in rs],
        }
    else:
        a = np.concatenate(acc.lat).astype(np.float64)
        p50, p99, p999 = np.percentile(a, [50, 99, 99.9]) / 1000.0
        row |= {
            "p50_us": round(float(p50), 3),
            "p99_us": round(float(p99), 3),
            "p999_us": round(float(p999), 3),
            # the same estimator as fio's rows: the median round (one stalled round of a
            # noisy VM would otherwise weigh on iopart alone)
            "ops_per_s": round(float(np.median(acc.iops)), 1),
            "ops_per_s_merged": round(acc.ops / (acc.elapsed_ns / 1e9), 1),
            "samples": int(a.size),
            "errors": acc.errors,
            "source": "client samples, rounds merged",
            "rounds_p50_us": [round(float(np.median(x)) / 1000.0, 3) for x in acc.lat],
            "rounds_ops_per_s": [round(x, 1) for x in acc.iops],
            # server threads + guest process waiting for a CPU during each round's job
            "rounds_runq_wait_ms": acc.runq_wait_ms,
        }
    row["setup"] = _describe(key, wl, nbdkit_mode)
    return row


def _with_baselines(rows: list[dict[str, Any]]) -> None:
    """ratio to direct: psync at QD1, io_uring at QD32, same workload."""
    by = {(r["workload"], r["key"]): r for r in rows}
    for r in rows:
        base = by.get((r["workload"], "psync" if r["qd"] == 1 else "uring")) or by.get(
            (r["workload"], "uring"))
        r["baseline"] = base["key"] if base else None
        r["p50_vs_direct"] = ratio(r["p50_us"], base["p50_us"]) if base else None
        r["iops_vs_direct"] = ratio(r["ops_per_s"], base["ops_per_s"]) if base else None


def _ratios(rows: list[dict[str, Any]], guests: dict[str, Any]) -> dict[str, Any]:
    by = {(r["rw"], r["cache"], r["qd"], r["key"]): r for r in rows}

    def get(cache: str, qd: int, key: str, field: str) -> float | None:
        r = by.get(("randread", cache, qd, key))
        return None if r is None else float(r[field])

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else ratio(a, b)

    spin_hot = get("hot", 1, "spin", "p50_us")
    psync_hot = get("hot", 1, "psync", "p50_us")
    return {
        "hot_qd1_over_direct_us": None if spin_hot is None or psync_hot is None
        else round(spin_hot - psync_hot, 3),
        "nbdkit_over_iopart_p50": div(get("hot", 1, "nbdkit", "p50_us"), spin_hot),
        "odirect_qd1_vs_direct": div(get("odirect", 1, "spin", "p50_us"),
                                     get("odirect", 1, "psync", "p50_us")),
        "qd32_iops_vs_iouring": div(get("odirect", 32, "spin", "ops_per_s"),
                                    get("odirect", 32, "uring", "ops_per_s")),
        "guests16_verified": guests["verified"],
        "qsd_over_iopart_p50": div(get("hot", 1, "qsd", "p50_us"), spin_hot),
        "doorbell_hot_qd1_vs_direct": div(get("hot", 1, "door", "p50_us"), psync_hot),
    }


def _met(v: Any, op: str, target: float) -> bool:
    if v is None:
        return False
    return bool(v <= target if op == "<=" else v >= target if op == ">=" else v == target)


# -- progress and output ----------------------------------------------------------------------
class _Bar:
    def __init__(self, enabled: bool, total: int) -> None:
        self.bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<52}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=True,
                                refresh_per_second=4)
            self.task = self.bar.add_task("setting up", total=total)

    def __enter__(self) -> _Bar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def label(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)


def render(doc: dict[str, Any]) -> None:
    """The human output: one table of rows, one of ratios."""
    from rich.console import Console
    from rich.table import Table

    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    title = "iopart bench disk" + (" (tiny)" if doc.get("tiny") else
                                   " (quick)" if doc.get("quick") else "")
    t = Table(title=title)
    for col in ("path", "workload", "p50 µs", "p99 µs", "p99.9 µs", "IOPS", "p50 ÷ direct",
                "IOPS ÷ direct", "n"):
        t.add_column(col, justify="left" if col in ("path", "workload") else "right")
    last = None
    for r in doc["rows"]:
        if last is not None and r["workload"] != last:
            t.add_section()
        last = r["workload"]
        t.add_row(r["path"], r["workload"], fmt(r["p50_us"]), fmt(r["p99_us"]),
                  fmt(r["p999_us"]), fmt(r["ops_per_s"]), fmt(r["p50_vs_direct"]),
                  fmt(r["iops_vs_direct"]), fmt(r["samples"]))
    out.print(t)
    rt = Table(title="ratios")
    for col in ("ratio", "value", "target", "met"):
        rt.add_column(col)
    for k, v in doc["ratios"].items():
        met = doc["met"].get(k)
        rt.add_row(k, fmt(v), doc["targets"].get(k, ""),
                   "" if met is None else ("[green]yes[/]" if met else "[red]no[/]"))
    out.print(rt)
    share = doc.get("contention", {}).get("share") or 0.0
    if share > CONTENDED:
        out.print(f"[yellow]warning:[/] iopart's spinning ends waited for a CPU "
                  f"{100 * share:.0f} % of their job time: other work on this machine; "
                  "tails and IOPS are not representative")
    out.print(f"{doc['seconds']} s; results in {doc.get('saved', '(not saved)')}")


def _save(doc: dict[str, Any], results: Path) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / "disk.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    same = results.resolve() == report.RESULTS.resolve()
    report.write_report(results, report.REPORT if same else results / "BENCHMARKS.md")
    return path


NOTES = (
    "4 KiB random I/O on one image; rounds interleave every path. iopart: percentiles "
    "of all client samples of all rounds, IOPS = ops / job time of the median round. "
    "fio paths (direct "
    "psync/io_uring, nbdkit, qemu-storage-daemon): median over rounds of fio's own "
    "lat percentiles and IOPS. Ratio to direct: fio psync at QD1, fio io_uring at "
    "QD32. nbdkit 1.32 has no O_DIRECT: its O_DIRECT rows use cache=none. "
    "guests16_verified: 16 guest processes at once, each on its own extent: "
    "sequential verified fill, random 50 % write verified job, sequential verified "
    "read of the whole extent. The io_uring engine serves page-cache hits inline "
    "(RWF_NOWAIT) and does buffered writes inline; only misses and O_DIRECT go "
    "through the ring. O_DIRECT QD32 rows run 4x the round time"
)


# -- the benchmark ----------------------------------------------------------------------------
def run(quick: bool, *, out_json: bool, progress: bool = True, tiny: bool = False,
        save: bool = True, results: Path | None = None) -> dict[str, Any]:
    """Run the disk benchmark; save disk.json (+ BENCHMARKS.md, PNG), print, return the doc.

    tiny: a few seconds' version for the tests (a handful of paths, one round).
    """
    plan = _plan(quick, tiny)
    cpu_c, cpu_s = _cpus()
    load_before = [round(x, 2) for x in os.getloadavg()]
    t_start = time.monotonic()
    needed = {k for _, ps in plan.groups for k in ps}
    caches = {w.cache for w, _ in plan.groups}
    rig_names = sorted({IOPART_PATHS[k][0] for k in needed if k in IOPART_PATHS} | {"spin"})
    n_steps = plan.rounds * sum(len(ps) for _, ps in plan.groups) + 2
    accs: dict[tuple[Workload, str], _Acc] = {
        (w, k): _Acc() for w, ps in plan.groups for k in ps}
    nbdkit_mode: dict[str, str] = {}
    work = _work_dir()
    img = work / "disk.img"
    rigs: dict[str, BlockRig] = {}
    guest: _Guest | None = None
    server_stats: dict[str, Any] = {}
    try:
        with _Bar(progress, n_steps) as bar:
            bar.label(f"writing a {plan.disk_size >> 20} MiB image")
            _make_image(img, plan.disk_size)
            for name in rig_names:
                engine, sspin = RIGS[name]
                rigs[name] = block_rig(work, engine=engine, disk_size=plan.disk_size,
                                       guest_mem=32 << 20 if name == "spin" else 8 << 20,
                                       spin_ns=sspin, cpu=cpu_s, image=img)
            endpoints = {f"{name}/{cache}": rig.endpoint(Extent(0, plan.disk_size),
                                                         direct=cache == "odirect")[1]
                         for name, rig in rigs.items() for cache in caches}
            guest = _Guest(endpoints, cpu_c)
            bar.advance()
            seed = 0
            for rnd in range(plan.rounds):
                for cache in ("hot", "odirect"):
                    groups = [(w, ps) for w, ps in plan.groups if w.cache == cache]
                    if not groups:
                        continue
                    if cache == "hot":
                        bar.label(f"round {rnd + 1}: warming the page cache")
                        _warm(img)
                    want = {k for _, ps in groups for k in ps}
                    with _nbd_servers(img, cache, cpu_s, want) as srv:
                        if "nbdkit" in srv:
                            nbdkit_mode[cache] = srv["nbdkit"].mode
                        for wl, paths in groups:
                            k0 = rnd % len(paths)
                            for key in paths[k0:] + paths[:k0]:
                                bar.label(f"round {rnd + 1}/{plan.rounds}: {PATHS[key]}, "
                                          f"{wl.label}")
                                acc = accs[(wl, key)]
                                seed += 1
                                if key in IOPART_PATHS:
                                    rig_name, cspin = IOPART_PATHS[key]
                                    head, lat = guest.run(f"{rig_name}/{cache}", wl,
                                                          budget_s=wl.runtime(plan.runtime_s),
                                                          seed=seed,
                                                          spin_ns=cspin)
                                    acc.lat.append(lat)
                                    acc.ops += head["ops"]
                                    acc.iops.append(head["ops"] / (head["elapsed_ns"] / 1e9))
                                    acc.runq_wait_ms.append(head["runq_wait_ms"])
                                    acc.elapsed_ns += head["elapsed_ns"]
                                    acc.errors += head["errors"]
                                    if wl in HIST:
                                        acc.add_hist(np.histogram(lat / 1000.0, EDGES_US)[0])
                                else:
                                    uri = srv[key].uri if key in srv else None
                                    res, counts = _fio(key, wl, img=img, uri=uri, cpu=cpu_c,
                                                       runtime_s=wl.runtime(plan.runtime_s),
                                                       hist=wl in HIST)
                                    acc.fio.append(res)
                                    if counts is not None:
                                        acc.add_hist(counts)
                                bar.advance()
                    bar.label(f"round {rnd + 1}: fsync")
                    _fsync(img)
            server_stats = {n: r.server.server_stats() for n, r in rigs.items()}
            bar.label(f"{N_GUESTS} guests, verified")
            guests = _guests16(rigs["spin"], plan, cpu_c)
            bar.advance()
    finally:
        if guest is not None:
            guest.close()
        for rig in rigs.values():
            rig.close()
        for p in sorted(work.iterdir()) if work.exists() else []:
            p.unlink()
        with contextlib.suppress(OSError):
            work.rmdir()

    rows = [_row(k, w, accs[(w, k)], nbdkit_mode) for w, ps in plan.groups for k in ps]
    # randread jobs only: O_DIRECT writes at QD32 keep io_uring's kernel workers busy
    # beside the server, so write jobs would count waiting that is not contention
    reads = [a for (w, _), a in accs.items() if w.rw == "randread"]
    waited = sum(sum(a.runq_wait_ms) for a in reads)
    job_ms = sum(a.elapsed_ns for a in reads) / 1e6
    _with_baselines(rows)
    ratios = _ratios(rows, guests)
    hist = {
        "edges_us": [round(float(e), 4) for e in EDGES_US],
        "panels": [
            {"workload": w.label,
             "paths": {PATHS[k]: [int(c) for c in accs[(w, k)].hist]  # type: ignore[union-attr]
                       for k in ps if accs[(w, k)].hist is not None}}
            for w, ps in plan.groups if w in HIST
        ],
    }
    doc: dict[str, Any] = {
        "bench": "disk",
        "quick": quick or tiny,
        "tiny": tiny,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "iopart bench disk" + (" --quick" if quick else ""),
        "seconds": round(time.monotonic() - t_start, 1),
        "host": {
            "cpus": os.cpu_count(),
            "client_cpu": cpu_c,
            "server_cpu": cpu_s,
            "kernel": os.uname().release,
            # other work on this VM shows here: the benchmark itself keeps ~1-2 CPUs busy
            "loadavg_before": load_before,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "fio": fio_version(),
            "image_fs": _fs_type(work.parent),
            "image_dir": str(work.parent),
        },
        "plan": plan.to_dict(),
        "rows": rows,
        "ratios": ratios,
        "targets": {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()},
        "met": {k: _met(ratios[k], op, v) for k, (op, v) in TARGETS.items()},
        # run-queue wait of the server threads and the guest during iopart randread jobs, as a
        # share of job time: above a few % other work on the VM was taking the benchmark's CPUs
        "contention": {"runq_wait_ms": round(waited, 1), "job_ms": round(job_ms, 1),
                       "share": round(waited / job_ms, 4) if job_ms else None},
        "guests16": guests,
        "server_stats": server_stats,
        "histograms": hist,
        "notes": NOTES,
    }
    if save:
        doc["saved"] = str(_save(doc, results or report.RESULTS))
    if out_json:
        print(json.dumps({k: v for k, v in doc.items() if k != "histograms"}))
    else:
        render(doc)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="iopart bench disk",
        description="4 KiB random I/O: iopart's block path vs fio direct, nbdkit, qemu-storage-"
        "daemon, cache hot and O_DIRECT, QD1 and QD32, in one interleaved run")
    p.add_argument("--quick", action="store_true", help="short run (under 3 minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-save", action="store_true",
                   help="do not write bench/results or BENCHMARKS.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    doc = run(a.quick, out_json=a.json, progress=not a.no_progress, save=not a.no_save)
    return 1 if a.check and not all(doc["met"].values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
