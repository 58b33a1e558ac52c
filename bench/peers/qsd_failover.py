"""Failover peer: qemu-storage-daemon's NBD export SIGKILLed and restarted under a retrying client.

The measurement, once per fault:

1. ``nbdretry`` (bench/peers/nbdretry.c, libnbd) runs QD1 4 KiB stamped writes and verified
   reads against qemu-storage-daemon (qsd) over a Unix socket;
2. after a random 20-80 ms of running I/O, ``time.monotonic_ns()`` is taken and qsd's process
   group is SIGKILLed; once reaped, qsd is started again at once on the same socket path (the
   stale socket and pidfile removed first);
3. the client sees its operation fail, reconnects in a tight loop (200 us apart), re-issues
   the failed operation and reads back the writes it had acknowledged just before the fault;
   the controller waits (bounded) until the client's shared status shows I/O has resumed.

The stall of a fault is, on the client's CLOCK_MONOTONIC, the time from the last completion
before the fault to the first completion after it (so it includes qsd's restart, the reconnect
and the retried operation). The client reports one "outage" per failure episode; each fault
is matched with the outage whose first completion is the first one after the fault.

qsd exports the raw image with ``cache.direct=off,cache.no-flush=off``: a write acknowledged
by qsd has been pwritten into the image file's page cache, which survives qsd's SIGKILL, so an
acknowledged write read back older ("lost") would be a real finding, and is reported as is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers import BUILD, HERE
from bench.peers.nbd import QSD, QemuStorageDaemon, _qopt

BLOCK = 4096
STATUS_BYTES = 64
_STATUS_FMT = "<5Q"  # ops, last completion ns, reconnects, outages recovered, state
_ST_DONE = 3
RETRY_TIMEOUT_MS = 10_000  # the client gives up reconnecting after this
GAP_US = 2_000  # completion gaps longer than this are reported by the client
RECOVERY_TIMEOUT_S = 10.0  # bound on waiting for I/O to resume after one fault
START_TIMEOUT_S = 10.0  # bound on waiting for the client's first completion


# -- the client binary -------------------------------------------------------------------------
def build_nbdretry() -> Path:
    """Compile bench/peers/nbdretry.c against libnbd (rebuilt when the source is newer)."""
    src = HERE / "nbdretry.c"
    out = BUILD / "nbdretry"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found: `make setup` installs gcc")
    if not Path("/usr/include/libnbd.h").exists():
        raise RuntimeError("libnbd.h not found: apt-get install libnbd-dev")
    BUILD.mkdir(exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(src), "-lnbd"], check=True)
    return out


@functools.cache
def qsd_version() -> str:
    """qemu-storage-daemon's version string, e.g. ``7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)``."""
    res = subprocess.run([QSD, "--version"], capture_output=True, text=True, timeout=10)
    first = (res.stdout.strip().splitlines() or [""])[0]
    return first.removeprefix("qemu-storage-daemon version ").strip()


# -- the server: qsd that can be killed and respawned on the same socket -----------------------
class RestartableQsd(QemuStorageDaemon):
    """:class:`QemuStorageDaemon` (page-cache mode) that can be SIGKILLed and respawned in place.

    ``start()``/``stop()`` are the base class's (private directory, bounded readiness wait,
    process-group cleanup); :meth:`kill` and :meth:`respawn` reuse the same directory, so
    the socket path the client reconnects to never changes.
    """

    def __init__(
        self,
        filename: str | os.PathLike[str],
        *,
        cpu: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(filename, direct=False, aio="io_uring", cpu=cpu, workdir=workdir)

    def _argv(self) -> list[str]:
        return [
            QSD,
            "--pidfile",
            os.fspath(self._pidfile),
            "--blockdev",
            f"driver=file,node-name=file0,filename={_qopt(self.filename)},"
            f"cache.direct=off,cache.no-flush=off,aio={self.aio}",
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--nbd-server",
            f"addr.type=unix,addr.path={_qopt(os.fspath(self.socket_path))}",
            "--export",
            f"type=nbd,id=exp0,node-name=disk0,name={self.export_name},writable=on",
        ]

    def kill(self) -> int:
        """SIGKILL qsd's process group and reap it; returns monotonic ns taken just before."""
        if self._proc is None:
            raise RuntimeError(f"{self.program} is not started")
        t_fault = time.monotonic_ns()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)  # reaped: its image lock and socket are gone
        return t_fault

    def respawn(self) -> None:
        """Start qsd again on the same socket path, not waiting for it (the client does)."""
        if self._proc is None or self._proc.poll() is None:
            raise RuntimeError(f"{self.program} must be killed before it is respawned")
        for stale in (self.socket_path, self._pidfile):
            stale.unlink(missing_ok=True)
        self._spawn("ab")

    def __enter__(self) -> RestartableQsd:
        self.start()
        return self

    def check_alive(self) -> None:
        """Raise with qsd's log if it has exited on its own."""
        if self._proc is not None and (rc := self._proc.poll()) is not None:
            raise RuntimeError(f"{self.program} exited with {rc}: {self._read_log()}")


# -- the client process ------------------------------------------------------------------------
class NbdRetryClient:
    """A running ``nbdretry``, its shared status file, and its final JSON line."""

    def __init__(self, socket_path: Path, *, export: str, span: int, workdir: Path) -> None:
        self.status_path = workdir / "nbdretry.status"
        self.log_path = workdir / "nbdretry.log"
        self.status_path.write_bytes(bytes(STATUS_BYTES))
        with open(self.status_path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), STATUS_BYTES, prot=mmap.PROT_READ)
        argv = [
            str(build_nbdretry()),
            "-s", os.fspath(socket_path), "-e", export, "-z", str(span),
            "-S", os.fspath(self.status_path), "-t", str(RETRY_TIMEOUT_MS), "-g", str(GAP_US),
            "-r", str(random.getrandbits(63) | 1),
        ]  # fmt: skip
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True,
                )  # fmt: skip
        except BaseException:
            self._mm.close()
            raise

    def status(self) -> tuple[int, int, int, int, int]:
        """(ops, last completion ns, reconnects, outages recovered, state), read live."""
        ops, last_ns, reconnects, recovered, state = struct.unpack_from(_STATUS_FMT, self._mm)
        return ops, last_ns, reconnects, recovered, state

    def wait_for(
        self,
        what: str,
        cond: Callable[[], bool],
        timeout_s: float,
        check: Callable[[], None] | None = None,
    ) -> None:
        """Poll (1 ms) until ``cond()``; raise if the client exits or ``timeout_s`` passes.

        ``check()``, if given, runs on every poll and may raise (e.g. the server died).
        """
        deadline = time.monotonic() + timeout_s
        while not cond():
            if check is not None:
                check()
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdretry exited with {self.proc.returncode}: {self._log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdretry: no {what} within {timeout_s} s: {self._log()}")
            time.sleep(0.001)

    def wait_recovered(
        self, outages: int, timeout_s: float, check: Callable[[], None] | None = None
    ) -> None:
        """Wait until the client has completed I/O again after its ``outages``-th outage."""
        self.wait_for(
            f"recovery from outage {outages}",
            lambda: self.status()[3] >= outages,
            timeout_s,
            check,
        )

    def finish(self, timeout_s: float = 15.0) -> dict[str, Any]:
        """SIGTERM the client and return its JSON line (raising if it gave up)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout_s)
        lines = out.decode(errors="replace").strip().splitlines()
        if not lines:
            raise RuntimeError(
                f"nbdretry printed nothing (rc {self.proc.returncode}): {self._log()}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        if "error" in result or self.proc.returncode != 0:
            raise RuntimeError(f"nbdretry failed: {result.get('error')}: {self._log()}")
        return result

    def close(self) -> None:
        """Kill the client's process group if still running, and unmap the status. Idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._mm.closed:
            self._mm.close()

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""


# -- the measurement ---------------------------------------------------------------------------
@contextlib.contextmanager
def _private_dir(workdir: Path) -> Iterator[Path]:
    """A fresh directory under ``workdir`` for the image and status, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="iopart-qsdfo-", dir=workdir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _socket_parent(work: Path) -> Path | None:
    """Where qsd's socket directory goes: ``work``, or the system temp dir if too deep.

    AF_UNIX paths are limited to 107 bytes; the socket is ``<dir>/iopart-nbd-XXXXXXXX/nbd.sock``.
    """
    return work if len(os.fsencode(work)) + len("/iopart-nbd-XXXXXXXX/nbd.sock") <= 107 else None


def _make_image(path: Path, mib: int) -> None:
    """A sparse raw image (reads of unwritten blocks are zeros, which the client expects)."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)


def _inject_faults(
    srv: RestartableQsd,
    client: NbdRetryClient,
    faults: int,
    progress: Callable[[int], None] | None,
) -> list[tuple[int, int]]:
    """Kill and respawn qsd ``faults`` times under running I/O.

    Returns (fault ns, respawned ns) per fault: monotonic time just before the SIGKILL, and
    once the new qsd process had been started (after the old one was reaped).
    """
    rng = random.Random()
    times: list[tuple[int, int]] = []
    for i in range(faults):
        time.sleep(rng.uniform(0.020, 0.080))
        srv.check_alive()
        t_fault = srv.kill()
        srv.respawn()
        times.append((t_fault, time.monotonic_ns()))
        client.wait_recovered(i + 1, RECOVERY_TIMEOUT_S, check=srv.check_alive)
        if progress is not None:
            progress(i + 1)
    return times


def match_outages(fault_ns: list[int], outages: list[list[int]]) -> list[list[int]]:
    """The client outage of each fault: the first one whose first completion follows it.

    An outage is [last completion, failure seen, reconnected, first completion] (ns). A
    completion may land between the fault's timestamp and the SIGKILL, so the outage may
    start just after the fault time. Raises unless each fault has exactly one outage.
    """
    if len(outages) != len(fault_ns):
        raise RuntimeError(f"{len(fault_ns)} faults but {len(outages)} client outages")
    matched: list[list[int]] = []
    k = 0
    for t in fault_ns:
        while k < len(outages) and outages[k][3] <= t:
            k += 1
        if k == len(outages):
            raise RuntimeError(f"no client outage after the fault at {t} ns")
        matched.append(outages[k])
        k += 1
    return matched


def _unfaulted_gaps_ms(gaps: list[list[int]], outages: list[list[int]]) -> list[float]:
    """Completion gaps (over the client's threshold) that are not fault outages."""
    outage_spans = {(o[0], o[3]) for o in outages}
    return [(e - s) / 1e6 for s, e in gaps if (s, e) not in outage_spans]


def _p50_ms(values_ns: list[int]) -> float | None:
    return float(np.percentile(np.asarray(values_ns) / 1e6, 50)) if values_ns else None


def _phases(times: list[tuple[int, int]], matched: list[list[int]]) -> dict[str, float | None]:
    """Medians (ms) of where the time goes, each measured from the fault."""
    pairs = list(zip(times, matched, strict=True))
    return {
        "respawned": _p50_ms([r - f for (f, r), _ in pairs]),
        "error_seen": _p50_ms([o[1] - f for (f, _), o in pairs]),
        "reconnected": _p50_ms([o[2] - f for (f, _), o in pairs]),
        "first_completion": _p50_ms([o[3] - f for (f, _), o in pairs]),
    }


def _summary(times: list[tuple[int, int]], res: dict[str, Any]) -> dict[str, Any]:
    """The returned dict: stalls, their percentiles, the client's counters, diagnostics."""
    matched = match_outages([f for f, _ in times], res["outages"])
    stalls = [(o[3] - o[0]) / 1e6 for o in matched]
    arr = np.asarray(stalls, dtype=float)
    other = _unfaulted_gaps_ms(res["gaps"], res["outages"])
    return {
        "faults": len(times),
        "stalls_ms": [round(s, 3) for s in stalls],
        "p50_ms": float(np.percentile(arr, 50)) if stalls else None,
        "p99_ms": float(np.percentile(arr, 99)) if stalls else None,
        "max_ms": float(arr.max()) if stalls else None,
        "lost": res["lost"],
        "verify_failures": res["verify_failures"],
        "reconnects": res["reconnects"],
        "ops": res["ops"],
        "errors_retried": res["errors_retried"],
        "connect_attempts": res["connect_attempts"],
        "post_fault_checks": res["post_fault_checks"],
        "phases_p50_ms": _phases(times, matched),
        "unfaulted_gaps": len(other),
        "unfaulted_gap_max_ms": max(other, default=0.0),
        "gap_threshold_ms": res["gap_threshold_ns"] / 1e6,
        "qsd_version": qsd_version(),
    }


def measure_qsd_failover(
    faults: int,
    *,
    workdir: Path,
    image_mib: int = 64,
    cpu: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """SIGKILL and restart qsd ``faults`` times under a retrying libnbd client; the stalls.

    ``cpu`` pins qsd (the client runs unpinned); ``progress(i)`` is called after fault i has
    been recovered from. Returns ``faults``, ``stalls_ms`` (one per fault, in order),
    ``p50_ms``/``p99_ms``/``max_ms``, ``lost`` (acked writes read back older),
    ``verify_failures``, ``reconnects``, ``ops``, ``qsd_version`` and a few diagnostics
    (``errors_retried``, ``connect_attempts``, ``post_fault_checks``, ``phases_p50_ms``: the
    median time from the fault until qsd was respawned / the client saw the error / it had
    reconnected / its first completion, ``unfaulted_gaps`` and ``unfaulted_gap_max_ms``:
    completion gaps over ``gap_threshold_ms`` that no fault explains). Everything started is
    stopped and the files are removed, also on errors.
    """
    if faults < 0:
        raise ValueError("faults must be >= 0")
    build_nbdretry()
    with _private_dir(Path(workdir)) as work:
        image = work / "disk.img"
        _make_image(image, image_mib)
        srv = RestartableQsd(image, cpu=cpu, workdir=_socket_parent(work))
        try:
            srv.start()
            client = NbdRetryClient(
                srv.socket_path, export=srv.export_name, span=image_mib << 20, workdir=work
            )
            try:
                times, res = _run(srv, client, faults, progress)
            finally:
                client.close()
        finally:
            srv.stop()
    return _summary(times, res)


def _run(
    srv: RestartableQsd,
    client: NbdRetryClient,
    faults: int,
    progress: Callable[[int], None] | None,
) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """Wait for I/O, inject the faults, stop the client; (fault/respawn times, client JSON)."""
    client.wait_for("first completion", lambda: client.status()[0] > 0, START_TIMEOUT_S)
    times = _inject_faults(srv, client, faults, progress)
    time.sleep(0.02)  # a little steady I/O after the last recovery
    return times, client.finish()
