"""CPU shares on real cgroups: a busy process given 0.25 CPU gets 0.25 of a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iopart.cpu import CpuController, CpuError, CpuGroup, plan

BUSY = [sys.executable, "-c", "while True: pass"]


@pytest.mark.unit
def test_plan_fractions_become_quotas_and_whole_cpus_cpusets() -> None:
    assert plan(0.25) == plan(0.25, None)
    p = plan(0.25)
    assert (p.quota_us, p.period_us, p.cpus) == (25_000, 100_000, None)
    whole = plan(2, [1, 0])
    assert (whole.quota_us, whole.cpus) == (None, (0, 1))
    mixed = plan(1.5, [0, 1])
    assert (mixed.quota_us, mixed.cpus) == (150_000, (0, 1))
    assert plan(0.001).quota_us == 1000  # the kernel's minimum quota
    for bad in (0, -1, True, "1"):
        with pytest.raises(CpuError, match="positive number"):
            plan(bad)  # type: ignore[arg-type]
    with pytest.raises(CpuError, match="fewer than the 2 CPUs"):
        plan(1.5, [0])


@pytest.fixture
def ctl() -> Iterator[CpuController]:
    c = CpuController.detect(base=f"iopart-test-{os.getpid()}")
    try:
        yield c
    finally:
        c.cleanup()
    for root in c.dirs.values():
        assert not (root / c.base).exists(), "cgroup left behind"


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(BUSY)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def share(group: CpuGroup, seconds: float) -> float:
    u0, t0 = group.usage_ns(), time.monotonic()
    time.sleep(seconds)
    return (group.usage_ns() - u0) / ((time.monotonic() - t0) * 1e9)


@pytest.mark.system
def test_busy_partition_given_a_quarter_cpu_uses_a_quarter(
    ctl: CpuController, busy: subprocess.Popen[bytes]
) -> None:
    g = ctl.group("quarter")
    g.apply(plan(0.25))
    g.add(busy.pid)
    assert busy.pid in g.pids()
    time.sleep(0.3)  # settle into the first periods
    used = share(g, 2.0)
    print(f"cgroup v{ctl.version}: 0.25 CPU measured as {used:.3f}")
    assert 0.20 <= used <= 0.30, f"0.25 CPU measured as {used:.3f}"
    assert g.throttled() > 0
    # raising the quota is seen at once
    g.apply(plan(0.5))
    time.sleep(0.3)
    assert 0.40 <= share(g, 1.5) <= 0.60


@pytest.mark.system
def test_whole_cpu_becomes_a_cpuset(ctl: CpuController, busy: subprocess.Popen[bytes]) -> None:
    cpu = ctl.host_cpus()[-1]
    g = ctl.group("pinned")
    g.apply(plan(1, [cpu]))
    g.add(busy.pid)
    status = Path(f"/proc/{busy.pid}/status").read_text()
    allowed = [ln.split()[1] for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")]
    assert allowed == [str(cpu)]
    g.apply(plan(0.5))  # back to a fraction: every CPU again
    status = Path(f"/proc/{busy.pid}/status").read_text()
    assert f"Cpus_allowed_list:\t{cpu}\n" not in status


@pytest.mark.system
def test_bad_group_names_cannot_leave_the_tree(ctl: CpuController) -> None:
    for bad in ("..", "../../x", "a/b", "", "A"):
        with pytest.raises(CpuError, match="bad partition name"):
            ctl.group(bad)
