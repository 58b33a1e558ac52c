"""Watching the other I/O partition, and fencing it.

A standby decides the active is gone when the active's pidfd fires (it died) or
when its heartbeat in the I/O area is older than the heartbeat deadline (it
hangs). A hung server must not wake up later and touch a channel someone else
serves, so it is fenced first: SIGKILL through its pidfd, then wait until the
pidfd says it exited. By then the kernel has finished or cancelled its
in-flight I/O, and the standby may replay the journals.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from dataclasses import dataclass

from iopart.channels.journal import monotonic_ns
from iopart.ioarea import IoArea


def is_io_partition(pid: int, name: str) -> bool:
    """Whether pid is (still) the I/O partition `name`, not a recycled pid."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"iopart.iopartition" in argv and name.encode() in argv


@dataclass
class Verdict:
    alive: bool
    why: str = ""      # "exited", "heartbeat", "no active"
    silent_ms: float = 0.0


class PeerWatch:
    """The other I/O partition as seen from the area: its pid, pidfd and heartbeat."""

    def __init__(self, area: IoArea, slot: int, name: str, deadline_ns: int) -> None:
        self.area, self.slot, self.name, self.deadline_ns = area, slot, name, deadline_ns
        self.pid = 0
        self.pidfd = -1

    def _refresh(self) -> None:
        pid = int(self.area.server(self.slot).pid)
        if pid == self.pid:
            return
        self.close()
        self.pid = pid
        if pid and is_io_partition(pid, self.name):
            with contextlib.suppress(OSError):
                self.pidfd = os.pidfd_open(pid)

    def fileno(self) -> int:
        """The pidfd (for a selector; -1 when there is none)."""
        self._refresh()
        return self.pidfd

    def exited(self) -> bool:
        if self.pidfd < 0:
            return True
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def verdict(self) -> Verdict:
        self._refresh()
        if self.pidfd < 0 or self.exited():
            return Verdict(False, "exited")
        silent = monotonic_ns() - int(self.area.server(self.slot).heartbeat_ns)
        if silent > self.deadline_ns:
            return Verdict(False, "heartbeat", silent / 1e6)
        return Verdict(True, "", silent / 1e6)

    def next_check_s(self, ceiling_s: float) -> float:
        """Seconds until the heartbeat deadline passes if no beat comes: a standby looks
        again exactly then (at most ceiling_s from now)."""
        left = int(self.area.server(self.slot).heartbeat_ns) + self.deadline_ns - monotonic_ns()
        return min(max(left / 1e9 + 0.0002, 0.0002), ceiling_s)

    def fence(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL it and wait until it has exited. True once it is gone."""
        if self.pidfd < 0:
            return True
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        return bool(select.select([self.pidfd], [], [], timeout_s)[0])

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
        self.pidfd, self.pid = -1, 0
