"""CPU assignment with cgroups: whole CPUs become cpusets, fractions become quotas.

Claims 26-28: a partition given 0.25 CPU runs at most 25 ms of every 100 ms
(CFS bandwidth); a partition given 2 CPUs is confined to two CPUs with a cpuset.
Both cgroup versions are handled: v1 with separate cpu, cpuacct and cpuset
hierarchies, and v2 with one unified tree. Which one the host has is read from
/proc/self/mounts and the controllers files, never assumed. Groups live under
`<hierarchy>/<base>/<partition>`.
"""

from __future__ import annotations

import contextlib
import errno
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iopart.errors import IopartError

PERIOD_US = 100_000
MIN_QUOTA_US = 1000
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class CpuError(IopartError):
    kind = "cpu"


@dataclass(frozen=True)
class CpuPlan:
    """What to write: a CFS quota per period (None: unthrottled) and a cpuset (None: all)."""

    quota_us: int | None
    period_us: int
    cpus: tuple[int, ...] | None


def plan(cpu: float, cpuset: Sequence[int] | None = None) -> CpuPlan:
    """The cgroup settings for `cpu` CPUs, optionally confined to `cpuset`."""
    if isinstance(cpu, bool) or not isinstance(cpu, int | float) or not cpu > 0:
        raise CpuError(f"cpu must be a positive number of CPUs, got {cpu!r}", errno=errno.EINVAL)
    cpus = tuple(sorted(set(cpuset))) if cpuset is not None else None
    if cpus is not None:
        if any(not isinstance(c, int) or c < 0 for c in cpus):
            raise CpuError(f"cpuset must hold CPU numbers, got {list(cpuset or [])}",
                           errno=errno.EINVAL)
        if len(cpus) < math.ceil(cpu):
            raise CpuError(f"cpuset {list(cpus)} has fewer than the {math.ceil(cpu)} CPUs "
                           f"{cpu} needs", errno=errno.EINVAL)
        if float(cpu).is_integer() and len(cpus) == int(cpu):
            return CpuPlan(None, PERIOD_US, cpus)  # whole CPUs: the cpuset is the limit
    return CpuPlan(max(MIN_QUOTA_US, round(cpu * PERIOD_US)), PERIOD_US, cpus)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CpuError(f"cannot write {value!r} to {path}: {exc.strerror}",
                       errno=exc.errno or errno.EIO) from None


def _cpulist(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def _parse_cpulist(text: str) -> list[int]:
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


class CpuController:
    """The host's cpu controller, v1 or v2, and the groups made under `base`."""

    def __init__(self, version: int, dirs: dict[str, Path], base: str) -> None:
        self.version = version
        self.dirs = dirs  # v1: "cpu", "cpuacct", "cpuset" mount points; v2: "unified"
        self.base = base

    @classmethod
    def detect(cls, base: str = "iopart") -> CpuController:
        if not NAME_RE.match(base):
            raise CpuError(f"bad cgroup base name {base!r}", errno=errno.EINVAL)
        v1: dict[str, Path] = {}
        v2: Path | None = None
        for line in Path("/proc/self/mounts").read_text().splitlines():
            _dev, mnt, fstype, opts, *_ = line.split()
            if fstype == "cgroup2":
                ctl = Path(mnt, "cgroup.controllers")
                if ctl.exists() and "cpu" in ctl.read_text().split():
                    v2 = Path(mnt)
            elif fstype == "cgroup":
                for c in ("cpu", "cpuacct", "cpuset"):
                    if c in opts.split(","):
                        v1[c] = Path(mnt)
        if v2 is not None:
            return cls(2, {"unified": v2}, base)
        if {"cpu", "cpuacct"} <= set(v1):
            return cls(1, v1, base)
        raise CpuError("no usable cgroup cpu controller on this host (neither a v1 cpu "
                       "hierarchy nor cgroup2 with the cpu controller)", errno=errno.ENOTSUP)

    def host_cpus(self) -> list[int]:
        return _parse_cpulist(Path("/sys/devices/system/cpu/online").read_text())

    def group(self, name: str) -> CpuGroup:
        if not NAME_RE.match(name):
            raise CpuError(f"bad partition name for a cgroup: {name!r}", errno=errno.EINVAL)
        return CpuGroup(self, name)

    def cleanup(self) -> None:
        """Remove every group under base, and base itself."""
        for root in self.dirs.values():
            b = root / self.base
            if b.is_dir():
                for d in b.iterdir():
                    if d.is_dir():
                        CpuGroup(self, d.name).destroy()
                with contextlib.suppress(OSError):
                    b.rmdir()


class CpuGroup:
    def __init__(self, ctl: CpuController, name: str) -> None:
        self.ctl = ctl
        self.name = name
        self.paths: dict[str, Path] = {k: root / ctl.base / name for k, root in ctl.dirs.items()}
        for key, path in self.paths.items():
            self._make(key, path)

    def _make(self, key: str, path: Path) -> None:
        root = self.ctl.dirs[key]
        for d in (path.parent, path):
            if d.is_dir():
                continue
            try:
                d.mkdir()
            except OSError as exc:
                raise CpuError(f"cannot create cgroup {d}: {exc.strerror}",
                               errno=exc.errno or errno.EIO) from None
            if key == "cpuset":  # v1: a cpuset is unusable until it has cpus and mems
                for f in ("cpuset.cpus", "cpuset.mems"):
                    _write(d / f, (d.parent / f).read_text().strip() or "0")
        if self.ctl.version == 2:
            for d in (root, path.parent):
                have = (d / "cgroup.subtree_control").read_text().split()
                want = [c for c in ("cpu", "cpuset") if c not in have]
                avail = (d / "cgroup.controllers").read_text().split()
                for c in want:
                    if c in avail:
                        _write(d / "cgroup.subtree_control", f"+{c}")

    @property
    def _cpu(self) -> Path:
        return self.paths.get("cpu") or self.paths["unified"]

    @property
    def _cpuset(self) -> Path | None:
        p = self.paths.get("cpuset") or self.paths.get("unified")
        return p if p is not None and (p / "cpuset.cpus").exists() else None

    def apply(self, p: CpuPlan) -> None:
        if self.ctl.version == 1:
            _write(self._cpu / "cpu.cfs_period_us", str(p.period_us))
            _write(self._cpu / "cpu.cfs_quota_us", str(p.quota_us if p.quota_us else -1))
        else:
            quota = str(p.quota_us) if p.quota_us else "max"
            _write(self._cpu / "cpu.max", f"{quota} {p.period_us}")
        cs = self._cpuset
        if cs is not None:
            if p.cpus is not None:
                value = _cpulist(p.cpus)
            elif self.ctl.version == 1:
                value = (cs.parent / "cpuset.cpus").read_text().strip()
            else:
                value = ""  # v2: empty means the parent's
            _write(cs / "cpuset.cpus", value)
        elif p.cpus is not None:
            raise CpuError("this host has no cpuset controller for whole-CPU assignment",
                           errno=errno.ENOTSUP)

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the group in every hierarchy."""
        for path in self.paths.values():
            _write(path / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        text = (self._cpu / "cgroup.procs").read_text()
        return [int(x) for x in text.split()]

    def usage_ns(self) -> int:
        if self.ctl.version == 1:
            return int((self.paths["cpuacct"] / "cpuacct.usage").read_text())
        return self._stat("usage_usec") * 1000

    def throttled(self) -> int:
        return self._stat("nr_throttled")

    def _stat(self, key: str) -> int:
        for line in (self._cpu / "cpu.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return 0

    def destroy(self) -> None:
        """Move what is left to the root group and remove the group; idempotent."""
        for key, path in self.paths.items():
            if not path.is_dir():
                continue
            root = self.ctl.dirs[key]
            for _ in range(3):
                with contextlib.suppress(OSError):
                    for pid in (path / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            (root / "cgroup.procs").write_text(pid)
                try:
                    path.rmdir()
                    break
                except OSError:
                    continue

