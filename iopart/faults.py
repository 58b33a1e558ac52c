"""Fault injection: kill or hang an I/O partition (`iopart fail iop-a [--hang]`).

A kill is SIGKILL: the standby sees the pidfd fire and takes over at once. A hang
is SIGSTOP: the process stays, its heartbeat stops, and the standby fences it
(SIGKILL) once the heartbeat deadline has passed, then takes over. Either way
boot restarts the failed one, which comes back as the standby.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iopart.errors import IopartError
from iopart.failover import is_io_partition
from iopart.ioarea import IO_PARTITIONS


class FaultError(IopartError):
    kind = "fault"


def io_pids(state_dir: Path) -> dict[str, int]:
    """The running I/O partitions' pids, from boot's state file."""
    try:
        boot = json.loads((state_dir / "boot.json").read_text())
    except (OSError, ValueError) as exc:
        raise FaultError(f"no running stack in {state_dir} (boot.json: {exc})",
                         errno=errno.ENOENT) from exc
    children = boot.get("children", {})
    return {n: int(children[n]["pid"]) for n in IO_PARTITIONS
            if n in children and children[n].get("alive") and children[n].get("pid")}


def roles(state_dir: Path) -> dict[str, str]:
    """Each I/O partition's role as its last report says ("active", "standby")."""
    out = {}
    for n in IO_PARTITIONS:
        try:
            out[n] = str(json.loads((state_dir / f"{n}.json").read_text()).get("role", "?"))
        except (OSError, ValueError):
            out[n] = "down"
    return out


def inject(state_dir: Path, name: str, *, hang: bool = False) -> dict[str, Any]:
    """SIGKILL (or, with hang, SIGSTOP) the I/O partition `name`."""
    if name not in IO_PARTITIONS:
        raise FaultError(f"faults are injected into an I/O partition ({', '.join(IO_PARTITIONS)}),"
                         f" not {name!r}", errno=errno.EINVAL)
    pids = io_pids(state_dir)
    pid = pids.get(name, 0)
    if not pid or not is_io_partition(pid, name):
        raise FaultError(f"{name} is not running", errno=errno.ESRCH)
    other = next(n for n in IO_PARTITIONS if n != name)
    other_up = other in pids and is_io_partition(pids[other], other)
    role = roles(state_dir).get(name, "?")
    sig = signal.SIGSTOP if hang else signal.SIGKILL
    t = time.time()
    os.kill(pid, sig)
    if not other_up:
        note = (f"{other} is not running: nobody takes over until boot restarts {name}"
                + ("; a hung one stays hung (SIGCONT it)" if hang else ""))
    elif role == "active":
        note = (f"{other} fences it after the heartbeat deadline and takes over" if hang
                else f"{other} takes over")
    else:
        note = (f"{name} was the {role}; {other} keeps serving"
                + (" and fences it after the heartbeat deadline" if hang else "")
                + f"; boot restarts {name}")
    return {"partition": name, "pid": pid, "signal": sig.name, "at": t, "role": role,
            "standby": other if other_up and role == "active" else None, "note": note}


@dataclass
class Fault:
    """One injected fault: what, into whom, when (CLOCK_MONOTONIC ns, just before the
    signal). `double`: the standby was killed too, `second_ns` later, while it took over."""

    kind: str  # "kill", "hang" or "double"
    target: str
    at_ns: int
    second_ns: int = 0
    detect_ms: float = 0.0    # fault to the start of the takeover (the new active's report)
    takeover_ms: float = 0.0  # the takeover itself
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def current_roles(state_dir: Path) -> tuple[str | None, str | None]:
    """(active, standby): I/O partitions that are running and whose report is their own."""
    pids = io_pids(state_dir)
    active = standby = None
    for n in IO_PARTITIONS:
        try:
            rep = json.loads((state_dir / f"{n}.json").read_text())
        except (OSError, ValueError):
            continue
        pid = pids.get(n, 0)
        if not pid or rep.get("pid") != pid or not is_io_partition(pid, n):
            continue
        if rep.get("role") == "active":
            active = n
        elif rep.get("role") == "standby":
            standby = n
    return active, standby


def wait_redundant(state_dir: Path, timeout_s: float = 30.0) -> tuple[str, str]:
    """Wait until one I/O partition is active and the other its standby."""
    deadline = time.monotonic() + timeout_s
    while True:
        active, standby = current_roles(state_dir)
        if active and standby:
            return active, standby
        if time.monotonic() > deadline:
            raise FaultError(f"no active and standby pair after {timeout_s:.0f} s "
                             f"(active {active}, standby {standby})", errno=errno.ETIMEDOUT)
        time.sleep(0.01)


def run_faults(state_dir: Path, kinds: Sequence[str], rng: random.Random, *,
               pause_s: tuple[float, float] = (0.05, 0.3),
               progress: Callable[[int], None] | None = None) -> list[Fault]:
    """Inject one fault per entry of kinds, each at a random moment of running I/O once
    the pair is redundant again."""
    out: list[Fault] = []
    for i, kind in enumerate(kinds):
        active, standby = wait_redundant(state_dir)
        pids = io_pids(state_dir)
        time.sleep(rng.uniform(*pause_s))
        at = time.monotonic_ns()
        os.kill(pids[active], signal.SIGSTOP if kind == "hang" else signal.SIGKILL)
        f = Fault(kind, active, at)
        if kind == "double":
            # the standby is taking over (or just did): kill it as well
            time.sleep(rng.uniform(0.0, 0.003))
            f.second_ns = time.monotonic_ns() - at
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[standby], signal.SIGKILL)
        out.append(f)
        _wait_taken_over(state_dir, active, pids[active])
        if kind != "double":
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                last = json.loads((state_dir / f"{standby}.json").read_text())["takeovers"][-1]
                f.detect_ms = round((int(last["t_ns"]) - at) / 1e6, 3)
                f.takeover_ms, f.why = float(last["ms"]), str(last["why"])
        if progress is not None:
            progress(i + 1)
    wait_redundant(state_dir)
    return out


def _wait_taken_over(state_dir: Path, failed: str, pid: int, timeout_s: float = 30.0) -> None:
    """Wait until the failed one is gone (a hung one is fenced by the standby) and another
    I/O partition is active."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active, _ = current_roles(state_dir)
        if not is_io_partition(pid, failed) and active is not None:
            return
        time.sleep(0.005)
    raise FaultError(f"nobody took over from {failed} (pid {pid}) in {timeout_s:.0f} s",
                     errno=errno.ETIMEDOUT)


def stalls_ms(faults: Sequence[Fault], gaps: Sequence[Sequence[int]],
              threshold_ms: float) -> list[float]:
    """Each fault's I/O stall: the completion gap around its moment (the last completion
    before it to the first after). A fault with no gap longer than the threshold near
    it stalled I/O for less than the threshold, and counts as the threshold."""
    out = []
    slack = 5_000_000  # the signal lands a little after the moment taken before it
    for f in faults:
        # the stall is the longest gap around the fault; short ones nearby are noise
        best = 0
        for start, end in gaps:
            if end > f.at_ns and start <= f.at_ns + slack:
                best = max(best, end - start)
        out.append(best / 1e6 if best else threshold_ms)
    return out
