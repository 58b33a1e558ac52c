"""The ultravisor's side of CPU assignment: keep cgroups equal to the database.

After every durable batch the ultravisor calls `sync`: each partition's group gets
the plan for its CPU share (fractions: a quota; whole CPUs: a cpuset of that many
CPUs, handed out in partition-index order), groups of destroyed partitions are
removed, and processes that connected as a partition are moved into its group.

System partitions (boot, ultravisor, command) are not throttled: their recorded
share is a reservation counted against the host's capacity, but a quota on the
ultravisor would stall every partition's transactions behind it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

from iopart.cpu import CpuController, CpuError, CpuGroup, CpuPlan, plan
from iopart.resources import PartitionRecord

log = logging.getLogger("iopart.cpu")


def cgroup_base(state_dir: Path) -> str:
    """The cgroup directory name of the stack whose state lives in `state_dir`."""
    return "iopart-" + hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:10]


def remove_groups(state_dir: Path) -> None:
    """Remove what a killed ultravisor left behind (it cleans up itself when stopped)."""
    with contextlib.suppress(CpuError):
        CpuController.detect(cgroup_base(state_dir)).cleanup()


class CpuEnforcer:
    def __init__(self, state_dir: Path) -> None:
        base = cgroup_base(state_dir)
        self.ctl: CpuController | None = None
        self.error = ""
        try:
            self.ctl = CpuController.detect(base)
        except CpuError as exc:
            self.error = exc.message
            log.warning("CPU shares not enforced: %s", exc.message)
        self.groups: dict[str, CpuGroup] = {}
        self.applied: dict[str, CpuPlan] = {}
        self.members: dict[str, set[int]] = {}

    def plans(self, partitions: dict[str, PartitionRecord]) -> dict[str, CpuPlan]:
        assert self.ctl is not None
        host = self.ctl.host_cpus()
        nxt = 0
        out: dict[str, CpuPlan] = {}
        for p in sorted(partitions.values(), key=lambda p: p.index):
            if p.kind in ("system", "io"):
                continue
            if p.cpu >= 1 and float(p.cpu).is_integer() and int(p.cpu) <= len(host):
                n = int(p.cpu)
                cpus = [host[(nxt + i) % len(host)] for i in range(n)]
                nxt += n
                out[p.name] = plan(p.cpu, cpus)
            else:
                out[p.name] = plan(p.cpu)
        return out

    def sync(self, partitions: dict[str, PartitionRecord]) -> None:
        if self.ctl is None:
            return
        try:
            plans = self.plans(partitions)
            for name, pl in plans.items():
                if self.applied.get(name) != pl:
                    g = self.groups.get(name) or self.ctl.group(name)
                    self.groups[name] = g
                    g.apply(pl)
                    self.applied[name] = pl
            for name in [n for n in self.groups if n not in plans]:
                self.groups.pop(name).destroy()
                self.applied.pop(name, None)
            for name, pids in self.members.items():
                member_of = self.groups.get(name)
                if member_of is not None:
                    for pid in list(pids):
                        self._add(member_of, name, pid)
        except CpuError as exc:
            log.error("cannot apply CPU shares: %s", exc.message)
            self.error = exc.message

    def attach(self, name: str, pid: int, partitions: dict[str, PartitionRecord]) -> None:
        """Process `pid` runs partition `name`: it goes into that group (now or once the
        partition exists)."""
        self.members.setdefault(name, set()).add(pid)
        self.sync(partitions)

    def detach(self, name: str, pid: int) -> None:
        self.members.get(name, set()).discard(pid)

    def _add(self, g: CpuGroup, name: str, pid: int) -> None:
        try:
            if pid not in g.pids():
                g.add(pid)
        except CpuError as exc:
            log.warning("cannot move pid %d into %s: %s", pid, name, exc.message)
            self.members[name].discard(pid)

    def report(self) -> dict[str, Any]:
        if self.ctl is None:
            return {"enforced": False, "error": self.error}
        groups = {}
        for name, g in self.groups.items():
            pl = self.applied.get(name)
            try:
                usage, pids, thr = g.usage_ns(), g.pids(), g.throttled()
            except OSError:
                usage, pids, thr = 0, [], 0
            groups[name] = {"quota_us": pl.quota_us if pl else None,
                            "cpus": list(pl.cpus) if pl and pl.cpus else None,
                            "usage_ns": usage, "throttled": thr, "pids": pids}
        return {"enforced": True, "cgroup": self.ctl.version, "base": self.ctl.base,
                "groups": groups, "error": self.error}

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.cleanup()
