"""fio as a disk-latency peer: builds one fio job, runs it bounded in time, parses its JSON.

This module owns the fio command line (one job, 4 KiB random I/O by default, against a
file or an NBD URI), the page-cache warm-up for "hot" runs, and the reading of fio's JSON
into a :class:`FioResult` in microseconds.

Latency field: fio reports ``slat`` (submission), ``clat`` (completion, measured from the
moment the submit call *returned*) and ``lat`` (total: from when fio issued the I/O until it
saw it complete). We ask for ``--lat_percentiles=1`` and read ``lat_ns``: it is the per-I/O
latency an application sees, and it is the only one comparable across engines. With psync
``slat`` is not measured and ``lat`` equals ``clat`` up to timer noise, but with io_uring
(batched submit) and nbd (asynchronous libnbd) ``clat`` leaves out the submit time and can be
near zero for I/Os that completed during the submit call. ``clat_ns`` is used only as a
fallback if a fio build does not emit ``lat_ns`` percentiles. fio's percentiles come from its
log-linear histogram (64 buckets per power of two), so they are exact to about 1.5 %.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

FIO = "fio"
PERCENTILE_LIST = "50:99:99.9"
_KEYS = {"p50_us": "50.000000", "p99_us": "99.000000", "p999_us": "99.900000"}
_DIRECTION = {"randread": "read", "read": "read", "randwrite": "write", "write": "write"}
# Engines whose iodepth is meaningless (one I/O in flight per job, whatever iodepth says).
_SYNC_ENGINES = frozenset({"sync", "psync", "vsync", "pvsync", "pvsync2", "mmap"})
_WARM_CHUNK = 1 << 20


@dataclass(frozen=True)
class FioResult:
    """One fio job's outcome; latencies are per-I/O total latency (fio ``lat``) in us."""

    name: str
    p50_us: float
    p99_us: float
    p999_us: float
    mean_us: float
    iops: float
    ios: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fio_version() -> str:
    """fio's own version string, e.g. ``fio-3.33``."""
    try:
        res = subprocess.run(
            [FIO, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except FileNotFoundError as e:
        raise RuntimeError("fio is not installed: `make setup` installs it") from e
    if res.returncode != 0:
        raise RuntimeError(f"fio --version failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip()


def fio_command(
    name: str,
    *,
    filename: str | None = None,
    ioengine: str,
    rw: str,
    bs: int = 4096,
    iodepth: int = 1,
    direct: bool,
    size: int | None = None,
    runtime_s: float = 3.0,
    number_ios: int | None = None,
    cpu: int | None = None,
    uri: str | None = None,
    hot: bool = False,
    offset: int = 0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv of the fio job that :func:`run_fio` runs (without the warm-up pass)."""
    if rw not in _DIRECTION:
        raise ValueError(f"rw must be one of {sorted(_DIRECTION)}, not {rw!r}")
    if bs <= 0 or iodepth <= 0:
        raise ValueError("bs and iodepth must be positive")
    if hot and direct:
        raise ValueError("hot=True (page cache hot) contradicts direct=True (page cache bypassed)")
    if ioengine == "nbd":
        if uri is None:
            raise ValueError("ioengine nbd needs uri=")
        if filename is not None:
            raise ValueError("ioengine nbd takes uri=, not filename=")
    else:
        if filename is None:
            raise ValueError(f"ioengine {ioengine} needs filename=")
        if uri is not None:
            raise ValueError("uri= is only for ioengine nbd")

    cmd = [
        FIO,
        "--output-format=json",
        f"--name={name}",
        f"--ioengine={ioengine}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--direct={int(direct)}",
        # Jobs as threads of one process: fio forks job processes into sessions of their own
        # (setsid), where a timeout's kill of fio's process group would not reach them.
        "--thread",
        f"--percentile_list={PERCENTILE_LIST}",
        "--lat_percentiles=1",
        "--randrepeat=0",
        "--norandommap",
    ]
    cmd.append(f"--uri={uri}" if ioengine == "nbd" else f"--filename={filename}")
    if size is not None:
        cmd.append(f"--size={size}")
    if offset:
        cmd.append(f"--offset={offset}")
    if number_ios is not None:
        if number_ios <= 0:
            raise ValueError("number_ios must be positive")
        # fio stops at the end of the region (size) even with number_ios; io_size lets it
        # wrap around the region until exactly number_ios I/Os are done.
        cmd += [f"--number_ios={number_ios}", f"--io_size={number_ios * bs}"]
    else:
        # fio reads a bare runtime as whole seconds ("0.5" becomes 0): give it milliseconds.
        cmd += ["--time_based", f"--runtime={max(1, round(runtime_s * 1000))}ms"]
    if cpu is not None:
        cmd.append(f"--cpus_allowed={cpu}")
    if hot:
        cmd.append("--invalidate=0")
    if iodepth > 1 and ioengine not in _SYNC_ENGINES:
        # Submit whatever is queued in one call, reap as soon as one I/O completes: keeps
        # the queue full without waiting for a whole batch to finish.
        cmd += [
            f"--iodepth_batch_submit={iodepth}",
            "--iodepth_batch_complete_min=1",
            f"--iodepth_batch_complete_max={iodepth}",
        ]
    cmd += list(extra_args)
    return cmd


def run_fio(
    name: str,
    *,
    filename: str | None = None,
    ioengine: str,
    rw: str,
    bs: int = 4096,
    iodepth: int = 1,
    direct: bool,
    size: int | None = None,
    runtime_s: float = 3.0,
    number_ios: int | None = None,
    cpu: int | None = None,
    uri: str | None = None,
    hot: bool = False,
    offset: int = 0,
    timeout_s: float = 120,
    extra_args: Sequence[str] = (),
) -> FioResult:
    """Run one fio job and return its latency percentiles (us), mean, IOPS and I/O count.

    ``hot=True`` first brings the target into the page cache (a read of the whole file, or a
    sequential fio read pass through ``uri``) and tells fio not to drop it (``--invalidate=0``).
    Raises ``RuntimeError`` carrying fio's stderr if fio fails, reports a job error, does no
    I/O, or runs longer than ``timeout_s`` (then its whole process group is killed).
    """
    cmd = fio_command(
        name,
        filename=filename,
        ioengine=ioengine,
        rw=rw,
        bs=bs,
        iodepth=iodepth,
        direct=direct,
        size=size,
        runtime_s=runtime_s,
        number_ios=number_ios,
        cpu=cpu,
        uri=uri,
        hot=hot,
        offset=offset,
        extra_args=extra_args,
    )
    if hot:
        _warm(filename=filename, uri=uri, offset=offset, size=size, timeout_s=timeout_s)
    doc = _run_json(cmd, timeout_s)
    return _parse(name, doc, _DIRECTION[rw], " ".join(cmd))


def _warm(
    *, filename: str | None, uri: str | None, offset: int, size: int | None, timeout_s: float
) -> None:
    """Read the target region once so that it sits in the (server's) page cache."""
    if filename is not None:
        with open(filename, "rb", buffering=0) as f:
            f.seek(offset)
            left = size if size is not None else os.fstat(f.fileno()).st_size - offset
            while left > 0:
                chunk = f.read(min(_WARM_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
        return
    cmd = [
        FIO,
        "--output-format=json",
        "--name=warm",
        "--thread",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=read",
        "--bs=1M",
        "--iodepth=1",
        "--invalidate=0",
    ]
    if offset:
        cmd.append(f"--offset={offset}")
    if size is not None:
        cmd.append(f"--size={size}")
    _run_json(cmd, timeout_s)


def _run_json(cmd: list[str], timeout_s: float) -> dict[str, Any]:
    """Run fio in its own process group; return its JSON document or raise RuntimeError."""
    line = " ".join(cmd)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise RuntimeError("fio is not installed: `make setup` installs it") from e
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise RuntimeError(
            f"fio ran longer than {timeout_s} s and was killed: {line}\n{err.strip()}"
        ) from None
    finally:
        if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): leave nothing behind
            _kill_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed (exit {proc.returncode}): {line}\n{err.strip()}")
    # The nbd engine prints "fio: connected to NBD server" on stdout before the JSON.
    m = re.search(r"^\{", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"fio printed no JSON: {line}\nstdout: {out!r}\nstderr: {err.strip()}")
    try:
        doc, _ = json.JSONDecoder().raw_decode(out, m.start())
    except json.JSONDecodeError as e:
        raise RuntimeError(f"fio printed unreadable JSON ({e}): {line}\n{err.strip()}") from e
    if not isinstance(doc, dict) or not doc.get("jobs"):
        raise RuntimeError(f"fio JSON has no jobs: {line}\n{err.strip()}")
    job = doc["jobs"][0]
    if job.get("error"):
        raise RuntimeError(
            f"fio job error {job['error']} ({os.strerror(int(job['error']))}): {line}\n"
            f"{err.strip()}"
        )
    doc["_stderr"] = err
    return doc


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _parse(name: str, doc: dict[str, Any], direction: str, line: str) -> FioResult:
    stats = doc["jobs"][0][direction]
    ios = int(stats["total_ios"])
    if ios <= 0:
        raise RuntimeError(f"fio did no {direction} I/O: {line}\n{doc['_stderr'].strip()}")
    lat = stats.get("lat_ns", {})
    if "percentile" not in lat:
        lat = stats["clat_ns"]
    pct = lat["percentile"]
    vals = {field: float(pct[key]) / 1000.0 for field, key in _KEYS.items()}
    return FioResult(
        name=name,
        p50_us=vals["p50_us"],
        p99_us=vals["p99_us"],
        p999_us=vals["p999_us"],
        mean_us=float(lat["mean"]) / 1000.0,
        iops=float(stats["iops"]),
        ios=ios,
    )
